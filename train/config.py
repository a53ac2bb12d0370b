"""The trainer's configuration: the paper's defaults, overridable from a YAML/JSON file and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pdfkernels.models.objective import Objective, ObjectiveError

# VLM2Vec's LoRA/DoRA targets; in Hugging Face Qwen2-VL they match the text model's q/k/v/o/down_proj only.
VLM2VEC_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|down_proj)"


class ConfigError(ValueError):
    """A setting that cannot work, refused before anything is read or written."""


# TrainConfig's fields that are the objective's (models/objective.py checks them; one set for both
# trainers)
OBJECTIVE_FIELDS = tuple(f.name for f in dataclasses.fields(Objective))


@dataclass
class TrainConfig:
    # PDF (paper §4.1); their checks: models/objective.py
    num_paths: int = 2
    prefix_len: int = 20
    lambda_mim: float = 1e-4
    lambda_con: float = 1.0
    temperature: float = 0.02
    # model
    model: str = "tiny"  # a preset in models.families.PRESETS or a local directory (from_pretrained, offline)
    lora_r: int | None = None  # DoRA rank on VLM2VEC_TARGETS; 0 trains every weight; None: 8, or 0 for "tiny"
    gradient_checkpointing: bool = False
    dtype: str = "auto"  # "bf16": frozen weights bf16, trainable fp32, bf16 autocast; "fp32"; "auto": bf16 on GPUs
    # optimisation
    lr: float = 2e-5
    estimator_lr: float = 1e-4
    # the vCLUB estimator and its diagnostics (train/metrics.py)
    estimator_steps: int = 1  # estimator updates per step on the same detached embeddings (CLUB's code: 5)
    track_mi: bool = False  # with lambda_mim = 0: still train the estimator and report the MI estimate (a probe)
    mi_negative_run: int = 20  # warn when the MI estimate has been negative for this many steps in a row ...
    mi_warn_every: int = 100  # ... and again every so many steps while it stays negative
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # as VLM2Vec's Hugging Face Trainer; 0 disables clipping
    steps: int = 2000
    warmup_steps: int = 100
    global_batch: int = 1024
    chunk_size: int = 64  # GradCache chunk (rows per forward); the global batch does not depend on it
    seed: int = 0
    # data
    train_data: list[str] = field(default_factory=list)  # jsonl/parquet files; one subset per file
    subset_weights: list[float] = field(default_factory=list)  # per-subset sampling weights (default uniform)
    eval_data: list[str] = field(default_factory=list)
    image_dir: str = ""
    allow_outside_images: bool = False  # read image paths leading out of image_dir (absolute, '..', symlinks)
    bad_images: str = "skip"  # "skip" (count, warn, replace the row) or "error"
    max_bad_fraction: float = 0.5  # 'skip' stops the run when more of the tried rows than this had bad images
    bad_rows: str = "error"  # malformed rows, found at start: "error" (stop naming file and row) or "skip"
    image_resolution: int = 0  # > 0: images resized to this square first (VLM2Vec: high 1344, low 128); 0: as stored
    num_frames: int = 8  # frames sampled uniformly per video row (VLM2Vec's num_frames)
    video_fps: float = 0.0  # > 0: a video file gives at most duration x video_fps frames (2 to num_frames)
    hard_negatives: int = 0  # hard negatives per query (neg_text/neg_image_path, the first so many); 0: none
    max_length: int = 512  # text tokens per sequence (image tokens are never cut); longer texts cut and counted
    num_workers: int | None = None  # data-loader processes per rank; None: train.loader.default_workers()
    eval_batch_size: int = 64  # rows per evaluation forward
    # output
    out_dir: str = "runs/pdf"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the latest intact checkpoint in out_dir (train/resume.py)
    overwrite: bool = False  # replace an earlier run's outputs in out_dir (otherwise such a folder is refused)
    stop_after: int = 0  # end this invocation after so many steps (checkpoint written); 0: run to the end
    evaluate: bool = True
    log_every: int = 1
    report_to: str = ""  # also log metrics to "tensorboard" or "wandb" (when installed)

    def __post_init__(self) -> None:
        for name, low in (("steps", 1), ("global_batch", 2), ("chunk_size", 1),
                          ("checkpoint_every", 1), ("log_every", 1), ("keep_checkpoints", 0), ("stop_after", 0),
                          ("warmup_steps", 0), ("lr", 0), ("max_grad_norm", 0),
                          ("mi_negative_run", 1), ("mi_warn_every", 1)):
            if not getattr(self, name) >= low:  # `not >=` also refuses NaN
                raise ConfigError(f"config: '{name}' expected >= {low}, got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ConfigError("config: 'resume' and 'overwrite' exclude each other (continue the run in out_dir, "
                             "or replace it)")
        if self.lora_r is None:
            self.lora_r = 0 if self.model.startswith("tiny") else 8  # no pretrained backbone: train all weights
        if self.bad_images not in ("skip", "error"):
            raise ConfigError(f"config: 'bad_images' expected 'skip' or 'error', got {self.bad_images!r}")
        for name, low in (("max_length", 1), ("eval_batch_size", 1), ("num_workers", 0), ("image_resolution", 0),
                          ("num_frames", 1), ("video_fps", 0)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"config: '{name}' expected >= {low}, got {getattr(self, name)}")
        if not 0 < self.max_bad_fraction <= 1:
            raise ConfigError(f"config: 'max_bad_fraction' expected in (0, 1], got {self.max_bad_fraction}")
        for name, allowed in (("bad_rows", ("skip", "error")), ("dtype", ("auto", "bf16", "fp32")),
                              ("report_to", ("", "tensorboard", "wandb"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config: '{name}' expected one of {allowed}, got {getattr(self, name)!r}")
        if self.subset_weights and len(self.subset_weights) != len(self.train_data):
            raise ConfigError(f"config: 'subset_weights' expected one weight per train_data file "
                             f"({len(self.train_data)}), got {len(self.subset_weights)}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are each valid but cannot work together, or would fail only at the first step."""
        weights = self.subset_weights
        if weights and not (all(0 <= w < float("inf") for w in weights) and sum(weights) > 0):
            raise ConfigError(f"config: 'subset_weights' expected finite weights >= 0 with a positive sum, got "
                             f"{weights}")
        # the sampler seeds a torch.Generator with seed * 1_000_003 + step, which must stay below 2**64
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"config: 'seed' expected an integer in [0, 2**32), got {self.seed!r}")
        try:
            _ = self.objective
        except ObjectiveError as error:
            raise ConfigError(f"config: {error}") from None

    @property
    def objective(self) -> Objective:
        """The objective (the same dataclass as the VLM2Vec integration's)."""
        return Objective(**{name: getattr(self, name) for name in OBJECTIVE_FIELDS})

    @property
    def uses_mim(self) -> bool:
        return self.objective.uses_mim

    @property
    def trains_estimator(self) -> bool:
        return self.objective.trains_estimator


