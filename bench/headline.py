"""The two figures a reader wants first, as ratios of times measured in the same run:

1. our prefix attention's forward+backward against the fastest peer at 2k tokens per sequence (or the longest
   sequence the run has, on a CPU), per head configuration;
2. PDF's training step (N = 2) against the plain VLM2Vec step on the same batch.

    python -m pdfkernels.bench.headline RESULT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OURS = "pdfkernels"  # providers whose name starts with it are ours
SEQ_LEN = 2048


def attention_lines(rows: list[dict]) -> list[str]:
    cases = [r for r in rows if r["part"] == "prefix_attention" and r["mode"] == "fwd+bwd" and r["extra"]["K"] > 0]
    if not cases:
        return []
    lengths = {r["extra"]["seq_len"] for r in cases}
    seq_len = SEQ_LEN if SEQ_LEN in lengths else max(lengths)
    lines = []
    for heads in sorted({(r["extra"]["heads"], r["extra"]["kv_heads"]) for r in cases}):
        same = [r for r in cases if r["extra"]["seq_len"] == seq_len
                and (r["extra"]["heads"], r["extra"]["kv_heads"]) == heads]
        ours = [r for r in same if r["provider"].startswith(OURS)]
        peers = [r for r in same if not r["provider"].startswith(OURS)]
        if not ours or not peers:
            continue
        best, peer = min(ours, key=lambda r: r["median_ms"]), min(peers, key=lambda r: r["median_ms"])
        lines.append(f"prefix attention fwd+bwd, L = {seq_len}, heads {heads[0]}/{heads[1]} ({best['device']}): "
                     f"{best['provider']} {best['median_ms']:.3f} ms vs fastest peer {peer['provider']} "
                     f"[{peer['extra'].get('backend', '')}] {peer['median_ms']:.3f} ms: peer / ours = "
                     f"{peer['median_ms'] / best['median_ms']:.2f}x")
    return lines


def train_step_lines(rows: list[dict]) -> list[str]:
    steps = {r["provider"]: r for r in rows if r["part"] == "train_step"}
    if "pdf" not in steps or "baseline" not in steps:
        return []
    pdf, base = steps["pdf"], steps["baseline"]
    return [f"train step ({pdf['device']}, {pdf['shape']}): PDF (N = {pdf['extra']['num_paths']}) "
            f"{pdf['median_ms']:.1f} ms vs plain VLM2Vec {base['median_ms']:.1f} ms: PDF / plain = "
            f"{pdf['median_ms'] / base['median_ms']:.2f}x time, {pdf['flops'] / base['flops']:.2f}x FLOPs"]


def lines(rows: list[dict]) -> list[str]:
    return attention_lines(rows) + train_step_lines(rows)


if __name__ == "__main__":
    found = lines(json.loads(Path(sys.argv[1]).read_text())["benchmarks"])
    print("\n".join(found) if found else "no headline figures in this result")
    sys.exit(0 if found else 1)
