"""VLM2Vec's way of building and calling models, on Hugging Face classes and on doubles of VLM2Vec's vendored
Qwen2-VL / Qwen2.5-VL / LLaVA-NeXT / Phi-3-V: DoRA (as VLM2Vec wraps its backbone), inside ``MMEBModel``,
gradient checkpointing on (reentrant and not), the unchanged ``encode_input`` inside ``use_paths``. Runs on
every supported transformers release (the main CI run and ``scripts/compat-tf452.sh``)."""

import copy

import pytest
import torch

from pdfkernels import models
from pdfkernels.models.anatomy import attention_modules, decoder_stack, hf_model
from tests.models.builders import BACKBONES, build_inputs, build_model
from tests.models.float64_oracle import float64_oracle
from tests.models.vlm2vec_doubles import MMEBModel, build_double, build_double_inputs

peft = pytest.importorskip("peft")

_QWEN3VL = next(k for k in BACKBONES if getattr(k, "values", None) == ("qwen3vl",))  # skips where it is missing
CASES = [("qwen2vl", None), ("qwen2.5vl", None), pytest.param(*_QWEN3VL.values, None, marks=_QWEN3VL.marks),
         ("llava-next-mistral", None), ("vendored-qwen2vl", "flash_attention_2"),
         ("vendored-qwen2vl", "sdpa"), ("vendored-qwen2vl", "eager"), ("vendored-qwen2.5vl", "flash_attention_2"),
         ("vendored-qwen2.5vl", "sdpa"), ("vendored-phi3v", "flash_attention_2"), ("vendored-phi3v", "sdpa"),
         ("vendored-phi3v", "eager"), ("vendored-llava-next", "sdpa"), ("vendored-llava-next", "eager")]
# VLM2Vec's text targets; qkv_proj is Phi-3-V's fused projection (in VLM2Vec's default lora_target_modules)
VLM2VEC_TARGETS = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "down_proj"]

VENDORED = ["vendored-qwen2vl", "vendored-qwen2.5vl", "vendored-phi3v", "vendored-llava-next"]


def _build(backbone, impl):
    if backbone.startswith("vendored"):
        model = build_double(backbone, impl)
        return model, build_double_inputs(model, "left")
    model = build_model(backbone)
    return model, build_inputs(backbone, model, "left")