SHIPPED = Path(__file__).resolve().parent / "configs"  # demo.yaml, the paper's configs per backbone, Table 3
# the Table 3 switches and the controlled baseline: --NAME applies configs/table3-NAME.yaml last (over the
# config file and every flag), in this order
TABLE3 = ("baseline", "prefix_only", "no_mim", "no_path_loss")


def table3(switch: str) -> dict:
    """The fields a Table 3 switch sets (``train/configs/table3-<switch>.yaml``)."""
    if switch not in TABLE3:
        raise ConfigError(f"config: Table 3 switch expected one of {TABLE3}, got {switch!r}")
    return _load_file(str(SHIPPED / f"table3-{switch.replace('_', '-')}.yaml"))


def config_file(name: str) -> Path:
    """``--config NAME``: the file as given, else a shipped configuration by file name or stem
    (``--config paper-qwen2vl-2b``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (SHIPPED / path.name, SHIPPED / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    raise FileNotFoundError(f"--config: {name} is neither a file nor a shipped configuration {shipped}")


def _load_file(name: str) -> dict:
    path = str(config_file(name))
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def parse(argv: list[str] | None = None) -> TrainConfig:
    """``--config FILE`` (YAML or JSON) first, then ``--name value`` flags for any field."""
    parser = argparse.ArgumentParser(description="PDF training (paper defaults; see train/config.py)")
    parser.add_argument("--config", default=None, help="YAML or JSON file of TrainConfig fields, or the name of "
                        "a shipped one (train/configs: demo, paper-qwen2vl-2b, ...)")
    for switch in TABLE3:
        parser.add_argument("--" + switch.replace("_", "-"), action="store_true",
                            help=f"apply train/configs/table3-{switch.replace('_', '-')}.yaml last")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":  # --name turns a default-off switch on; --no-name turns a default-on one off
            if f.default:
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    default=None)
            else:
                parser.add_argument(flag, action="store_true", default=None)
        elif f.type.startswith("list"):
            parser.add_argument(flag, nargs="*", default=None, type=float if "float" in f.type else str)
        else:
            kind = int if f.type.startswith("int") else float if f.type == "float" else str
            parser.add_argument(flag, type=kind, default=None)
    args = vars(parser.parse_args(argv))
    values = _load_file(args.pop("config")) if args.get("config") else {}
    # a file may name a switch as a field (``baseline: true``), as this trainer's files once did
    switches = [s for s in TABLE3 if args.pop(s) or values.pop(s, False)]
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"config file: unknown fields {sorted(unknown)}")
    values.update({k: v for k, v in args.items() if v is not None})
    for switch in switches:
        values.update(table3(switch))
    return TrainConfig(**values)
