"""Run the benchmarks on whatever device is present, print a markdown table, write JSON (and charts).

    python -m pdfkernels.bench [--quick] [--only NAME ...] [--select PART=EXPR ...] [--plot] [--out bench/results]

Parts: table4 (CPU, meta device), vclub, prefix_attention, models, train_step. The timed parts are the
pytest-benchmark cases in bench/test_*.py, run here through pytest (the same cases as
``pytest bench --benchmark-only``); every timed result is one row of ``bench/schema.py`` (provider, mode, shape,
median and 20/80 quantiles, TFLOP/s, MFU, peak memory, device, versions, commit), in the markdown and in
``<out>/<device>-<date>.json``. Cases a device cannot run are listed with the reason under their table. The two
headline ratios (``bench/headline.py``) come last. ``--quick`` is the CI-sized CPU run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pdfkernels import settings
from pdfkernels.bench import headline, schema

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("vclub", "prefix_attention", "models", "train_step")
PARTS = ("table4", *TIMED)


def _versions() -> dict:
    import torch
    import transformers
    import triton

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
            "commit": (commit or "unknown") + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_timed(part: str, quick: bool, meta: dict, select: str | None = None) -> tuple[list[dict], list[str]]:
    """One bench/test_<part>.py module through pytest-benchmark (``select``: a pytest ``-k`` expression); its schema
    rows and the skip reasons."""
    cases = ROOT / "bench" / f"test_{part}.py"
    if not cases.is_file():  # the wheel leaves the cases out (setup.py)
        raise RuntimeError(f"bench part {part}: {cases} not found; the benchmark cases ship only in a source "
                           f"checkout: run python -m pdfkernels.bench from one")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, settings.BENCH_QUICK.name: "1" if quick else "0"}
        env.pop("TRITON_INTERPRET", None)
        cmd = [sys.executable, "-m", "pytest", str(cases), "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "-rs", f"--benchmark-json={report}"]
        if select:
            cmd += ["-k", select]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not report.exists():
            raise RuntimeError(f"bench part {part} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        data = json.loads(report.read_text())
    skipped = [line.split(": ", 1)[-1] for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    return [schema.row(part, b, meta) for b in data["benchmarks"]], skipped


def phase_table(rows: list[dict]) -> str:
    """The training step's phases (ms per step, medians over the profiled steps) of the rows that have them."""
    with_phases = [r for r in rows if r["extra"].get("phases_ms")]
    if not with_phases:
        return ""
    names = list(dict.fromkeys(n for r in with_phases for n in r["extra"]["phases_ms"]))
    lines = ["| provider | " + " | ".join(names) + " | timer |", "|---|" + "---|" * (len(names) + 1)]
    for r in with_phases:
        phases = r["extra"]["phases_ms"]
        cells = " | ".join("" if n not in phases else f"{phases[n]:.2f}" for n in names)
        lines.append(f"| {r['provider']} | {cells} | {r['extra']['phase_timer']} |")
    return "\n".join(lines)


def plot(records: list[dict], folder: Path, stem: str) -> list[Path]:
    """TFLOP/s against sequence length per provider (prefix attention); time and memory against batch (vCLUB)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)") from exc
    written = []
    attention = [r for r in records if r["part"] == "prefix_attention" and r["mode"] == "fwd+bwd"
                 and r["extra"]["K"] > 0]
    if attention:
        fig, ax = plt.subplots(figsize=(6, 4))
        for provider in sorted({r["provider"] for r in attention}):
            rows = sorted((r["extra"]["seq_len"], r["tflops"]) for r in attention
                          if r["provider"] == provider and r["extra"]["heads"] == attention[0]["extra"]["heads"])
            ax.plot([x for x, _ in rows], [y for _, y in rows], marker="o", label=provider)
        ax.set(xscale="log", xlabel="sequence length", ylabel="TFLOP/s (fwd+bwd)", title=attention[0]["device"])
        ax.legend()
        written.append(folder / f"{stem}-prefix-attention.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    vclub = [r for r in records if r["part"] == "vclub"]
    if vclub:
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        for provider in sorted({r["provider"] for r in vclub}):
            rows = sorted((r["extra"]["B"], r["median_ms"], r["peak_extra_mib"]) for r in vclub
                          if r["provider"] == provider)
            left.plot([b for b, _, _ in rows], [t for _, t, _ in rows], marker="o", label=provider)
            right.plot([b for b, _, _ in rows], [m for _, _, m in rows], marker="o", label=provider)
        left.set(xscale="log", yscale="log", xlabel="batch B", ylabel="fwd+bwd ms", title=vclub[0]["device"])
        right.set(xscale="log", yscale="log", xlabel="batch B", ylabel="peak extra MiB")
        left.legend()
        written.append(folder / f"{stem}-vclub.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized CPU run")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=None, help="parts to run")
    parser.add_argument("--select", action="append", default=[], metavar="PART=EXPR",
                        help="run only the cases of PART matching the pytest -k expression EXPR")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results folder")
    args = parser.parse_args(argv)
    parts = args.only or list(PARTS)
    selects = {}
    for item in args.select:
        part, sep, expr = item.partition("=")
        if not sep or part not in TIMED or not expr:
            parser.error(f"argument --select: expected PART=EXPR with PART one of {TIMED}, got {item!r}")
        selects[part] = expr
    meta = _versions()
    result: dict = {**meta, "quick": args.quick, "benchmarks": [], "table4": None}
    print(f"# pdfkernels benchmarks on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}, "
          f"transformers {meta['transformers']}, commit {meta['commit']}){' --quick' if args.quick else ''}\n")
    if "table4" in parts:
        from pdfkernels.bench.table4 import backbone_table, table

        text, rows = table()
        result["table4"] = rows
        print("## Table 4 (Qwen2-VL-2B, meta device)\n\n" + text + "\n")
        text, result["table4_backbones"] = backbone_table()
        print("## Table 4's counts for the other backbones (same convention, no paper figures)\n\n" + text + "\n")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['device'].replace(' ', '-')}-{meta['date'][:10]}{'-quick' if args.quick else ''}"
    path = folder / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    failed = []
    for part in (p for p in parts if p in TIMED):
        try:
            rows, skipped = run_timed(part, args.quick, meta, selects.get(part))
        except RuntimeError as exc:  # one part failing does not lose the others' figures
            failed.append(part)
            print(f"## {part}: FAILED\n\n```\n{exc}\n```\n", flush=True)
            continue
        result["benchmarks"] += rows
        result["skipped"] = result.get("skipped", []) + [f"{part}: {reason}" for reason in skipped]
        label = "" if meta["device"] != "cpu" else " (CPU figures: no MFU)"
        text = f"## {part}{label}\n\n{schema.markdown(rows)}\n"
        if phase_table(rows):
            text += f"\nPhases of one step (ms):\n\n{phase_table(rows)}\n"
        if skipped:
            text += "\nnot run here:\n" + "\n".join(f"- {reason}" for reason in skipped) + "\n"
        print(text, flush=True)
        path.write_text(json.dumps(result, indent=1, default=str))  # after every part: a cut run keeps these
    headline_lines = headline.lines(result["benchmarks"])
    if headline_lines:
        print("## Headline ratios\n\n" + "\n".join(headline_lines) + "\n")
    print(f"wrote {path}")
    if args.plot:
        for png in plot(result["benchmarks"], folder, stem):
            print(f"wrote {png}")
    if failed:
        print(f"failed parts: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
