"""train.run with the MIM diagnostics: the new terms in metrics.jsonl and the progress line, and the warning
when a (rigged) estimator keeps the MI estimate negative."""

import json
import logging

import pytest

import pdfkernels.models as models
import pdfkernels.train.run as run
from tests.train.helpers import run_args, shapes_data
from tests.train.mim_helpers import anti_estimator


def test_negative_mi_is_warned_and_diagnostics_are_recorded(tmp_path_factory, tmp_path, monkeypatch, caplog,
                                                            capsys):
    data = shapes_data(tmp_path_factory.getbasetemp())
    real = models.VCLUB
    monkeypatch.setattr(models, "VCLUB", lambda dim: anti_estimator(real(dim)))
    with caplog.at_level(logging.WARNING, logger="pdf"):
        run.main(run_args(data, tmp_path, "--steps", "3", "--no-evaluate", "--log-every", "1",
                          "--estimator-lr", "0", "--mi-negative-run", "2", "--mi-warn-every", "1"))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["mi_estimate"] < 0 for m in lines)
    assert {"prefix_cosine", "prefix_update_cosine", "emb_norm_0", "emb_norm_1", "loss_estimator"} <= set(lines[0])
    warned = [r.getMessage() for r in caplog.records if "MI estimate has been negative" in r.getMessage()]
    assert [w.split(":")[0] for w in warned] == ["step 2", "step 3"]
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(progress) == 3
    assert f"prefix cos {lines[-1]['prefix_cosine']:.3f}" in progress[-1]
    assert f"MI {lines[-1]['mi_estimate']:.3f}" in progress[-1]


@pytest.mark.parametrize("flag", ["--estimator-steps", "--mi-negative-run", "--mi-warn-every"])
def test_counts_below_one_are_refused(flag):
    with pytest.raises(ValueError, match=flag.removeprefix("--").replace("-", "_")):
        run.main([flag, "0"])
