"""One schema for every timed result, in the JSON and the markdown table, so that runs on different days compare.

Each benchmark case attaches ``timed_info(...)`` to pytest-benchmark's ``extra_info``; ``row`` turns a
pytest-benchmark record into one row with the fields of ``FIELDS``: the provider, the operation mode (fwd / bwd /
fwd+bwd), the shape, median and 20th/80th percentiles over the timed rounds, FLOPs, achieved TFLOP/s and MFU
(against ``bench/peaks.py``; none on a CPU), peak extra memory, device, dtype, versions (the provider's library
among them) and commit. Anything else a case reports (the SDPA backend that ran, phases) rides along under
``extra``.
"""

from __future__ import annotations

from pdfkernels.bench.peaks import mfu

FIELDS = ("part", "case", "provider", "mode", "shape", "dtype", "median_ms", "q20_ms", "q80_ms", "rounds", "flops",
          "tflops", "mfu", "peak_extra_mib", "device", "versions", "commit", "date")
MODES = ("fwd", "bwd", "fwd+bwd", "step")
REQUIRED = ("provider", "mode", "shape", "dtype", "device", "provider_version")


def timed_info(provider: str, mode: str, shape: str, dtype: str, device: str, provider_version: str,
               flops: float | None = None, peak_extra_bytes: int | None = None, **extra) -> dict:
    """What a benchmark case attaches to ``benchmark.extra_info``: the schema's per-case fields."""
    if mode not in MODES:
        raise ValueError(f"timed_info: argument 'mode' expected one of {MODES}, got {mode!r}")
    return {"provider": provider, "mode": mode, "shape": shape, "dtype": dtype, "device": device,
            "provider_version": provider_version, "flops": flops, "peak_extra_bytes": peak_extra_bytes, **extra}


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def row(part: str, record: dict, meta: dict) -> dict:
    """One schema row from a pytest-benchmark JSON record (its ``extra_info`` from ``timed_info``) and the run's
    metadata (``device``, ``torch``/``triton``/``transformers``, ``commit``, ``date``)."""
    info = dict(record.get("extra_info") or {})
    missing = [k for k in REQUIRED if k not in info]
    if missing:
        raise ValueError(f"benchmark {record['name']}: extra_info lacks {missing} (attach schema.timed_info(...))")
    data, median = record["stats"]["data"], record["stats"]["median"]
    flops = info.pop("flops")
    tflops = None if flops is None else flops / median / 1e12
    peak = info.pop("peak_extra_bytes")
    versions = {k: meta[k] for k in ("torch", "triton", "transformers") if k in meta}
    versions["provider"] = info.pop("provider_version")
    out = {"part": part, "case": record["name"].split("[", 1)[-1].rstrip("]"), "provider": info.pop("provider"),
           "mode": info.pop("mode"), "shape": info.pop("shape"), "dtype": info.pop("dtype"),
           "median_ms": 1e3 * median, "q20_ms": 1e3 * quantile(data, 0.2), "q80_ms": 1e3 * quantile(data, 0.8),
           "rounds": len(data), "flops": flops, "tflops": tflops, "mfu": mfu(tflops, info["device"]),
           "peak_extra_mib": None if peak is None else peak / 2**20, "device": info.pop("device"),
           "versions": versions, "commit": meta.get("commit"), "date": meta.get("date")}
    out["extra"] = info
    return out


def _cell(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """The markdown table of schema rows (torch/triton/transformers versions and the commit are the run's, printed
    in its header; the device, the provider's library version and the SDPA backend that ran are per row)."""
    lines = ["| provider | mode | shape | dtype | median ms | q20 ms | q80 ms | TFLOP/s | MFU | peak extra MiB | "
             "device | provider version | backend |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["mfu"] is not None:
            mfu_cell = f"{100 * r['mfu']:.1f}%"
        else:
            mfu_cell = "n/a (cpu)" if r["device"] == "cpu" else ("n/a (no peak)" if r["tflops"] else "")
        tflops = _cell(r["tflops"], 3 if r["device"] == "cpu" else 1)
        lines.append(f"| {r['provider']} | {r['mode']} | {r['shape']} | {r['dtype']} | {r['median_ms']:.3f} | "
                     f"{r['q20_ms']:.3f} | {r['q80_ms']:.3f} | {tflops} | "
                     f"{mfu_cell} | {_cell(r['peak_extra_mib'], 1)} | {r['device']} | {r['versions']['provider']} | "
                     f"{r['extra'].get('backend', '')} |")
    return "\n".join(lines)
