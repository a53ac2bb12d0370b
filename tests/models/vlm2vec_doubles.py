"""Small test doubles of VLM2Vec's model code (written here, not copied): what matters to our patch is kept.

- ``Qwen2VLForConditionalGeneration``: VLM2Vec's vendored Qwen2-VL layout: a flat config (no
  ``text_config``), the text stack at ``model.model`` (``Qwen2VLModel`` with ``embed_tokens``, ``layers``,
  ``rotary_emb``), attention classes picked per layer from ``ATTENTION_CLASSES[config._attn_implementation]``
  with the pre-4.48 signature and 3-tuple return, multimodal rotary handed over as ``[3, B, L, D]``, masks
  prepared per implementation (flash: the 2-D mask or None; sdpa: None or a 4-D additive mask; eager: always
  4-D additive), and gradient checkpointing through ``_gradient_checkpointing_func(layer.__call__, *positional)``.
  On a CPU flash-attn cannot be requested through transformers, so ``attn_implementation`` may be passed to
  the constructor; the flash class is a double computing the same attention from the 2-D mask.
- ``Qwen2_5_VLForConditionalGeneration``: VLM2Vec's vendored Qwen2.5-VL (``src/model/vlm_backbone/qwen2_5_vl``),
  laid out as its Qwen2-VL (flat config, stack ``Qwen2_5_VLModel`` at ``model.model`` with the rotary that
  feeds every layer) except that each attention module also holds a ``rotary_emb`` of its own, unused.
- Phi-3-V: ``phi3v_double.py``.
- ``LlavaNextForConditionalGeneration``: VLM2Vec's vendored LLaVA-NeXT layout: the language model is a
  causal LM of the installed transformers at ``model.language_model`` (no ``model.model``).
- ``MMEBModel``: VLM2Vec's wrapper: ``.encoder``, ``encode_input`` (full model, ``output_hidden_states``,
  then ``_pooling`` with the caller's B-row mask: last position when every row ends real, else mask sum - 1),
  ``gradient_checkpointing_enable`` forwarding to the encoder plus ``enable_input_require_grads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pdfkernels.models.architectures import IMAGE_TOKEN_ID, tiny_llava_next
from tests.models.phi3v_double import Phi3VForCausalLM, build_phi3v, build_phi3v_inputs

PATCH_DIM = 12  # pixel features per visual token
IMAGE_TOKENS = 4  # visual tokens per image


class FlatQwen2VLConfig(PretrainedConfig):
    model_type = "qwen2_vl_double"

    def __init__(self, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, rope_scaling=None,
                 attention_dropout=0.0, use_sliding_window=False, sliding_window=4096, rms_norm_eps=1e-6, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads, self.rope_theta, self.rms_norm_eps = num_key_value_heads, rope_theta, rms_norm_eps
        self.rope_scaling = rope_scaling or {"type": "mrope", "mrope_section": [2, 3, 3]}
        self.attention_dropout, self.use_sliding_window, self.sliding_window = (attention_dropout,
                                                                                use_sliding_window, sliding_window)
        self.image_token_id = IMAGE_TOKEN_ID
        super().__init__(**kwargs)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section):
    """cos/sin ``[3, B, L, D]``: channel sections take temporal, height, width positions in turn."""
    sections = mrope_section * 2
    cos = torch.cat([c[i % 3] for i, c in enumerate(cos.split(sections, dim=-1))], dim=-1).unsqueeze(1)
    sin = torch.cat([s[i % 3] for i, s in enumerate(sin.split(sections, dim=-1))], dim=-1).unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class RotaryDouble(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", 1.0 / config.rope_theta ** (torch.arange(0, dim, 2).float() / dim),
                             persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):  # position_ids [3, B, L] -> cos/sin [3, B, L, D]
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class EagerAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.num_heads, self.num_key_value_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.attention_dropout, self.rope_scaling = config.attention_dropout, config.rope_scaling
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def _qkv(self, hidden_states, position_embeddings):
        b, length, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, length, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_multimodal_rotary_pos_emb(q, k, *position_embeddings, self.rope_scaling["mrope_section"])
        groups = self.num_heads // self.num_key_value_heads
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    def _attend(self, q, k, v, attention_mask):
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : k.shape[-2]]
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None):
        b, length, _ = hidden_states.shape
        q, k, v = self._qkv(hidden_states, position_embeddings)
        out = self._attend(q, k, v, attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), None, past_key_value


class SdpaAttention(EagerAttention):
    def _attend(self, q, k, v, attention_mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)


class FlashStyleAttention(EagerAttention):
    """Gets the 2-D padding mask (or None), as flash-attn's varlen path does."""

    def _attend(self, q, k, v, attention_mask):
        length = q.shape[2]
        visible = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :].bool()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


