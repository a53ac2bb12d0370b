"""The distribution installs no generic top-level names, and the trainer runs as the mission writes it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_pdfkernels_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"pdfkernels", "-".join(wheel.name.split("-")[:2]) + ".dist-info"}
    for sub in ("models", "train", "bench", "integrations"):
        assert f"pdfkernels/{sub}/__init__.py" in names
    assert "pdfkernels/train/configs/demo.yaml" in names
    assert not [n for n in names if n.startswith("pdfkernels/bench/test_")], "benchmark cases stay in the checkout"


def test_subpackages_import_without_generic_names():
    code = ("import sys, pdfkernels.models, pdfkernels.train.run, pdfkernels.bench.common\n"
            "import pdfkernels.integrations.vlm2vec\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'train', 'bench', 'integrations')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_train_run_py_as_a_script_from_anywhere(tmp_path):
    for cwd in (ROOT, tmp_path):
        out = subprocess.run([sys.executable, str(ROOT / "train" / "run.py"), "--help"], cwd=cwd,
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "--global-batch" in out.stdout


def test_models_package_imports_without_transformers():
    """The families table names classes as strings and builds architectures on use: importing the model side
    (the patch, the table) does not load transformers, which costs over a second at start-up."""
    code = "import sys, pdfkernels.models, pdfkernels.models.families\nprint('transformers' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
