"""apply_pdf / use_paths / encode on tiny random models of every supported type (CPU, fp32)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pdfkernels import models, settings
from pdfkernels.models.anatomy import attention_modules, decoder_stack, hf_model, vision_tower
from pdfkernels.models.patch import last_token
from tests.models.builders import BACKBONES, build_inputs, build_model, mm_token_types
from tests.models.float64_oracle import float64_oracle


def _pooled_unpatched(model, inputs):
    with torch.no_grad():
        hidden = models.patch.inner_model(model)(**inputs, use_cache=False).last_hidden_state
    return last_token(hidden, inputs["attention_mask"])


def _outputs(model):
    """How many values the patched model's decoder layers unpack from their attention."""
    return attention_modules(decoder_stack(hf_model(model)))[0]._pdf.outputs


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(params=BACKBONES)
def backbone(request):
    return request.param


@pytest.mark.parametrize("padding", ["left", "right"])
def test_no_prefix_equals_unpatched(backbone, padding):
    model = build_model(backbone)
    inputs = build_inputs(backbone, model, padding)
    expected = _pooled_unpatched(model, inputs)
    models.apply_pdf(model, num_paths=2, prefix_len=4)
    with torch.no_grad():
        got = models.encode(model, inputs, None)
    assert got.shape == (1, *expected.shape)
    assert _rel(got[0], expected) <= 1e-6


@pytest.mark.parametrize("padding", ["left", "right"])
def test_single_path_equals_float64_concatenated_prefix_reference(backbone, padding):
    model = build_model(backbone)
    inputs = build_inputs(backbone, model, padding)
    unpatched = copy.deepcopy(model)
    models.apply_pdf(model, num_paths=3, prefix_len=5)
    double = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    for path in range(3):
        reference = float64_oracle(unpatched, model.pdf_prefix, path, lambda: inputs["attention_mask"],
                                      _outputs(model))
        expected = _pooled_unpatched(reference, double)
        with torch.no_grad():
            got = models.encode(model, inputs, path)[0]
        assert _rel(got.double(), expected) <= 1e-5, f"path {path}"


def test_k_paths_in_one_call_equal_single_calls_and_run_vision_once(backbone):
    model = models.apply_pdf(build_model(backbone), num_paths=3, prefix_len=4)
    inputs = build_inputs(backbone, model, "left")
    calls = []
    vision_tower(model).register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        together = models.encode(model, inputs, [2, 0, 1])
        assert len(calls) == 1, "the vision tower must run once for all paths"
        singles = [models.encode(model, inputs, p)[0] for p in (2, 0, 1)]
    assert together.shape[0] == 3
    for got, expected in zip(together, singles):
        assert _rel(got, expected) <= 1e-5
    assert _rel(together[0], together[1]) > 1e-3, "different prefixes must give different embeddings"


def test_vlm2vec_calling_pattern_gives_single_prefix_embedding(backbone):
    """VLM2Vec calls the full model with output_hidden_states=True and pools the last token (left padding)."""
    model = models.apply_pdf(build_model(backbone), num_paths=2, prefix_len=4)
    inputs = build_inputs(backbone, model, "left")
    with models.use_paths(model, 0), torch.no_grad():
        out = model(**inputs, output_hidden_states=True)  # unchanged VLM2Vec code
        reps = out.hidden_states[-1][:, -1, :]
    with torch.no_grad():
        expected = models.encode(model, inputs, 0)[0]
    assert _rel(reps, expected) <= 1e-6


def test_gradients_reach_prefix_lora_and_aggregator(backbone):
    peft = pytest.importorskip("peft")
    model = models.apply_pdf(build_model(backbone), num_paths=2, prefix_len=4)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)",
                             use_dora=True)
    model = peft.get_peft_model(model, config)
    models.mark_pdf_trainable(model)  # peft froze everything but its adapters
    model.train()
    inputs = build_inputs(backbone, model, "right")
    embeddings = models.encode(model, inputs, [0, 1])
    aggregator = models.Aggregator(embeddings.shape[-1], 2)
    aggregator(embeddings).square().sum().backward()
    prefix = models.pdf_parameters(model)[0]
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is not None for p in aggregator.parameters())