ATTENTION_CLASSES = {"eager": EagerAttention, "sdpa": SdpaAttention, "flash_attention_2": FlashStyleAttention}


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx, attn_implementation):
        super().__init__()
        self.self_attn = ATTENTION_CLASSES[attn_implementation](config, layer_idx)
        width = config.hidden_size
        self.gate_proj, self.up_proj = nn.Linear(width, config.intermediate_size, bias=False), nn.Linear(
            width, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, width, bias=False)
        self.input_layernorm = nn.RMSNorm(width, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(width, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_value=None,
                output_attentions=False, use_cache=False, cache_position=None, position_embeddings=None, **kwargs):
        attn, weights, cache = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, past_key_value=past_key_value, output_attentions=output_attentions,
            use_cache=use_cache, cache_position=cache_position, position_embeddings=position_embeddings)
        hidden_states = hidden_states + attn
        x = self.post_attention_layernorm(hidden_states)
        return (hidden_states + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)),)


class DoublePreTrained(PreTrainedModel):
    config_class = FlatQwen2VLConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True

    def _init_weights(self, module):  # the constructors' defaults are random enough for tests
        pass


class Qwen2VLModel(DoublePreTrained):
    """The vendored text stack: flat config, per-class attention, masks prepared per implementation."""

    def __init__(self, config, attn_implementation=None):
        super().__init__(config)
        self._attn_implementation = attn_implementation or config._attn_implementation
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, self._attn_implementation)
                                    for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryDouble(config)
        self.gradient_checkpointing = False

    def get_input_embeddings(self):
        return self.embed_tokens

    def _causal_mask(self, attention_mask, embeds):
        if self._attn_implementation == "flash_attention_2":
            return attention_mask if attention_mask is not None and bool((attention_mask == 0).any()) else None
        padded = attention_mask is not None and bool((attention_mask == 0).any())
        if self._attn_implementation == "sdpa" and not padded:
            return None
        b, length = embeds.shape[:2]
        visible = torch.ones(length, length, dtype=torch.bool, device=embeds.device).tril().expand(b, 1, -1, -1)
        if attention_mask is not None:
            visible = visible & attention_mask[:, None, None, :].bool()
        return torch.zeros(visible.shape, dtype=embeds.dtype, device=embeds.device).masked_fill(
            ~visible, torch.finfo(embeds.dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None, *args, **kwargs):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).expand(3, hidden.shape[0], -1)
        mask = self._causal_mask(attention_mask, hidden)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        states = ()
        for layer in self.layers:
            states += (hidden,)
            if self.gradient_checkpointing and self.training:
                hidden = self._gradient_checkpointing_func(layer.__call__, hidden, mask, position_ids, None, False,
                                                           False, None, position_embeddings)[0]
            else:
                hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_value=None,
                               output_attentions=False, use_cache=False, position_embeddings=position_embeddings)[0]
        hidden = self.norm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden,
                                       hidden_states=states + (hidden,) if output_hidden_states else None)


class Qwen2_5_VLModel(Qwen2VLModel):
    def __init__(self, config, attn_implementation=None):
        super().__init__(config, attn_implementation)
        for layer in self.layers:  # as in VLM2Vec's vendored file: a rotary per attention, never called
            layer.self_attn.rotary_emb = RotaryDouble(config)


