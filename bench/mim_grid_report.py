"""The MIM grid's table and plot, from the run folders that ``mim_grid`` wrote.

    python -m pdfkernels.bench.mim_grid_report --runs /tmp/mim-grid [--results bench/results/mim-grid]

Writes ``table.md`` (one row per lambda_MIM x estimator steps, means over the finished seeds), ``summary.json``
(every run's figures) and, when matplotlib is installed (``pip install -e ".[plot]"``), ``mim-grid.png``:
the cosine between the paths' embeddings, prefix parameters and prefix updates and the MI estimate over the
steps, one line per setting (mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

NAME = re.compile(r"lam(?P<lam>[0-9.e+-]+)_k(?P<k>\d+)_seed(?P<seed>\d+)$")
CURVES = (("path_cosine", "cosine between the paths' embeddings"),
          ("prefix_cosine", "cosine between the paths' prefix parameters"),
          ("prefix_update_cosine", "cosine between the paths' prefix updates"),
          ("mi_estimate", "vCLUB MI estimate (symlog)"))


def _tail(values: list[float]) -> float:
    """Mean over the last tenth of the run: one step's value is noisy."""
    window = max(1, len(values) // 10)
    return statistics.fmean(values[-window:])


def _longest_negative_run(values: list[float]) -> int:
    longest = current = 0
    for v in values:
        current = current + 1 if v < 0 else 0
        longest = max(longest, current)
    return longest


def load_run(folder: Path) -> dict | None:
    """One finished run's figures, or None while it has no evaluation yet."""
    match = NAME.match(folder.name)
    if match is None or not (folder / "eval.json").exists():
        return None
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    series = {key: [m[key] for m in steps] for key in steps[0] if isinstance(steps[0][key], (int, float))}
    average = json.loads((folder / "eval.json").read_text())["average"]
    norms = [k for k in series if k.startswith("emb_norm_")]
    mi = series.get("mi_estimate", [])
    return {"lambda_mim": float(match["lam"]), "estimator_steps": int(match["k"]), "seed": int(match["seed"]),
            "steps": len(steps), "p1": {m: 100 * average[m] for m in ("single", "aggregate", "none")},
            "path_cosine": _tail(series["path_cosine"]), "path_cosine_min": min(series["path_cosine"]),
            "prefix_cosine_start": series["prefix_cosine"][0], "prefix_cosine": _tail(series["prefix_cosine"]),
            "prefix_update_cosine": _tail(series["prefix_update_cosine"]),
            "mi_estimate": _tail(mi) if mi else None, "mi_estimate_min": min(mi) if mi else None,
            "mi_negative_share": sum(v < 0 for v in mi) / len(mi) if mi else None,
            "mi_negative_run": _longest_negative_run(mi) if mi else None,
            "loss_estimator": _tail(series["loss_estimator"]) if "loss_estimator" in series else None,
            "emb_norm": _tail([statistics.fmean(v) for v in zip(*(series[k] for k in norms))]),
            "curves": {key: series[key] for key, _ in CURVES if key in series}}


def group(runs: list[dict]) -> dict[tuple[float, int], list[dict]]:
    cells: dict[tuple[float, int], list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["lambda_mim"], r["estimator_steps"], r["seed"])):
        cells.setdefault((run["lambda_mim"], run["estimator_steps"]), []).append(run)
    return cells


def _mean(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r[key] is not None]
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(cells: dict[tuple[float, int], list[dict]]) -> str:
    lines = ["| λ_MIM | K | seeds | P@1 single | P@1 aggregate | P@1 none | emb cos (last 10%) | emb cos min | "
             "prefix cos start → end | prefix update cos | MI est. (last 10%) | MI est. min | steps MI < 0 | "
             "longest MI < 0 run | est. loss (last 10%) | mean ‖h‖ |", "|---" * 16 + "|"]
    for (lam, k), runs in cells.items():
        p1 = [" – ".join(f"{v:.0f}" for v in (min(vals), max(vals))) if len(vals) > 1 else "" for vals in
              ([r["p1"][m] for r in runs] for m in ("single", "aggregate", "none"))]
        means = [statistics.fmean(r["p1"][m] for r in runs) for m in ("single", "aggregate", "none")]
        cells = [f"{lam:g}", str(k), str(len(runs)),
                 *(f"{m:.1f} ({span})" if span else f"{m:.1f}" for m, span in zip(means, p1)),
                 _fmt(_mean(runs, "path_cosine"), ".3f"), _fmt(_mean(runs, "path_cosine_min"), ".3f"),
                 f"{_mean(runs, 'prefix_cosine_start'):.3f} → {_mean(runs, 'prefix_cosine'):.3f}",
                 _fmt(_mean(runs, "prefix_update_cosine"), ".3f"),
                 _fmt(_mean(runs, "mi_estimate"), ".3g"), _fmt(_mean(runs, "mi_estimate_min"), ".3g"),
                 _fmt(None if _mean(runs, "mi_negative_share") is None else 100 * _mean(runs, "mi_negative_share"),
                      ".0f") + ("%" if _mean(runs, "mi_negative_share") is not None else ""),
                 _fmt(_mean(runs, "mi_negative_run"), ".0f"),
                 _fmt(_mean(runs, "loss_estimator"), ".1f"), _fmt(_mean(runs, "emb_norm"), ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int = 5) -> list[float]:
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot(cells: dict[tuple[float, int], list[dict]], path: Path) -> bool:
    """One panel per curve, one line per setting (mean over seeds, 5-step running mean); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lambdas = sorted({lam for lam, _ in cells})
    colors = {lam: plt.get_cmap("tab10")(i) for i, lam in enumerate(lambdas)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for (lam, k), runs in cells.items():
            curves = [r["curves"][key] for r in runs if key in r["curves"]]
            if not curves:
                continue
            mean = [statistics.fmean(v) for v in zip(*curves)]
            label = f"λ={lam:g}{' (probe)' if lam == 0 else ''}, K={k}"
            ax.plot(range(1, len(mean) + 1), _smooth(mean), color=colors[lam], linestyle="-" if k == 1 else "--",
                    label=label, linewidth=1.3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "mi_estimate":
            ax.set_yscale("symlog", linthresh=0.1)
            ax.axhline(0, color="black", linewidth=0.8)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "mim-grid")
    args = parser.parse_args(argv)
    runs = [run for folder in sorted(args.runs.iterdir()) if (run := load_run(folder)) is not None]
    if not runs:
        raise SystemExit(f"no finished runs under {args.runs}")
    cells = group(runs)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "table.md").write_text(table(cells))
    summary = [{k: v for k, v in run.items() if k != "curves"} for run in runs]
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table(cells))
    if not plot(cells, args.results / "mim-grid.png"):
        print("matplotlib is missing: no plot (pip install -e '.[plot]')")


if __name__ == "__main__":
    main()
