"""Self-check: every public op on small random inputs against an independent computation.

    python -m pdfkernels.selfcheck [--seed S]
    python -m pdfkernels.selfcheck --env   # the environment variables pdfkernels reads, their values here

Prints a markdown table (op, case, max abs error, tolerance, status, time) and exits non-zero when any
row fails. Inputs are fresh random draws on each run unless a seed is given.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

import pdfkernels
from pdfkernels import reference, settings
from pdfkernels.baselines import cat_sdpa_prefix_attention, club_broadcast_mim
from pdfkernels.packing import cu_seqlens_from_lengths, packed_to_padded, padded_to_packed


def _normal_loglik(y: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(y).sum(-1)


def _case_prefix_attention() -> tuple[str, torch.Tensor, torch.Tensor]:
    b, h, hkv, length, d, n, k = 3, 6, 2, 17, 32, 2, 5
    q = torch.randn(b, h, length, d)
    key, val = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    pk, pv = torch.randn(n, hkv, k, d), torch.randn(n, hkv, k, d)
    paths = torch.randint(0, n, (b,))
    mask = torch.arange(length)[None] >= torch.tensor([0, 4, 9])[:, None]  # left padding
    ours = pdfkernels.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask)
    theirs = reference.prefix_attention(q, key, val, pk, pv, paths, key_padding_mask=mask)
    return f"B={b} H={h}/{hkv} L={length} D={d} N={n} K={k} left-pad vs the literal reference", ours, theirs


def _case_varlen() -> tuple[str, torch.Tensor, torch.Tensor]:
    lengths, h, hkv, d, n, k = [5, 1, 12, 7], 4, 1, 16, 3, 3
    cu = cu_seqlens_from_lengths(lengths)
    total = sum(lengths)
    q, key, val = torch.randn(total, h, d), torch.randn(total, hkv, d), torch.randn(total, hkv, d)
    pk, pv = torch.randn(n, hkv, k, d), torch.randn(n, hkv, k, d)
    paths = torch.randint(0, n, (len(lengths),))
    ours = pdfkernels.prefix_attention_varlen(q, key, val, pk, pv, cu, max(lengths), paths)
    padded = [packed_to_padded(t, cu, max(lengths))[0] for t in (q, key, val)]
    mask = packed_to_padded(q, cu, max(lengths))[1]
    theirs = padded_to_packed(cat_sdpa_prefix_attention(*padded, pk, pv, paths, key_padding_mask=mask), mask)
    return f"lengths={lengths} H={h}/{hkv} N={n} K={k} vs padded cat+SDPA", ours, theirs


def _case_pairwise() -> tuple[str, torch.Tensor, torch.Tensor]:
    b, d = 9, 24
    y, mu, logvar = torch.randn(b, d), torch.randn(b, d), torch.randn(b, d)
    ours = pdfkernels.gaussian_loglik_pairwise(y, mu, logvar)
    theirs = _normal_loglik(y[:, None], mu[None], logvar[None])
    return f"B={b} d={d} vs torch.distributions.Normal", ours, theirs


def _case_mim() -> tuple[str, torch.Tensor, torch.Tensor]:
    n, b, d = 3, 8, 16
    y, mu, logvar = (torch.randn(n, b, d, dtype=torch.float64) for _ in range(3))
    return f"N={n} B={b} d={d} float64 vs CLUB broadcast", pdfkernels.mim_loss(y, mu, logvar), \
        club_broadcast_mim(y, mu, logvar)


def _case_estimator() -> tuple[str, torch.Tensor, torch.Tensor]:
    n, b, d = 2, 8, 16
    y, mu, logvar = torch.randn(n, b, d), torch.randn(n, b, d), torch.randn(n, b, d)
    theirs = -(_normal_loglik(y[0], mu[1], logvar[1]).mean() + _normal_loglik(y[1], mu[0], logvar[0]).mean()) / 2
    return f"N={n} B={b} d={d} vs torch.distributions.Normal", pdfkernels.estimator_nll(y, mu, logvar), theirs


CASES: list[tuple[str, Callable[[], tuple[str, torch.Tensor, torch.Tensor]], float]] = [
    ("prefix_attention", _case_prefix_attention, 1e-5),
    ("prefix_attention_varlen", _case_varlen, 1e-5),
    ("gaussian_loglik_pairwise", _case_pairwise, 1e-4),
    ("mim_loss", _case_mim, 1e-10),
    ("estimator_nll", _case_estimator, 1e-4),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="fixed seed (default: fresh inputs)")
    parser.add_argument("--env", action="store_true", help="list the environment variables pdfkernels reads")
    args = parser.parse_args(argv)
    if args.env:
        print("| variable | value here | default (choices) | meaning |\n|---|---|---|---|")
        for row in settings.table():
            print("| " + " | ".join(row) + " |")
        return 0
    if args.seed is not None:
        torch.manual_seed(args.seed)
    print(f"pdfkernels {pdfkernels.__version__} self-check, torch {torch.__version__}, device cpu\n")
    print("| op | case | max abs error | tolerance | status | time (ms) |")
    print("|---|---|---|---|---|---|")
    failures = 0
    for op, case, tol in CASES:
        start = time.perf_counter()
        label, ours, theirs = case()
        elapsed = (time.perf_counter() - start) * 1e3
        error = (ours.double() - theirs.double()).abs().max().item()
        scale = max(1.0, theirs.double().abs().max().item())
        ok = error <= tol * scale
        failures += not ok
        print(f"| {op} | {label} | {error:.2e} | {tol * scale:.1e} | {'ok' if ok else 'FAIL'} | {elapsed:.1f} |")
    print(f"\n{len(CASES) - failures} of {len(CASES)} ops agree with their independent check")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