def _dora(model):
    """VLM2Vec's adapter: DoRA, gaussian init; the B matrices are then perturbed so the adapters matter."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=VLM2VEC_TARGETS, init_lora_weights="gaussian",
                             use_dora=True, inference_mode=False)
    model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _as_double(value):
    """Floating tensors as float64, also inside dicts and lists (Phi-3-V's per-row pixel values)."""
    if isinstance(value, dict):
        return {k: _as_double(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_double(v) for v in value]
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _outputs(model):
    """How many values the patched model's decoder layers unpack from their attention."""
    return attention_modules(decoder_stack(hf_model(model)))[0]._pdf.outputs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _attention_calls(model):
    return sum(m._pdf.calls for m in attention_modules(decoder_stack(hf_model(model))))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("backbone, impl", CASES)
def test_vlm2vec_flow(backbone, impl, reentrant):
    torch.manual_seed(0)
    base, inputs = _build(backbone, impl)
    base.config.use_cache = False  # as MMEBModel.build does
    encoder = _dora(base)
    plain = MMEBModel(copy.deepcopy(encoder))
    model = MMEBModel(encoder)
    models.apply_pdf(model, num_paths=2, prefix_len=3)  # after peft, as a VLM2Vec user would
    prefix = models.pdf_parameters(model)[0]
    assert prefix.requires_grad
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()

    with torch.no_grad():
        expected = plain.encode_input(inputs)
        with models.use_paths(model, None):
            got = model.encode_input(inputs)
    assert _rel(got, expected) <= 1e-5, "paths=None must equal the unpatched model"

    reps = []
    for path in (0, 1):
        reference = MMEBModel(float64_oracle(plain.encoder, prefix, path, lambda: inputs["attention_mask"],
                                                       _outputs(model)))
        with torch.no_grad():
            expected = reference.encode_input(_as_double(inputs))
            with models.use_paths(model, path):
                reps.append(model.encode_input(inputs))
        assert _rel(reps[-1].double(), expected) <= 1e-4, f"path {path}"
    assert _rel(reps[0], reps[1]) > 1e-3, "the two paths must differ"

    grads = []
    for checkpointing in (True, False):
        if not checkpointing:
            model.encoder.gradient_checkpointing_disable()
        prefix.grad = None
        before = _attention_calls(model)
        with models.use_paths(model, 1):
            loss = model.encode_input(inputs).square().sum()
        forward_calls = _attention_calls(model) - before
        loss.backward()  # after the use_paths block, as a Hugging Face Trainer's backward runs
        recompute_calls = _attention_calls(model) - before - forward_calls
        assert recompute_calls == (forward_calls if checkpointing else 0)
        grads.append(prefix.grad.clone())
    assert grads[0][:, 1].abs().sum() > 0, "the used path's prefix must get gradients"
    assert torch.count_nonzero(grads[0][:, 0]) == 0, "the other path's prefix must get none"
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backbone", VENDORED)
def test_vendored_k_paths_in_one_call_equal_single_calls(backbone):
    torch.manual_seed(0)
    base, inputs = _build(backbone, "sdpa")
    model = models.apply_pdf(MMEBModel(base), num_paths=3, prefix_len=2)  # MMEBModel without peft
    with torch.no_grad():
        together = models.encode(model, inputs, [2, 0])
        singles = torch.stack([models.encode(model, inputs, p)[0] for p in (2, 0)])
        with models.use_paths(model, 2):
            pooled = model.encode_input(inputs)
    assert _rel(together, singles) <= 1e-5
    assert _rel(pooled, singles[0]) <= 1e-6


def test_a_patch_the_decoder_never_calls_is_refused():
    model = build_double("vendored-qwen2vl")
    layer = model.model.layers[1]
    layer.forward = lambda hidden_states, *args, **kwargs: (hidden_states,)  # a layer that bypasses self_attn
    inputs = build_double_inputs(model)
    with torch.no_grad():
        before = model(**inputs, output_hidden_states=True).hidden_states[-1]
    with pytest.raises(RuntimeError, match=r"patch is not live.*layers \[1\]"):
        models.apply_pdf(model, num_paths=2, prefix_len=2)
    assert not hasattr(model, "pdf_prefix") and not any(hasattr(m, "_pdf") for m in model.modules())
    with torch.no_grad():  # left as it was: unpatched, and patchable once the layer is fixed
        assert torch.equal(model(**inputs, output_hidden_states=True).hidden_states[-1], before)
    del layer.forward
    models.apply_pdf(model, num_paths=2, prefix_len=2)


def test_a_dry_forward_that_fails_is_reported():
    model = build_double("vendored-qwen2vl")
    model.model.layers[0].forward = lambda *args, **kwargs: (_ for _ in ()).throw(ValueError("broken layer"))
    with pytest.raises(RuntimeError, match="dry forward of the patched language model failed.*broken layer"):
        models.apply_pdf(model, num_paths=2, prefix_len=2)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("backbone", VENDORED)
def test_every_path_through_the_unchanged_encode_input(backbone, padding):
    """``encode_input`` inside ``use_paths(model, [2, 0])``: k·B rows, path-major, each path's rows equal to its
    single-path call, whichever side the batch is padded on (VLM2Vec pools with its B-row mask)."""
    torch.manual_seed(0)
    base = build_double(backbone, "sdpa")
    inputs = build_double_inputs(base, padding, batch=4)
    model = models.apply_pdf(MMEBModel(_dora(base)), num_paths=3, prefix_len=2)
    with torch.no_grad():
        with models.use_paths(model, [2, 0]):
            together = model.encode_input(inputs)
        singles = []
        for path in (2, 0):
            with models.use_paths(model, path):
                singles.append(model.encode_input(inputs))
        last = models.encode(model, inputs, [2, 0])  # our own last-token pooling, left or right
    assert together.shape == (2 * 4, singles[0].shape[-1])
    torch.testing.assert_close(together, torch.cat(singles), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together, last.reshape(8, -1), rtol=1e-5, atol=1e-6)
    assert _rel(singles[0], singles[1]) > 1e-3


def test_a_bf16_backbone_prefix_is_an_fp32_master_that_trains():
    """VLM2Vec loads its backbone in bf16: the prefix stays an fp32 master copy, read in bf16 by the attention,
    and a few AdamW steps at the paper's lr 2e-5 move every one of its elements (a bf16 prefix of this scale
    barely moves: its spacing is ~1e-3)."""
    torch.manual_seed(0)
    base = build_double("vendored-qwen2vl", "sdpa").to(torch.bfloat16)
    inputs = build_double_inputs(base, "right", batch=3)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)  # as VLM2Vec's processor casts them
    model = models.apply_pdf(MMEBModel(base), num_paths=2, prefix_len=3)
    prefix = models.pdf_parameters(model)[0]
    assert prefix.dtype == torch.float32 and base.model.embed_tokens.weight.dtype == torch.bfloat16
    start = prefix.detach().clone()
    optimizer = torch.optim.AdamW([prefix], lr=2e-5)
    for _ in range(3):
        optimizer.zero_grad()
        with models.use_paths(model, [0, 1]):
            reps = model.encode_input(inputs)
        assert reps.dtype == torch.bfloat16
        reps.float().square().sum().backward()
        assert prefix.grad.dtype == torch.float32
        optimizer.step()
    assert bool((prefix.detach() != start).all()), "every prefix element must change"


def test_phi3v_recompute_keeps_its_paths_when_the_caller_reuses_its_position_ids():
    """Phi-3-V's paths ride on the storage of the position ids: a second forward with another path and the same
    caller tensor must not retag the first forward's reentrant recompute."""
    torch.manual_seed(0)
    model = build_double("vendored-phi3v", "sdpa")
    inputs = build_double_inputs(model)
    models.apply_pdf(model, num_paths=2, prefix_len=2)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model.train()
    positions = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0)
    with models.use_paths(model, 0):
        first = model(**inputs, position_ids=positions, output_hidden_states=True).hidden_states[-1].square().sum()
    with models.use_paths(model, 1):
        model(**inputs, position_ids=positions, output_hidden_states=True)
    first.backward()
    assert model.pdf_prefix.grad[:, 0].abs().sum() > 0
    assert torch.count_nonzero(model.pdf_prefix.grad[:, 1]) == 0, "the recompute must use its own forward's path"
