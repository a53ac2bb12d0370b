"""Check the patch against VLM2Vec's real code: ``python scripts/check_vlm2vec_real.py /path/to/VLM2Vec [type ...]``
(model types).

Run it in an environment with VLM2Vec's transformers (4.52.3), e.g. ``.venv-tf452/bin/python``. It loads
VLM2Vec's vendored Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT and Phi-3-V modeling files and the ``MMEBModel`` class of
its ``src/model/model.py`` from the given checkout (their other imports: processors, baselines, are stubbed),
saves tiny random backbones, and follows VLM2Vec's own path: ``MMEBModel.build`` (DoRA; Qwen2-VL / Qwen2.5-VL
with ``flash_attention_2``, Phi-3-V with ``eager``), ``models.apply_pdf``, ``gradient_checkpointing_enable``,
the unchanged ``encode_input`` inside ``use_paths``, a backward after the block has exited. On a CPU flash-attn
cannot run: construction is allowed to pick the flash classes (our forward replaces the text ones; the vision
tower gets VLM2Vec's SDPA class), and the unpatched comparison runs the eager class on the same weights.
Phi-3-V's image embedding hard-codes a CLIP ViT-L/14-336 tower; it is shrunk here to 2 layers (still 1024 wide
on 336-pixel crops, the shapes its HD transform asserts), which the text attention we patch never sees.
Exits non-zero if any check fails. Nothing of VLM2Vec is copied into this repository.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import re
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, PreTrainedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdfkernels import models  # noqa: E402
from pdfkernels.models.anatomy import attention_modules, decoder_stack, hf_model  # noqa: E402
from pdfkernels.models.architectures import IMAGE_TOKEN_ID, tiny_llava_next, tiny_qwen2_5vl, tiny_qwen2vl  # noqa: E402
from tests.models.builders import build_inputs  # noqa: E402
from tests.models.float64_oracle import float64_oracle  # noqa: E402

FILES = {"qwen2_vl_config": "src/model/vlm_backbone/qwen2_vl/configuration_qwen2_vl.py",
         "qwen2_vl": "src/model/vlm_backbone/qwen2_vl/modeling_qwen2_vl.py",
         "qwen2_5_vl_config": "src/model/vlm_backbone/qwen2_5_vl/configuration_qwen2_5_vl.py",
         "qwen2_5_vl": "src/model/vlm_backbone/qwen2_5_vl/modeling_qwen2_5_vl.py",
         "llava_next": "src/model/baseline_backbone/llava_next/modeling_llava_next.py",
         "phi3_v_config": "src/model/baseline_backbone/phi3_v/configuration_phi3_v.py",
         "phi3_v_image": "src/model/baseline_backbone/phi3_v/image_embedding_phi3_v.py",
         "phi3_v": "src/model/baseline_backbone/phi3_v/modeling_phi3_v.py"}
MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava_next", "phi3_v")
# the text attention's eager class (unpatched comparison) and the vision tower's SDPA class, per vendored module
EAGER = {"qwen2_vl": ("Qwen2VLAttention", "VisionSdpaAttention"),
         "qwen2_5_vl": ("Qwen2_5_VLAttention", "Qwen2_5_VLVisionSdpaAttention")}
TARGETS = {"phi3_v": "qkv_proj,o_proj,gate_up_proj,down_proj,k_proj,q_proj,out_proj,v_proj,gate_proj,up_proj"}
PHI3V_IMAGE_TOKENS = 313  # one 336x336 image: 12 x 13 HD-crop features, a separator, 12 x 13 global ones


def _load_vlm2vec(checkout: Path) -> dict:
    """VLM2Vec's modeling modules under their own package names, and its MMEBModel class."""
    stub = types.ModuleType("src.utils.basic_utils")
    stub.print_rank = stub.print_master = lambda message: None
    for name in ("src", "src.utils", "src.model", "src.model.vlm_backbone", "src.model.vlm_backbone.qwen2_vl",
                 "src.model.vlm_backbone.qwen2_5_vl", "src.model.baseline_backbone",
                 "src.model.baseline_backbone.llava_next", "src.model.baseline_backbone.phi3_v"):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    sys.modules["src.utils.basic_utils"] = stub
    loaded = {}
    for key in FILES:
        path = checkout / FILES[key]
        name = FILES[key][:-3].replace("/", ".")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if key == "phi3_v":  # its image embedding's CLIP-L, shrunk in depth (see the module docstring)
            image = loaded["phi3_v_image"]
            image.CLIP_VIT_LARGE_PATCH14_336_CONFIG = image.CLIP_VIT_LARGE_PATCH14_336_CONFIG.__class__(
                **{**image.CLIP_VIT_LARGE_PATCH14_336_CONFIG.to_dict(), "num_hidden_layers": 2})
        spec.loader.exec_module(module)
        loaded[key] = module
    AutoConfig.register("phi3_v", loaded["phi3_v_config"].Phi3VConfig)  # VLM2Vec loads it with trust_remote_code
    qwen = loaded["qwen2_vl"].Qwen2VLForConditionalGeneration
    qwen2_5 = loaded["qwen2_5_vl"].Qwen2_5_VLForConditionalGeneration
    llava = loaded["llava_next"].LlavaNextForConditionalGeneration
    phi3v = loaded["phi3_v"].Phi3VForCausalLM
    source = (checkout / "src/model/model.py").read_text()
    names = dict(torch=torch, nn=torch.nn, dist=torch.distributed, Tensor=torch.Tensor, Dict=dict,
                 PreTrainedModel=PreTrainedModel, AutoModelForCausalLM=transformers.AutoModelForCausalLM,
                 AutoConfig=AutoConfig, LoraConfig=LoraConfig, get_peft_model=get_peft_model, PeftModel=PeftModel,
                 ModelArguments=object, print_master=lambda message: None, VLM_IMAGE_TOKENS={},
                 Phi3VForCausalLM=phi3v, LlavaNextForConditionalGeneration=llava,
                 get_backbone_name=lambda hf_config, model_type=None: hf_config.model_type,
                 backbone2model={"qwen2_vl": qwen, "qwen2_5_vl": qwen2_5, "llava_next": llava, "phi3_v": phi3v})
    # the backbone names as VLM2Vec's processor.py defines them (``PHI3V = 'phi3_v'``, ...); E5_V if absent there
    processor = (checkout / "src/model/processor.py").read_text()
    names.update(re.findall(r"^(\w+) = '(\w+)'", processor, flags=re.M))
    names.setdefault("E5_V", "e5_v")
    exec(compile(source[source.index("class MMEBModel"):], str(checkout / "src/model/model.py"), "exec"), names)
    return {"MMEBModel": names["MMEBModel"], **{model_type: loaded[model_type] for model_type in MODEL_TYPES}}


