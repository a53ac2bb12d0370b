"""The objective's one objective dataclass (``models/objective.py``): the same checks and derived flags for
both trainers (``TrainConfig.objective``, ``pdf_trainer``'s ``PDFObjective``)."""

from __future__ import annotations

import pytest

from pdfkernels.integrations import vlm2vec
from pdfkernels.models.objective import Objective, ObjectiveError
from pdfkernels.train.config import ConfigError, TrainConfig


@pytest.mark.parametrize("fields,message", [
    ({"num_paths": 0}, r"'num_paths' expected >= 1 \(an int\), got 0"),
    ({"hard_negatives": 1.5}, r"'hard_negatives' expected >= 0 \(an int\), got 1.5"),
    ({"lambda_mim": float("nan")}, r"'lambda_mim' expected >= 0 \(a finite number\), got nan"),
    ({"temperature": 0.0}, r"'temperature' expected a positive finite number, got 0.0"),
    ({"num_paths": 1}, r"'lambda_mim' \(0.0001\) needs 'num_paths' >= 2"),
    ({"prefix_len": 0}, r"'num_paths' 2 needs 'prefix_len' >= 1"),
])
def test_one_check_per_setting_named_by_either_trainer(fields, message):
    with pytest.raises(ObjectiveError, match=message):
        Objective(**fields)
    with pytest.raises(ConfigError, match="config: " + message):
        TrainConfig(**fields)
    with pytest.raises(ValueError, match="pdf_trainer: argument " + message):
        vlm2vec.pdf_trainer(object, **fields)


def test_the_trainers_share_the_dataclass_and_its_flags():
    config = TrainConfig(lambda_mim=0.0, track_mi=True, hard_negatives=2)
    assert type(config.objective) is Objective and config.objective.hard_negatives == 2
    assert (config.uses_mim, config.trains_estimator) == (False, True)
    objective = vlm2vec.objective_of(num_paths=2, prefix_len=3, lambda_mim=0.0)
    assert isinstance(objective, Objective) and objective.temperature is None and not objective.trains_estimator
    assert Objective(prefix_len=0, num_paths=1, lambda_mim=0.0).paths is None
    assert Objective(num_paths=3).paths == [0, 1, 2]
