"""A small test double of VLM2Vec's vendored Phi-3-V (``src/model/baseline_backbone/phi3_v``), written here, not
copied: what matters to our patch is kept.

- ``Phi3VForCausalLM`` with the stack at ``.model`` (``Phi3VModel``): a flat config; the stack embeds
  ``input_ids`` itself (image rows through ``vision_embed_tokens``, chosen by ``image_sizes`` entries that are
  not None; ``inputs_embeds`` is ignored), and computes default position ids ``arange(L)`` (padding not
  skipped). It has **no** stack-level rotary embedding.
- Attention: one fused ``qkv_proj`` (``[q | k | v]`` along the output), its **own** ``rotary_emb`` called as
  ``rotary_emb(value, position_ids, seq_len=L)`` with a scaled variant (per-frequency factors and a magnitude
  factor, as Phi-3's "su" scaling does) so a generic rotary would give other numbers; per-class dispatch from
  ``config._attn_implementation`` with the pre-4.48 signature and a 3-tuple return; masks per implementation
  (flash: the 2-D mask or None; eager / sdpa: always a 4-D additive causal mask).
- Gradient checkpointing through ``_gradient_checkpointing_func(layer.__call__, *positional)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pdfkernels.models.architectures import IMAGE_TOKEN_ID

PATCH_DIM = 12  # pixel features per visual token
IMAGE_TOKENS = 4  # visual tokens per image


class Phi3VConfig(PretrainedConfig):
    model_type = "phi3_v_double"

    def __init__(self, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rope_factors=(1.0, 1.5, 2.0, 3.0,
                 4.0, 6.0, 8.0, 12.0), rope_magnitude=1.1, attention_dropout=0.0, sliding_window=2047,
                 rms_norm_eps=1e-5, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.rope_theta, self.rms_norm_eps = num_key_value_heads, rope_theta, rms_norm_eps
        self.rope_factors, self.rope_magnitude = list(rope_factors), rope_magnitude
        self.attention_dropout, self.sliding_window = attention_dropout, sliding_window
        self.image_token_id = IMAGE_TOKEN_ID
        super().__init__(**kwargs)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class ScaledRotary(nn.Module):
    """Per-attention rotary: inverse frequencies divided by per-frequency factors, cos/sin times a magnitude."""

    def __init__(self, dim, config):
        super().__init__()
        self.dim, self.base = dim, config.rope_theta
        self.factors, self.magnitude = config.rope_factors, config.rope_magnitude

    @torch.no_grad()
    def forward(self, x, position_ids, seq_len=None):  # position_ids [B or 1, L] -> cos/sin [B or 1, L, D]
        exponent = torch.arange(0, self.dim, 2, device=x.device).float() / self.dim
        inv_freq = 1.0 / (torch.tensor(self.factors, device=x.device) * self.base ** exponent)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.magnitude).to(x.dtype), (emb.sin() * self.magnitude).to(x.dtype)


class Phi3Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.attention_dropout = config.attention_dropout
        width = (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary_emb = ScaledRotary(self.head_dim, config)

    def _qkv(self, hidden_states, position_ids):
        b, length, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        q_end = self.num_heads * self.head_dim
        k_end = q_end + self.num_key_value_heads * self.head_dim
        q, k, v = (t.view(b, length, -1, self.head_dim).transpose(1, 2)
                   for t in (qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]))
        cos, sin = self.rotary_emb(v, position_ids, seq_len=length)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        groups = self.num_heads // self.num_key_value_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def _attend(self, q, k, v, attention_mask):
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + attention_mask
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False):
        b, length, _ = hidden_states.shape
        out = self._attend(*self._qkv(hidden_states, position_ids), attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), None, past_key_value


class Phi3SdpaAttention(Phi3Attention):
    def _attend(self, q, k, v, attention_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)


class Phi3FlashStyleAttention(Phi3Attention):
    """Gets the 2-D padding mask (or None), as flash-attn's varlen path does."""

    def _attend(self, q, k, v, attention_mask):
        length = q.shape[2]
        visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


ATTENTION_CLASSES = {"eager": Phi3Attention, "sdpa": Phi3SdpaAttention, "flash_attention_2": Phi3FlashStyleAttention}


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, attn_implementation):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[attn_implementation](config, layer_idx)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, **kwargs):
        attn, weights, cache = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_value=past_key_value, output_attentions=output_attentions,
            use_cache=use_cache)
        hidden_states = hidden_states + attn
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden_states)).chunk(2, dim=-1)
        return (hidden_states + self.down_proj(up * F.silu(gate)),)


class Phi3VPreTrained(PreTrainedModel):
    config_class = Phi3VConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def _init_weights(self, module):  # the constructors' defaults are random enough for tests
        pass


class Phi3VModel(Phi3VPreTrained):
    """The vendored stack: it embeds text and images itself; no rotary embedding of its own."""

    def __init__(self, config, attn_implementation=None):
        super().__init__(config)
        self._attn_implementation = attn_implementation or config._attn_implementation
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = nn.Linear(PATCH_DIM, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config, i, self._attn_implementation)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.embed_tokens

    def _embed(self, input_ids, pixel_values, image_sizes):
        rows = []
        for b, size in enumerate(image_sizes):
            row = self.embed_tokens(input_ids[b])
            if size is not None:  # this row has an image: its visual tokens replace the image placeholders
                image = (input_ids[b] == self.config.image_token_id)[:, None]
                row = row.masked_scatter(image, self.vision_embed_tokens(pixel_values[b]).to(row.dtype))
            rows.append(row)
        return torch.stack(rows)

    def _mask(self, attention_mask, hidden):
        if self._attn_implementation == "flash_attention_2":
            return attention_mask if attention_mask is not None and bool((attention_mask == 0).any()) else None
        b, length = hidden.shape[:2]
        visible = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril().expand(b, 1, -1, -1)
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :].bool()
        return torch.zeros(visible.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~visible, torch.finfo(hidden.dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, image_sizes=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None):
        length = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        position_ids = position_ids.view(-1, length).long()
        hidden = self._embed(input_ids, pixel_values, image_sizes)
        mask = self._mask(attention_mask, hidden)
        states = ()
        for layer in self.layers:
            states += (hidden,)
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, mask, position_ids, None, False,
                                                           False)[0]
            else:
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_value=None,
                               output_attentions=False, use_cache=False)[0]
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden,
                                       hidden_states=states + (hidden,) if output_hidden_states else None)


class Phi3VForCausalLM(Phi3VPreTrained):
    def __init__(self, config, attn_implementation=None):
        super().__init__(config)
        self.model = Phi3VModel(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, pixel_values=None, image_sizes=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, *args, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         pixel_values=pixel_values, image_sizes=image_sizes, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, return_dict=True)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states)


def build_phi3v(attn_implementation: str = "sdpa") -> nn.Module:
    return Phi3VForCausalLM(Phi3VConfig(), attn_implementation).eval()


def build_phi3v_inputs(padding: str = "left", batch: int = 3) -> dict:
    """VLM2Vec's Phi-3-V collator layout for a mixed batch: per-row lists of pixel values and image sizes, None
    for text-only rows; rows of different lengths padded on ``padding``."""
    rows, pixels, sizes = [], [], []
    for b in range(batch):
        text = torch.randint(10, 100, (3 + 2 * b,)).tolist()
        if b % 2 == 0:
            rows.append(text[:2] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + text[2:])
            pixels.append(torch.randn(IMAGE_TOKENS, PATCH_DIM))
            sizes.append(torch.tensor([[16, 16]]))
        else:
            rows.append(text)
            pixels.append(None)
            sizes.append(None)
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_sizes": sizes}
