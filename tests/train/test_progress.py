"""The training bar (tqdm) and --report-to: a missing package stops the run at start, naming it."""

import importlib.util

import pytest

from pdfkernels.train.config import TrainConfig
from pdfkernels.train.progress import Progress


def test_bar_counts_steps_from_a_resumed_start(tmp_path):
    progress = Progress(TrainConfig(steps=5, log_every=2, out_dir=str(tmp_path)), start=2, rank=0)
    for step in (3, 4):
        progress.update({"step": step, "loss": 1.0, "path_cosine": 0.5, "samples_per_s": 9.0})
    assert progress.bar.n == 4 and "loss=1.0000" in str(progress.bar)
    progress.close()
    assert Progress(TrainConfig(steps=5), start=0, rank=1).bar.disable  # one bar, on rank 0


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_report_to_without_the_package_is_refused(tmp_path, kind):
    if importlib.util.find_spec(kind) is not None:
        pytest.skip(f"{kind} is installed here")
    with pytest.raises(ValueError, match=f"'report_to' '{kind}' needs the {kind} package"):
        Progress(TrainConfig(report_to=kind, out_dir=str(tmp_path)), start=0, rank=0)


def test_unknown_report_to_is_refused():
    with pytest.raises(ValueError, match="'report_to' expected one of"):
        TrainConfig(report_to="mlflow")
