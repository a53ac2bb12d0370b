"""save_pdf / load_pdf: one safetensors file, round trip, and refusal of a model of another shape."""

import pytest
import torch

from pdfkernels import models
from tests.models.builders import build_model


def _patched(backbone="qwen2vl", num_paths=2, prefix_len=3, seed=0):
    return models.apply_pdf(build_model(backbone), num_paths=num_paths, prefix_len=prefix_len, seed=seed)


def test_round_trip_restores_prefix_aggregator_and_estimator(tmp_path):
    source = _patched(seed=1)
    aggregator, estimator = models.Aggregator(64, 2), models.VCLUB(64)
    path = tmp_path / "pdf.safetensors"
    models.save_pdf(path, source, aggregator, estimator)

    target = _patched(seed=2)
    aggregator2, estimator2 = models.Aggregator(64, 2), models.VCLUB(64)
    assert not torch.equal(target.pdf_prefix, source.pdf_prefix)
    stored = models.load_pdf(path, target, aggregator2, estimator2)
    assert stored["num_paths"] == 2 and stored["prefix_len"] == 3
    assert stored["model_type"] == "Qwen2VLForConditionalGeneration"
    assert torch.equal(target.pdf_prefix, source.pdf_prefix)
    for a, b in zip(aggregator.state_dict().values(), aggregator2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(estimator.state_dict().values(), estimator2.state_dict().values()):
        assert torch.equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == ["pdf.safetensors"]  # no temporary file left


@pytest.mark.parametrize("other", [dict(num_paths=3), dict(prefix_len=4), dict(backbone="llava")])
def test_loading_into_another_shape_is_refused(tmp_path, other):
    path = tmp_path / "pdf.safetensors"
    models.save_pdf(path, _patched())
    with pytest.raises(ValueError, match="does not fit this model"):
        models.load_pdf(path, _patched(**other))


def test_missing_module_weights_are_refused(tmp_path):
    path = tmp_path / "pdf.safetensors"
    models.save_pdf(path, _patched())
    with pytest.raises(ValueError, match="holds no aggregator weights"):
        models.load_pdf(path, _patched(), aggregator=models.Aggregator(64, 2))


@pytest.mark.parametrize("module", ["aggregator", "estimator"])
def test_a_module_of_another_shape_is_refused_before_anything_is_loaded(tmp_path, module):
    path = tmp_path / "pdf.safetensors"
    models.save_pdf(path, _patched(seed=1), models.Aggregator(64, 2), models.VCLUB(64))
    target = _patched(seed=2)
    prefix = target.pdf_prefix.detach().clone()
    wrong = {"aggregator": models.Aggregator(64, 3), "estimator": models.VCLUB(32)}[module]
    untouched = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(ValueError, match=f"the {module} weights in .* do not fit"):
        models.load_pdf(path, target, **{module: wrong})
    assert torch.equal(target.pdf_prefix, prefix), "the prefix must not be overwritten by a refused load"
    assert all(torch.equal(v, untouched[k]) for k, v in wrong.state_dict().items())


def _rewritten(tmp_path, change):
    """A genuine save_pdf file with its tensors changed by ``change(tensors)`` (the description kept)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = tmp_path / "pdf.safetensors"
    models.save_pdf(path, _patched(seed=1), models.Aggregator(64, 2))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("case", ["one-path", "scalar", "int", "missing"])
def test_a_prefix_tensor_of_another_shape_or_dtype_is_refused_before_anything_is_loaded(tmp_path, case):
    def change(tensors):  # issue 21, item 5
        prefix = tensors["prefix"]
        if case == "one-path":  # copy_ would broadcast it into every path
            tensors["prefix"] = prefix.narrow(1 if prefix.shape[1] == 2 else 0, 0, 1).contiguous()
        elif case == "scalar":
            tensors["prefix"] = torch.tensor(0.5)
        elif case == "int":
            tensors["prefix"] = prefix.round().to(torch.int32)
        else:
            del tensors["prefix"]

    path = _rewritten(tmp_path, change)
    target = _patched(seed=2)
    before = target.pdf_prefix.detach().clone()
    with pytest.raises(ValueError, match=r"the prefix in .* does not fit this model \(file .*, model "):
        models.load_pdf(path, target)
    assert torch.equal(target.pdf_prefix, before)


def test_module_weights_of_an_integer_dtype_are_refused(tmp_path):
    def change(tensors):
        name = next(k for k in tensors if k.startswith("aggregator."))
        tensors[name] = tensors[name].round().to(torch.int64)

    path = _rewritten(tmp_path, change)
    with pytest.raises(ValueError, match=r"aggregator weights .* do not fit .* int64"):
        models.load_pdf(path, _patched(seed=2), models.Aggregator(64, 2))