def test_peft_before_patch_works():
    peft = pytest.importorskip("peft")
    base = build_model("qwen2vl")
    inputs = build_inputs("qwen2vl", base, "left")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    models.apply_pdf(model, num_paths=2, prefix_len=3)
    assert models.pdf_parameters(model)[0].requires_grad
    model.train()
    models.encode(model, inputs, 1).sum().backward()
    assert models.pdf_parameters(model)[0].grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=3)
        inputs = build_inputs("qwen2vl", model, "left")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        models.encode(model, inputs, [0, 1]).square().sum().backward()
        grads.append(models.pdf_parameters(model)[0].grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_triton_backend_matches_torch_path(backbone, monkeypatch):
    if backbone == "qwen2.5vl":
        pytest.skip("the same text attention shapes as qwen2vl: the interpreted kernels would add time, not cover more")
    model = models.apply_pdf(build_model(backbone), num_paths=2, prefix_len=4)
    inputs = build_inputs(backbone, model, "left")
    with torch.no_grad():
        expected = models.encode(model, inputs, [0, 1])
        monkeypatch.setenv(settings.BACKEND.name, "triton")
        got = models.encode(model, inputs, [0, 1])
    assert _rel(got, expected) <= 1e-4


def test_unsupported_model_is_refused_with_the_list():
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(TypeError, match="LlamaForCausalLM is not supported; supported: Qwen2VLForConditional") as info:
        models.apply_pdf(LlamaForCausalLM(config))
    assert all(name in str(info.value) for name in models.SUPPORTED)


@pytest.mark.parametrize("paths", [2, [0, 5], [], "0"])
def test_bad_paths_are_refused(paths):
    model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=3)
    with pytest.raises(ValueError, match="argument 'paths' expected"):
        models.encode(model, build_inputs("qwen2vl", model), paths)


def test_prefix_parameter_shape_dtype_and_distinct_paths():
    model = build_model("llava-next-mistral").to(torch.float64)
    models.apply_pdf(model, num_paths=3, prefix_len=7)
    cfg = model.config.text_config
    assert model.pdf_prefix.shape == (cfg.num_hidden_layers, 3, 2, cfg.num_key_value_heads, 7,
                                      cfg.hidden_size // cfg.num_attention_heads)
    assert model.pdf_prefix.dtype == torch.float64
    assert not torch.equal(model.pdf_prefix[:, 0], model.pdf_prefix[:, 1])
    text = set(attention_modules(decoder_stack(model)))
    assert all(hasattr(m, "_pdf") for m in text)
    assert not any(hasattr(m, "_pdf") for m in vision_tower(model).modules()), "the vision tower stays untouched"


def test_k_paths_when_batch_equals_sequence_length():
    """A batch of B rows of length L = B once looked like rope ids [3|4, B, L] to the input repetition."""
    model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=3)
    ids = torch.randint(10, 100, (4, 4))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **mm_token_types(model, ids)}
    with torch.no_grad():
        together = models.encode(model, inputs, [0, 1])
        singles = torch.stack([models.encode(model, inputs, p)[0] for p in (0, 1)])
    assert _rel(together, singles) <= 1e-5


def test_a_deep_copy_of_a_patched_model_uses_its_own_prefix():
    model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=3)
    inputs = build_inputs("qwen2vl", model, "left")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        before = models.encode(model, inputs, 0)
        twin.pdf_prefix.mul_(3.0)
        assert torch.equal(models.encode(model, inputs, 0), before), "the original must not see the copy's prefix"
        assert _rel(models.encode(twin, inputs, 0), before) > 1e-3
        with models.use_paths(twin, None):  # the copy's paths are its own too
            assert torch.equal(models.encode(model, inputs, 0), before)


def test_a_sliding_window_shorter_than_the_sequence_is_refused():
    model = build_model("llava-next-mistral")
    models.text_config(model).sliding_window = 4  # the config the text layers read
    models.apply_pdf(model, num_paths=2, prefix_len=2)  # the two-token dry forward fits the window
    inputs = build_inputs("llava-next-mistral", model, "left")
    with pytest.raises(NotImplementedError, match="sliding window"), torch.no_grad():
        models.encode(model, inputs, 0)


def test_path_ids_are_built_once_per_forward_on_the_device(monkeypatch):
    """Every layer reads the one path-id tensor its forward built (not one per layer from the tuple)."""
    from pdfkernels.models import attention

    model = models.apply_pdf(build_model("qwen2vl"), num_paths=2, prefix_len=3)
    inputs = build_inputs("qwen2vl", model, "left")
    built, seen = [], []
    original_ids, original_attention = attention.path_ids_for, attention.prefix_attention_known_paths

    def counting_ids(*args):
        built.append(original_ids(*args))
        return built[-1]

    def recording_attention(q, k, v, pk, pv, path_ids, **kwargs):
        seen.append(path_ids)
        return original_attention(q, k, v, pk, pv, path_ids, **kwargs)

    monkeypatch.setattr(attention, "path_ids_for", counting_ids)
    monkeypatch.setattr(attention, "prefix_attention_known_paths", recording_attention)
    with torch.no_grad():
        models.encode(model, inputs, [1, 0])
    layers = len(attention_modules(decoder_stack(hf_model(model))))
    assert len(built) == 1 and len(seen) == layers >= 2
    assert all(ids is built[0][0] for ids in seen)
    batch = inputs["input_ids"].shape[0]
    assert built[0][0].tolist() == [1] * batch + [0] * batch and built[0][1] is True
