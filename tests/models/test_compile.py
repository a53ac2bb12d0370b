"""``torch.compile(fullgraph=True)`` of ``models.encode`` on the tiny Qwen2-VL and LLaVA-NeXT (CPU, backends
``eager`` and ``aot_eager``): one path, two paths and no prefix, forward and backward equal to eager; and the
number of compilations across batches of different lengths (dynamic shapes). Text rows, padded: with images,
transformers' own vision and rope-index code breaks the graph (docs/compile.md), none of ours."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from pdfkernels import models

from .builders import build_model, mm_token_types

KINDS = ["qwen2vl", "llava-next-mistral"]


def _text_batch(model, lengths: list[int]) -> dict:
    """Left-padded text rows of the given lengths."""
    length = max(lengths)
    ids = torch.zeros(len(lengths), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, length - n:] = torch.randint(10, 100, (n,))
        mask[b, length - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, **mm_token_types(model, ids)}


@pytest.fixture(scope="module", params=KINDS)
def model(request):
    return models.apply_pdf(build_model(request.param), num_paths=2, prefix_len=3)


def _loss_and_grads(fn, model, inputs):
    model.zero_grad(set_to_none=True)
    out = fn(inputs)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    prefix = models.pdf_parameters(model)[0]
    some_weight = next(p for n, p in model.named_parameters() if "q_proj" in n)
    grads = [None if p.grad is None else p.grad.clone() for p in (prefix, some_weight)]
    return out.detach(), weights, grads


@pytest.mark.parametrize("paths,backend_name",
                         [([0, 1], "eager"), (1, "eager"), (None, "eager"), ([0, 1], "aot_eager")],
                         ids=["two-paths", "one-path", "no-prefix", "two-paths-aot"])
def test_encode_compiles_in_one_graph_and_equals_eager(model, paths, backend_name):
    torch._dynamo.reset()
    inputs = _text_batch(model, [5, 7, 3])

    def encode(inputs):
        return models.encode(model, inputs, paths)

    torch.manual_seed(1)
    expected, _, expected_grads = _loss_and_grads(encode, model, inputs)
    torch.manual_seed(1)  # the same upstream weights
    got, _, got_grads = _loss_and_grads(torch.compile(encode, backend=backend_name, fullgraph=True), model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if paths is None:
        assert expected_grads[0] is None and got_grads[0] is None  # no prefix: the prefix gets no gradient
    for g, e in zip(got_grads, expected_grads):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_batches_of_new_lengths_do_not_recompile_each_time(model):
    """Lengths 4 to 9, batch sizes 2 and 3 (12 shapes): Dynamo compiles the first shape, then once per dimension
    that changes (batch, length) as it marks it dynamic, and never again after those first three shapes."""
    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    encode = torch.compile(lambda inputs: models.encode(model, inputs, [0, 1]), backend=counting, fullgraph=True)
    compiled_at = []
    with torch.no_grad():
        for shape, (length, batch) in enumerate((n, b) for n in range(4, 10) for b in (2, 3)):
            inputs = _text_batch(model, [length] + [max(2, length - 2)] * (batch - 1))
            before = len(graphs)
            torch.testing.assert_close(encode(inputs), models.encode(model, inputs, [0, 1]), rtol=1e-5, atol=1e-5)
            compiled_at += [shape] * (len(graphs) - before)
    assert compiled_at and max(compiled_at) <= 2 and len(compiled_at) <= 3, (
        f"compilations at shapes {compiled_at} of 12 (lengths 4-9 x batch 2, 3)")
