"""torch.compile on the CPU: graph breaks (``torch._dynamo.explain``) of each op and of ``models.encode`` on the tiny
Qwen2-VL and LLaVA-NeXT, and eager vs compiled (backend ``eager`` and ``aot_eager``) time of the tiny Qwen2-VL's
two-path encode, median of ``--repeats`` runs each, interleaved in one run.

    OMP_NUM_THREADS=1 PYTHONPATH=. python scripts/compile_bench.py [--repeats 30] [--skip-timing]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
from transformers import LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration

import pdfkernels
from pdfkernels import models
from pdfkernels.models.architectures import tiny_llava_next, tiny_qwen2vl


def text_inputs(model, batch: int, length: int) -> dict:
    ids = torch.randint(10, 100, (batch, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(model, Qwen2VLForConditionalGeneration):
        inputs["mm_token_type_ids"] = torch.zeros_like(ids)  # transformers 5.x
    return inputs


def build(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if backbone == "qwen2vl":
        model = Qwen2VLForConditionalGeneration(tiny_qwen2vl())
    else:
        model = LlavaNextForConditionalGeneration(tiny_llava_next("mistral"))
    return models.apply_pdf(model.eval(), num_paths=2, prefix_len=4)


def op_cases() -> dict:
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    pk, pv, ids = torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), torch.tensor([0, 1])
    tq, tk = torch.randn(10, 4, 16), torch.randn(10, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    y, mu, lv = torch.randn(3, 2, 5, 8).unbind(0)
    return {
        "prefix_attention": (lambda: pdfkernels.prefix_attention(q, k, v, pk, pv, ids)),
        "prefix_attention_varlen": (lambda: pdfkernels.prefix_attention_varlen(tq, tk, tk, pk, pv, cu, 6, ids)),
        "mim_loss": (lambda: pdfkernels.mim_loss(y, mu, lv)),
        "estimator_nll": (lambda: pdfkernels.estimator_nll(y, mu, lv)),
        "gaussian_loglik_pairwise": (lambda: pdfkernels.gaussian_loglik_pairwise(y[0], mu[0], lv[0])),
    }


def breaks(fn) -> str:
    torch._dynamo.reset()
    try:
        e = torch._dynamo.explain(fn)()
    except Exception as exc:  # noqa: BLE001 - report what stopped the trace
        return f"explain failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
    reasons = sorted({str(b.reason).splitlines()[0][:90] for b in e.break_reasons})
    return f"{e.graph_break_count} breaks, {e.graph_count} graphs" + (f"; e.g. {reasons[:2]}" if reasons else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, fn in op_cases().items():
        print(f"{name:28s} {breaks(fn)}")
    for backbone in ("qwen2vl", "llava-next"):
        model = build(backbone)
        inputs = text_inputs(model, 2, 12)
        for paths in ([0, 1], 0, None):
            found = breaks(lambda m=model, x=inputs, p=paths: models.encode(m, x, p))
            print(f"encode {backbone:10s} paths={paths!s:6s} {found}")
    if args.skip_timing:
        return
    model = build("qwen2vl")
    inputs = text_inputs(model, 2, 12)

    def encode(inputs):
        return models.encode(model, inputs, [0, 1])

    torch._dynamo.reset()
    runners = {"no compile": encode}
    for backend in ("eager", "aot_eager"):
        runners[f"compiled {backend}"] = torch.compile(encode, backend=backend, dynamic=False)
    times = {name: [] for name in runners}
    with torch.no_grad():
        for fn in runners.values():
            for _ in range(3):
                fn(inputs)  # compile and warm up
        reference = encode(inputs)
        for fn in runners.values():
            torch.testing.assert_close(fn(inputs), reference)
        for _ in range(args.repeats):
            for name, fn in runners.items():
                start = time.perf_counter()
                fn(inputs)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["no compile"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"encode tiny qwen2vl, 2 paths, B=2, L=12, no grad: {name:18s} median {m * 1e3:7.2f} ms  "
              f"({base / m:.2f}x eager)")


if __name__ == "__main__":
    main()