class Qwen2VLForConditionalGeneration(DoublePreTrained):
    stack_class = Qwen2VLModel

    def __init__(self, config, attn_implementation=None):
        super().__init__(config)
        self.model = self.stack_class(config, attn_implementation)
        self.visual = nn.Linear(PATCH_DIM, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, use_cache=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        embeds = self.model.embed_tokens(input_ids)
        image = input_ids == self.config.image_token_id
        if pixel_values is not None:
            embeds = embeds.masked_scatter(image[..., None], self.visual(pixel_values).to(embeds.dtype))
        # distinct temporal/height/width positions on image tokens, so the mrope sections matter
        text = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        position_ids = torch.stack([text, text + image.long(), text + 2 * image.long()])
        out = self.model(input_ids=None, position_ids=position_ids, attention_mask=attention_mask,
                         inputs_embeds=embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
                         return_dict=True)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), hidden_states=out.hidden_states)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    stack_class = Qwen2_5_VLModel


class LlavaNextForConditionalGeneration(PreTrainedModel):
    """The vendored LLaVA-NeXT layout: ``language_model`` is a causal LM built from the text config."""

    config_class = type(tiny_llava_next())
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.vision_tower = nn.Linear(PATCH_DIM, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)

    def _init_weights(self, module):
        pass

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_sizes=None, use_cache=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image = (input_ids == self.config.image_token_index)[..., None]
            embeds = embeds.masked_scatter(image, self.vision_tower(pixel_values).to(embeds.dtype))
        return self.language_model(attention_mask=attention_mask, inputs_embeds=embeds, use_cache=use_cache,
                                   output_hidden_states=output_hidden_states, return_dict=True)


class MMEBModel(nn.Module):
    def __init__(self, encoder, normalize: bool = False, temperature: float = 0.02):
        super().__init__()
        self.config, self.encoder = encoder.config, encoder
        self.normalize, self.temperature = normalize, temperature

    def encode_input(self, input):
        hidden = self.encoder(**input, return_dict=True, output_hidden_states=True).hidden_states[-1]
        return self._pooling(hidden, input["attention_mask"])

    def _pooling(self, last_hidden_state, attention_mask):
        """VLM2Vec's rule: all rows real at the end -> left padding, position -1; else each row's mask sum - 1
        (the B-row mask indexes the hidden rows, so k·B rows with a right-padded B-row mask fail)."""
        rows = last_hidden_state.shape[0]
        if bool(attention_mask[:, -1].sum() == attention_mask.shape[0]):
            reps = last_hidden_state[torch.arange(rows), -1, :]
        else:
            reps = last_hidden_state[torch.arange(rows), attention_mask.sum(dim=1) - 1]
        return F.normalize(reps, dim=-1) if self.normalize else reps

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        self.encoder.enable_input_require_grads()


def build_double(backbone: str, attn_implementation: str = "sdpa") -> nn.Module:
    if backbone == "vendored-qwen2vl":
        return Qwen2VLForConditionalGeneration(FlatQwen2VLConfig(), attn_implementation).eval()
    if backbone == "vendored-qwen2.5vl":
        return Qwen2_5_VLForConditionalGeneration(FlatQwen2VLConfig(), attn_implementation).eval()
    if backbone == "vendored-phi3v":
        return build_phi3v(attn_implementation)
    if backbone == "vendored-llava-next":
        config = tiny_llava_next("mistral")
        config.text_config._attn_implementation = attn_implementation
        return LlavaNextForConditionalGeneration(config).eval()
    raise ValueError(backbone)


def build_double_inputs(model: nn.Module, padding: str = "left", batch: int = 3) -> dict:
    """Rows alternate image+text and text-only, with different lengths, padded on ``padding``."""
    if isinstance(model, Phi3VForCausalLM):
        return build_phi3v_inputs(padding, batch)
    rows, images = [], 0
    for b in range(batch):
        text = torch.randint(10, 100, (3 + 2 * b,)).tolist()
        if b % 2 == 0:
            rows.append(text[:2] + [IMAGE_TOKEN_ID] * IMAGE_TOKENS + text[2:])
            images += 1
        else:
            rows.append(text)
    length = max(len(r) for r in rows)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(length - len(row), length) if padding == "left" else slice(0, len(row))
        ids[b, span], mask[b, span] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(images * IMAGE_TOKENS, PATCH_DIM)}