def _save_tiny(model_type: str, vlm2vec: dict) -> str:
    folder = tempfile.mkdtemp()
    torch.manual_seed(0)
    if model_type in ("qwen2_vl", "qwen2_5_vl"):  # flat, as a real checkpoint's config.json
        tiny, hf_config, cls = {"qwen2_vl": (tiny_qwen2vl(), transformers.Qwen2VLConfig,
                                             vlm2vec["qwen2_vl"].Qwen2VLForConditionalGeneration),
                                "qwen2_5_vl": (tiny_qwen2_5vl(), transformers.Qwen2_5_VLConfig,
                                               vlm2vec["qwen2_5_vl"].Qwen2_5_VLForConditionalGeneration)}[model_type]
        special = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        text = {k: v for k, v in tiny.text_config.to_dict().items() if k not in ("model_type", "architectures",
                                                                                   *special)}
        config = hf_config(**text, vision_config=tiny.vision_config.to_dict(), **{k: getattr(tiny, k) for k in special})
        config._attn_implementation = "eager"
        cls(config).save_pretrained(folder)
    elif model_type == "phi3_v":  # a tiny text model, Phi-3-vision-128k's "su" rotary scaling (factors per frequency)
        head_dim = 16
        config = vlm2vec["phi3_v"].Phi3VConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
            rope_scaling={"type": "su", "short_factor": [1.0 + 0.25 * i for i in range(head_dim // 2)],
                          "long_factor": [2.0 + 0.5 * i for i in range(head_dim // 2)]},
            sliding_window=131072, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            embd_layer={"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
                        "use_hd_transform": True, "with_learnable_separator": True},
            img_processor={"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
                           "name": "clip_vision_model", "num_img_tokens": 144})
        config._attn_implementation = "eager"
        # its stack and image embedding share the token embedding, which safetensors refuses to save twice
        vlm2vec["phi3_v"].Phi3VForCausalLM(config).save_pretrained(folder, safe_serialization=False)
    else:
        config = tiny_llava_next("mistral")
        config._attn_implementation = "eager"
        vlm2vec["llava_next"].LlavaNextForConditionalGeneration(config).save_pretrained(folder)
    return folder


def _inputs(model_type: str, model) -> dict:
    if model_type == "phi3_v":  # VLM2Vec's Phi3V_process_fn: per-row lists, None for text-only rows; right padding
        rows = [[1, 11, 12] + [-1] * PHI3V_IMAGE_TOKENS + [13, 14], [1, 21, 22, 23], [1, 31, 32, 33, 34, 35]]
        length = max(map(len, rows))
        ids, mask = torch.zeros(3, length, dtype=torch.long), torch.zeros(3, length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, :len(row)], mask[b, :len(row)] = torch.tensor(row), 1
        return dict(input_ids=ids, attention_mask=mask, pixel_values=[torch.randn(1, 2, 3, 336, 336), None, None],
                    image_sizes=[torch.tensor([[336, 336]]), None, None])
    if model_type == "llava_next":  # VLM2Vec's collator gives [B, 1, ...]; encode_input squeezes dim 1
        inputs = build_inputs("llava-next-mistral", model, "left")
        pixels = inputs["pixel_values"]
        inputs["pixel_values"] = torch.stack([pixels[0], torch.zeros_like(pixels[0]), pixels[1]]).unsqueeze(1)
        inputs["image_sizes"] = torch.tensor([[16, 32]] * 3).unsqueeze(1)
        return inputs
    image = [7] + [IMAGE_TOKEN_ID] * 4 + [8]  # vision start, 4 merged patches, vision end
    rows = [[11] + image + [13, 14, 15], [21, 22, 23, 24, 25], [31] + image + [33]]
    length = max(map(len, rows))
    ids, mask = torch.zeros(3, length, dtype=torch.long), torch.zeros(3, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):], mask[b, length - len(row):] = torch.tensor(row), 1
    # the vendored forward embeds images per row (a zero grid = no image) but computes rope positions from
    # [images, 3] grids: hand it the positions from its own get_rope_index
    positions = model.get_rope_index(ids, image_grid_thw=torch.tensor([[1, 4, 4]] * 2), attention_mask=mask)[0]
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=torch.randn(3, 16, 96),
                image_grid_thw=torch.tensor([[[1, 4, 4]], [[0, 0, 0]], [[1, 4, 4]]]))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _as_double(value):
    """Floating tensors as float64, also inside dicts and lists (Phi-3-V's per-row pixel values)."""
    if isinstance(value, dict):
        return {k: _as_double(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_double(v) for v in value]
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def check(model_type: str, reentrant: bool, vlm2vec: dict) -> list[tuple[str, float | str, bool | None]]:
    args = SimpleNamespace(model_name=_save_tiny(model_type, vlm2vec), lora=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0,
                           lora_target_modules=TARGETS.get(model_type, "q_proj,k_proj,v_proj,o_proj,down_proj"),
                           pooling="last", normalize=False, temperature=0.02, model_backbone=model_type)
    model = vlm2vec["MMEBModel"].build(args).float()  # VLM2Vec loads bf16; fp32 for tight comparisons
    with torch.no_grad():  # DoRA starts as the identity: perturb the adapters so they matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf = hf_model(model)
    if model_type in EAGER:
        text_eager, vision_sdpa = (getattr(vlm2vec[model_type], name) for name in EAGER[model_type])
        for block in hf.visual.blocks:
            block.attn.__class__ = vision_sdpa
    unpatched = copy.deepcopy(model)
    if model_type in EAGER:
        for attn in attention_modules(decoder_stack(hf_model(unpatched))):
            attn.__class__ = text_eager
        hf_model(unpatched).config._attn_implementation = "eager"
    model.model_backbone = unpatched.model_backbone = model_type
    inputs = _inputs(model_type, hf_model(unpatched))
    rows = [("attention class (information)", type(decoder_stack(hf).layers[0].self_attn).__name__, None),
            ("config._attn_implementation (information)", hf.config._attn_implementation, None)]

    models.apply_pdf(model, num_paths=2, prefix_len=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    with torch.no_grad():
        expected = unpatched.encode_input(dict(inputs))
        with models.use_paths(model, None):
            got = model.encode_input(dict(inputs))
    rows.append(("paths=None vs unpatched (rel)", _rel(got, expected), _rel(got, expected) <= 1e-5))
    prefix = models.pdf_parameters(model)[0]
    reps = []
    for path in (0, 1):
        reference = copy.deepcopy(unpatched)
        reference.encoder = float64_oracle(unpatched.encoder, prefix, path, lambda: inputs["attention_mask"],
                                              attention_modules(decoder_stack(hf))[0]._pdf.outputs)
        with torch.no_grad(), _default_dtype(torch.float64 if model_type == "phi3_v" else torch.get_default_dtype()):
            double = _as_double(inputs)  # (Phi-3-V's 4-D mask is filled with finfo(float64).min in the default dtype)
            expected = reference.encode_input(double)
            with models.use_paths(model, path):
                reps.append(model.encode_input(dict(inputs)))
        error = _rel(reps[-1].double(), expected)
        rows.append((f"path {path} vs float64 reference (rel)", error, error <= 1e-4))
    rows.append(("path 0 vs path 1 (rel)", _rel(reps[0], reps[1]), _rel(reps[0], reps[1]) > 1e-3))
    bindings = [m._pdf for m in attention_modules(decoder_stack(hf))]
    before = sum(b.calls for b in bindings)
    with models.use_paths(model, 1):
        loss = model.encode_input(dict(inputs)).square().sum()
    forward = sum(b.calls for b in bindings) - before
    loss.backward()  # after the block, as VLM2Vec's Trainer
    recompute = sum(b.calls for b in bindings) - before - forward
    rows.append(("recompute calls after use_paths exited", recompute, recompute == forward > 0))
    rows.append(("prefix grad, used path (abs sum)", prefix.grad[:, 1].abs().sum().item(),
                 prefix.grad[:, 1].abs().sum().item() > 0))
    rows.append(("prefix grad, other path (non-zeros)", torch.count_nonzero(prefix.grad[:, 0]).item(),
                 torch.count_nonzero(prefix.grad[:, 0]).item() == 0))
    return rows


def _video_inputs(model) -> dict:
    """A left-padded batch in VLM2Vec's Qwen2-VL collator form: per-row video lists (None without a video), two
    temporal patches of 4 x 4 patches each (8 merged video tokens) per video row."""
    video_id = model.config.video_token_id
    clip = [7] + [video_id] * 8 + [8]
    rows = [[11] + clip + [13, 14], [21, 22, 23, 24], [31] + clip + [33]]
    length = max(map(len, rows))
    ids, mask = torch.zeros(3, length, dtype=torch.long), torch.zeros(3, length, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):], mask[b, length - len(row):] = torch.tensor(row), 1
    grids = [torch.tensor([[2, 4, 4]]), None, torch.tensor([[2, 4, 4]])]
    positions = model.get_rope_index(ids, video_grid_thw=torch.tensor([[2, 4, 4]] * 2), attention_mask=mask)[0]
    return dict(input_ids=ids, attention_mask=mask, position_ids=positions,
                pixel_values_videos=[torch.randn(32, 96), None, torch.randn(32, 96)], video_grid_thw=grids)


def check_video(vlm2vec: dict) -> list[tuple[str, float | str, bool | None]]:
    """Qwen2-VL: a video batch through the unchanged ``encode_input`` inside ``use_paths(model, [0, 1])`` gives
    path-major rows equal to each single-path call (the vision tower runs once on the videos)."""
    args = SimpleNamespace(model_name=_save_tiny("qwen2_vl", vlm2vec), lora=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, lora_target_modules="q_proj,k_proj,v_proj,o_proj,down_proj",
                           pooling="last", normalize=False, temperature=0.02, model_backbone="qwen2_vl")
    model = vlm2vec["MMEBModel"].build(args).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf = hf_model(model)
    for block in hf.visual.blocks:
        block.attn.__class__ = getattr(vlm2vec["qwen2_vl"], EAGER["qwen2_vl"][1])
    model.model_backbone = "qwen2_vl"
    models.apply_pdf(model, num_paths=2, prefix_len=3)
    model.eval()
    inputs = _video_inputs(hf)
    calls = []
    handle = hf.visual.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        with models.use_paths(model, [0, 1]):
            both = model.encode_input(dict(inputs))
        visual_calls = len(calls)
        single = []
        for path in (0, 1):
            with models.use_paths(model, path):
                single.append(model.encode_input(dict(inputs)))
        plain = dict(inputs, pixel_values_videos=[torch.randn(32, 96), None, torch.randn(32, 96)])
        with models.use_paths(model, 0):
            other_video = model.encode_input(plain)
    handle.remove()
    rows = [("video: [k*B, d] rows of use_paths([0, 1])", str(tuple(both.shape)), both.shape[0] == 6),
            ("video: vision tower calls for two paths", visual_calls, visual_calls == 1)]
    for path in (0, 1):
        error = _rel(both[3 * path:3 * path + 3], single[path])
        rows.append((f"video: path {path} rows vs single-path call (rel)", error, error <= 1e-5))
    changed = _rel(other_video[[0, 2]], single[0][[0, 2]])
    rows.append(("video: other frames change the video rows (rel)", changed, changed > 1e-3))
    unchanged = _rel(other_video[1], single[0][1])
    rows.append(("video: the text-only row does not change (rel)", unchanged, unchanged <= 1e-6))
    return rows


def main() -> int:
    wrong_types = set(sys.argv[2:]) - set(MODEL_TYPES)
    if len(sys.argv) < 2 or not (Path(sys.argv[1]) / "src/model/model.py").is_file() or wrong_types:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    vlm2vec = _load_vlm2vec(Path(sys.argv[1]))
    failed = 0
    # no flash-attn on a CPU: let VLM2Vec's flash_attention_2 construction through (see the module docstring)
    PreTrainedModel._check_and_enable_flash_attn_2 = classmethod(lambda cls, config, *args, **kwargs: config)
    print(f"transformers {transformers.__version__}\n")
    print("| model | checkpointing | check | value | ok |\n|---|---|---|---|---|")
    for model_type in sys.argv[2:] or MODEL_TYPES:
        for reentrant in (True, False):
            for name, value, ok in check(model_type, reentrant, vlm2vec):
                value = f"{value:.2e}" if isinstance(value, float) else value
                status = "–" if ok is None else "ok" if ok else "FAIL"
                mode = "reentrant" if reentrant else "non-reentrant"
                print(f"| {model_type} | {mode} | {name} | {value} | {status} |")
                failed += ok is False
    if "qwen2_vl" in (sys.argv[2:] or MODEL_TYPES):
        for name, value, ok in check_video(vlm2vec):
            value = f"{value:.2e}" if isinstance(value, float) else value
            status = "–" if ok is None else "ok" if ok else "FAIL"
            print(f"| qwen2_vl | – | {name} | {value} | {status} |")
            failed += ok is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
