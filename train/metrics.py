"""Per-step diagnostics of path diversity and of the vCLUB estimator, and the negative-MI warning.

Does MIM keep the paths apart, or does the backbone fool a lagging estimator? The embedding cosine between
paths (``losses.path_cosine``) alone cannot tell; these add the cosine between the paths' prefix parameters,
the cosine between their updates since the start, the mean embedding norm per path (the cosine InfoNCE ignores
norms, the Gaussian estimator does not), and a warning when the MI estimate stays negative (then it is no upper
bound: the estimator does not fit q(h_i|h_j)).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from pdfkernels import models
from pdfkernels.models.objective import LOSS_ESTIMATOR, MI_ESTIMATE

log = logging.getLogger("pdf")


def prefix_cosine(prefix: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine between the paths' prefix parameters, each path's keys and values of every layer
    flattened into one vector. ``prefix``: ``[layers, N, 2, Hkv, K, D]`` (``model.pdf_prefix``)."""
    n = prefix.shape[1]
    if n < 2:
        return prefix.new_zeros((), dtype=torch.float32)
    unit = F.normalize(prefix.detach().float().transpose(0, 1).reshape(n, -1), dim=-1)
    sims = unit @ unit.T
    pairs = torch.triu_indices(n, n, offset=1)
    return sims[pairs[0], pairs[1]].mean()


def embedding_norms(reps: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"emb_norm_<i>": mean L2 norm of path i's embeddings}`` for ``reps [N, B, d]``."""
    norms = reps.detach().float().norm(dim=-1).mean(dim=1)
    return {f"emb_norm_{i}": norm for i, norm in enumerate(norms)}


def progress_fields(metrics: dict) -> str:
    """The diagnostic part of the progress line: only the terms this run records."""
    fields = [("cos", "path_cosine", ".3f"), ("prefix cos", "prefix_cosine", ".3f"),
              ("update cos", "prefix_update_cosine", ".3f"),
              ("est", LOSS_ESTIMATOR, ".2f"), ("MI", MI_ESTIMATE, ".3f")]
    text = " ".join(f"{label} {metrics[key]:{fmt}}" for label, key, fmt in fields if key in metrics)
    norms = [metrics[k] for k in sorted(metrics) if k.startswith("emb_norm_")]
    if norms:
        text += " |h| " + "/".join(f"{v:.2f}" for v in norms)
    return text


class RunDiagnostics:
    """What needs state across steps, fed every step's metrics on the logging rank: the cosine between the
    paths' prefix *updates* since this run started (``prefix_update_cosine``; the independent random draws
    dominate ``prefix_cosine`` while the updates are small next to them) and the negative-MI warning."""

    def __init__(self, config, model: torch.nn.Module):
        self.prefix = models.pdf_parameters(model)[0] if config.prefix_len else None
        self.start = self.prefix.detach().clone() if self.prefix is not None else None
        self.mi_watch = NegativeMIWatch(config.mi_negative_run, config.mi_warn_every)

    def update(self, metrics: dict) -> None:
        if self.prefix is not None:
            metrics["prefix_update_cosine"] = float(prefix_cosine(self.prefix.detach() - self.start))
        self.mi_watch.update(metrics)


class NegativeMIWatch:
    """Warns when the MI estimate has been negative for ``run`` consecutive steps, then every ``every`` steps
    while it stays negative; a non-negative estimate ends the run (the next run warns afresh)."""

    def __init__(self, run: int, every: int):
        if run < 1 or every < 1:
            raise ValueError(f"NegativeMIWatch: 'run' and 'every' expected >= 1, got {run} and {every}")
        self.run, self.every = run, every
        self.negative_steps = 0
        self.warnings = 0

    def update(self, metrics: dict) -> bool:
        """Feed one step's metrics; returns whether it warned. Steps without an MI estimate are ignored."""
        mi = metrics.get(MI_ESTIMATE)
        if mi is None:
            return False
        if mi >= 0:
            self.negative_steps = 0
            return False
        self.negative_steps += 1
        since = self.negative_steps - self.run
        if since < 0 or since % self.every:
            return False
        self.warnings += 1
        log.warning("step %s: the vCLUB MI estimate has been negative for %d steps (now %.4g): the estimator "
                    "does not fit q(h_i | h_j), so the MIM term is no upper bound on the paths' mutual "
                    "information; try more --estimator-steps, a higher --estimator-lr or a smaller --lambda-mim",
                    metrics.get("step", "?"), self.negative_steps, mi)
        return True
