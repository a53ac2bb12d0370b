"""Benchmarks (pytest-benchmark cases under ``bench/``)."""
