"""MIM diagnostics: prefix cosine and embedding norms against direct computations; the negative-MI warning's
schedule; progress-line fields."""

import logging

import pytest
import torch
import torch.nn.functional as F

from pdfkernels.train.config import TrainConfig
from pdfkernels.train.metrics import NegativeMIWatch, RunDiagnostics, embedding_norms, prefix_cosine, progress_fields


@pytest.mark.parametrize("num_paths", [2, 3])
def test_prefix_cosine_equals_a_direct_computation(num_paths):
    prefix = torch.randn(4, num_paths, 2, 2, 5, 8)  # [layers, N, keys/values, Hkv, K, D]
    prefix[:, 1] += 0.7 * prefix[:, 0]  # correlated paths, so the value is far from 0
    pairs = [(i, j) for i in range(num_paths) for j in range(i + 1, num_paths)]
    direct = sum(F.cosine_similarity(prefix[:, i].flatten(), prefix[:, j].flatten(), dim=0) for i, j in pairs)
    assert prefix_cosine(prefix).item() == pytest.approx(direct.item() / len(pairs), rel=1e-5)
    assert prefix_cosine(prefix[:, :1]).item() == 0.0


def test_embedding_norms_per_path():
    reps = torch.randn(2, 5, 16)
    reps[1] *= 3
    norms = embedding_norms(reps)
    assert list(norms) == ["emb_norm_0", "emb_norm_1"]
    for i in range(2):
        direct = sum(reps[i, b].pow(2).sum().sqrt() for b in range(5)) / 5
        assert norms[f"emb_norm_{i}"].item() == pytest.approx(direct.item(), rel=1e-5)


def _warned_steps(watch: NegativeMIWatch, estimates: list[float], caplog) -> list[int]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pdf"):
        returned = [step for step, mi in enumerate(estimates, 1) if watch.update({"step": step, "mi_estimate": mi})]
    logged = [int(r.getMessage().split(":")[0].removeprefix("step ")) for r in caplog.records]
    assert logged == returned
    return logged


def test_negative_mi_warns_after_a_run_then_every_n_steps_and_resets(caplog):
    watch = NegativeMIWatch(run=3, every=4)
    # 2 negative steps (too short), a positive one, 10 negative (warn at the 3rd, 7th), positive, 3 negative
    estimates = [-1, -1, 0.5] + [-0.1] * 10 + [0.2] + [-2] * 3
    assert _warned_steps(watch, estimates, caplog) == [6, 10, 17]
    assert [r.getMessage().split("(now")[0].split("for ")[1] for r in caplog.records] == ["3 steps ", "7 steps ",
                                                                                          "3 steps "]
    assert watch.warnings == 3


def test_steps_without_an_mi_estimate_never_warn(caplog):
    watch = NegativeMIWatch(run=1, every=1)
    with caplog.at_level(logging.WARNING, logger="pdf"):
        assert not any(watch.update({"step": s, "loss": -1.0}) for s in range(5))
    assert caplog.records == []
    with pytest.raises(ValueError, match="'run' and 'every'"):
        NegativeMIWatch(run=0, every=1)


def test_progress_fields_show_only_recorded_terms():
    full = {"path_cosine": 0.9871, "prefix_cosine": -0.0312, "loss_estimator": 80.123, "mi_estimate": -1.5,
            "emb_norm_0": 7.9, "emb_norm_1": 8.04}
    assert progress_fields(full) == "cos 0.987 prefix cos -0.031 est 80.12 MI -1.500 |h| 7.90/8.04"
    assert progress_fields({"path_cosine": 0.5, "emb_norm_0": 2.0}) == "cos 0.500 |h| 2.00"


def test_run_diagnostics_prefix_update_cosine_equals_a_direct_computation(caplog):
    holder = torch.nn.Module()  # stands in for a patched model: a config and the prefix parameter
    holder.config = None
    holder.pdf_prefix = torch.nn.Parameter(torch.randn(3, 2, 2, 1, 4, 8))  # [layers, N, 2, Hkv, K, D]
    start = holder.pdf_prefix.detach().clone()
    diagnostics = RunDiagnostics(TrainConfig(prefix_len=4, mi_negative_run=1, mi_warn_every=1), holder)
    first = {"step": 1, "mi_estimate": 0.5}
    diagnostics.update(first)
    assert first["prefix_update_cosine"] == 0.0  # nothing moved yet
    shared = torch.randn(3, 2, 1, 4, 8)
    with torch.no_grad():
        holder.pdf_prefix[:, 0] += shared + 0.5 * torch.randn_like(shared)
        holder.pdf_prefix[:, 1] += shared + 0.5 * torch.randn_like(shared)
    second = {"step": 2, "mi_estimate": -0.5}
    with caplog.at_level(logging.WARNING, logger="pdf"):
        diagnostics.update(second)
    moved = holder.pdf_prefix.detach() - start
    direct = F.cosine_similarity(moved[:, 0].flatten(), moved[:, 1].flatten(), dim=0)
    assert second["prefix_update_cosine"] == pytest.approx(direct.item(), rel=1e-5)
    assert "step 2: the vCLUB MI estimate has been negative for 1 steps" in caplog.text
