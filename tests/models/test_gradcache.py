"""The one GradCache step (``models/gradcache.py``) on a toy encoder: loss and gradients equal the direct
full-batch objective (masked negatives left out), the hooks are called as the trainers rely on (the last
chunk flagged once, the reduction once, stage 2's backward once), and dropout masks replay."""

from __future__ import annotations

import copy

import pytest
import torch

from pdfkernels import models
from pdfkernels.models.gradcache import Batch, Heads, Hooks, gradcache_step
from pdfkernels.models.objective import Objective

D, N = 6, 2


class Toy(torch.nn.Module):
    """Rows -> ``[N, b, d]``: one linear map per path, with dropout (to check the replay)."""

    def __init__(self):
        super().__init__()
        self.paths = torch.nn.ModuleList(torch.nn.Linear(4, D) for _ in range(N))
        self.dropout = torch.nn.Dropout(0.3)

    def forward(self, x):
        return torch.stack([self.dropout(path(x)) for path in self.paths])


def _setup(seed=0):
    torch.manual_seed(seed)
    return Toy(), models.Aggregator(D, N), models.VCLUB(D)


def _direct64(q, t, n, valid, aggregator, temperature, lambda_con):
    def nce(a, b, negs):
        c = torch.cat([b, negs])
        sims = (a / a.norm(dim=-1, keepdim=True)) @ (c / c.norm(dim=-1, keepdim=True)).T / temperature
        return (torch.logsumexp(sims, 1) - sims.diagonal()).mean()

    q, t, n = q.double(), t.double(), n[:, valid].double()
    agg = copy.deepcopy(aggregator).double()
    return nce(agg(q), agg(t), agg(n)) + lambda_con * sum(nce(q[i], t[i], n[i]) for i in range(N)) / N, agg


def test_the_chunked_step_equals_the_direct_objective_and_calls_the_hooks_as_promised():
    objective = Objective(num_paths=N, prefix_len=1, lambda_mim=0.0, lambda_con=0.5, hard_negatives=2)
    model, aggregator, _ = _setup()
    model.eval()
    x_q, x_t, x_n = torch.randn(5, 4), torch.randn(5, 4), torch.randn(10, 4)
    valid = torch.ones(10, dtype=torch.bool)
    valid[3] = False
    calls = []
    hooks = Hooks(chunk_context=lambda last: calls.append(("context", last)) or torch.enable_grad(),
                  reduce=lambda: calls.append("reduce"),
                  loss_backward=lambda loss: (calls.append("stage 2"), loss.backward()))
    chunks = lambda x, size: [x[i:i + size] for i in range(0, len(x), size)]  # noqa: E731
    batch = Batch(chunks(x_q, 2), chunks(x_t, 3), chunks(x_n, 4), valid)
    result = gradcache_step(lambda side, chunk: model(chunk), batch, objective, 0.1,
                            Heads(aggregator, None, None), hooks)
    got = {n: p.grad.clone() for n, p in [*model.named_parameters(), *aggregator.named_parameters()]}
    assert calls == ["stage 2"] + [("context", False)] * 7 + [("context", True), "reduce"]
    assert result.metrics["negatives_skipped"] == 1

    ref, ref_agg, _ = _setup()
    ref.eval()
    loss, agg64 = _direct64(ref(x_q), ref(x_t), ref(x_n), valid, ref_agg, 0.1, 0.5)
    loss.backward()
    want = {n: p.grad.float() for n, p in [*ref.named_parameters(), *agg64.named_parameters()]}
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-7, msg=lambda m, k=name: f"{k}: {m}")


def test_the_re_forward_replays_each_chunks_dropout_and_the_stream_moves_on():
    objective = Objective(num_paths=N, prefix_len=1, lambda_mim=0.0)
    model, aggregator, _ = _setup()
    model.train()
    seen = []

    def encode(side, chunk):
        out = model(chunk)
        seen.append(out.detach().clone())
        return out

    x = torch.randn(4, 4)
    gradcache_step(encode, Batch([x[:2], x[2:]], [x[:2], x[2:]]), objective, 0.1, Heads(aggregator, None, None))
    first, again = seen[:4], seen[4:]
    for a, b in zip(first, again):  # the re-forward of every chunk sees its first forward's masks
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[2])  # the same rows as queries and as targets: other masks


def test_the_estimator_trains_on_every_rank_s_detached_rows_and_mim_reaches_the_embeddings():
    objective = Objective(num_paths=N, prefix_len=1, lambda_mim=0.5, estimator_steps=2)
    model, aggregator, estimator = _setup()
    optimizer = torch.optim.AdamW(estimator.parameters(), lr=1e-2)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    before = {n: p.detach().clone() for n, p in estimator.named_parameters()}
    x = torch.randn(4, 4)
    result = gradcache_step(lambda side, chunk: model(chunk), Batch([x], [x + 1]), objective, 0.1,
                            Heads(aggregator, estimator, optimizer))
    assert len(steps) == 2 and {"loss_estimator", "mi_estimate"} <= set(result.metrics)
    assert all(not torch.equal(p, before[n]) for n, p in estimator.named_parameters())
