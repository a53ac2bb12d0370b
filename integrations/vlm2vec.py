"""Full PDF training inside VLM2Vec's own trainer (TIGER-AI-Lab/VLM2Vec), its ``train.py`` changed by two lines::

    from pdfkernels.integrations.vlm2vec import pdf_trainer
    trainer_cls = pdf_trainer(GradCacheLateProcessTrainer, num_paths=2, prefix_len=20)  # was: = GradCache...Trainer

``pdf_trainer(base)`` subclasses VLM2Vec's trainer class (``MMEBTrainer``, ``GradCacheLateProcessTrainer``, or
any ``transformers.Trainer`` whose model is an ``MMEBModel``) with ``PDFTrainerMixin``:

- **construction**: ``apply_pdf`` on the ``MMEBModel`` (prefix an fp32 master copy whatever the backbone's
  dtype), an fp32 aggregator and vCLUB estimator built from a fixed seed (identical on every rank), the
  estimator's own AdamW; the aggregator joins the Trainer's optimizer as one more parameter group.
- **step** (``training_step``, which VLM2Vec's loop calls unchanged): the one GradCache step of both trainers
  (``models/gradcache.py``) over VLM2Vec's chunk sizes (``gc_q_chunk_size``/``gc_p_chunk_size``; one chunk
  without them; hard negatives in target-sized chunks), every path through VLM2Vec's own
  ``model(qry=...)``/``model(tgt=...)`` (so its autocast, DDP or DeepSpeed wrapper and ``encode_input`` are
  used); the hard negatives of either collator layout (``vlm2vec_inputs.py``) join every path's and the
  aggregate's candidates across ranks; the backward as the Trainer's would with ``--fp16``, gradient
  accumulation, DDP and DeepSpeed ZeRO-1/2 (``vlm2vec_backward.py``; ZeRO-3 refused). Gradients equal one
  process's on the union batch; the returned loss is the union batch's, on the scale VLM2Vec logs (its
  ``loss × world / world``), divided by the accumulation steps as the Trainer's. Unlike VLM2Vec's own
  single-process step, one process trains too.
- **checkpoints**: every save (``checkpoint-N/`` and the final ``save_model``) also writes ``pdf.safetensors``
  (prefix, aggregator, estimator; ``models.save_pdf``) and the estimator optimizer's state; the Trainer's
  ``optimizer.pt`` holds the prefix's and aggregator's AdamW state. On resume VLM2Vec rebuilds the model
  (``MMEBModel.load``, unpatched): the mixin re-applies PDF, then loads. A checkpoint without
  ``pdf.safetensors`` is refused before anything loads; a PDF checkpoint resumed by VLM2Vec's plain trainer
  is refused by torch's optimizer-state check (a different parameter layout), never silently continued.

The aggregator's gradients are not clipped: the Trainer's loop clips ``model.parameters()`` (the prefix with
them) only.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from torch import nn

from pdfkernels import models
from pdfkernels.models.anatomy import hf_model
from pdfkernels.models.gradcache import NEGATIVE, QUERY, TARGET, Batch, Heads, gradcache_step
from pdfkernels.models.objective import Objective, ObjectiveError

from .vlm2vec_backward import accumulation_steps, check_deepspeed, deepspeed_stage, trainer_hooks
from .vlm2vec_inputs import split_inputs, split_rows, to_device

PDF_FILE = "pdf.safetensors"
ESTIMATOR_OPTIMIZER_FILE = "pdf_estimator_optimizer.pt"
AGGREGATOR_OPTIMIZER_FILE = "pdf_aggregator_optimizer.pt"  # DeepSpeed only (elsewhere in the Trainer's optimizer)

__all__ = ["AGGREGATOR_OPTIMIZER_FILE", "ESTIMATOR_OPTIMIZER_FILE", "PDF_FILE", "PDFObjective", "PDFTrainerMixin",
           "load_pdf_weights", "pdf_trainer"]


@dataclasses.dataclass(frozen=True)
class PDFObjective(Objective):
    """The objective as ``pdf_trainer`` takes it (``models/objective.py``, the lean trainer's
    too); ``temperature=None`` (the default here) takes VLM2Vec's ``--temperature`` from the ``MMEBModel``."""

    temperature: float | None = None


def objective_of(**fields) -> PDFObjective:
    """``PDFObjective(**fields)``, a refused value named as ``pdf_trainer``'s argument."""
    try:
        return PDFObjective(**fields)
    except ObjectiveError as error:
        raise ValueError(f"pdf_trainer: argument {error}") from None


def _patch(model: nn.Module, objective: PDFObjective) -> None:
    """``apply_pdf`` on an unpatched model; a patched one must have the objective's N and K."""
    hf = hf_model(model)
    if not hasattr(hf, "pdf_prefix"):
        models.apply_pdf(model, objective.num_paths, objective.prefix_len, seed=objective.seed)
    elif (hf.pdf_num_paths, hf.pdf_prefix_len) != (objective.num_paths, objective.prefix_len):
        raise ValueError(f"pdf_trainer: the model is already patched with num_paths={hf.pdf_num_paths}, "
                         f"prefix_len={hf.pdf_prefix_len}, but the trainer asks for num_paths={objective.num_paths}, "
                         f"prefix_len={objective.prefix_len}")
    models.mark_pdf_trainable(model)  # peft may have frozen it


def build_heads(model: nn.Module, objective: PDFObjective) -> tuple[nn.Module | None, nn.Module | None]:
    """The aggregator (N > 1) and the vCLUB estimator (when the MIM term is on), fp32, from ``objective.seed``
    (the global RNG is left as it was): every rank builds the same weights."""
    dim = models.text_config(model).hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(objective.seed)
        aggregator = models.Aggregator(dim, objective.num_paths) if objective.num_paths > 1 else None
        estimator = models.VCLUB(dim) if objective.trains_estimator else None
    return aggregator, estimator


class _ZeroHeadGrads:
    """After each optimizer step the loop zeroes ``model``'s gradients only: the aggregator's too (a
    ``TrainerCallback`` by duck typing, so that transformers is not imported here)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def __getattr__(self, name):  # every other event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.pdf_aggregator is not None:
            self.trainer.pdf_aggregator.zero_grad(set_to_none=True)


class PDFTrainerMixin:
    """Put before VLM2Vec's trainer class (``pdf_trainer`` does): see the module's docstring."""

    pdf_objective: PDFObjective = PDFObjective()

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None or not hasattr(model, "encode_input"):
            raise TypeError(f"pdf_trainer: argument 'model' expected VLM2Vec's MMEBModel (with encode_input), got "
                            f"{type(model).__name__}")
        _patch(model, self.pdf_objective)
        self.pdf_aggregator, self.pdf_estimator = build_heads(model, self.pdf_objective)
        self.pdf_metrics: dict[str, float] = {}
        self.pdf_aggregator_optimizer = None  # DeepSpeed only (create_optimizer)
        self._pdf_aggregator_state = None  # its state from a checkpoint, loaded when it is built
        super().__init__(*args, **kwargs)
        check_deepspeed(self)
        for head in (self.pdf_aggregator, self.pdf_estimator):
            if head is not None:
                head.to(self.args.device)
        self.pdf_estimator_optimizer = (None if self.pdf_estimator is None else torch.optim.AdamW(
            self.pdf_estimator.parameters(), lr=self.pdf_objective.estimator_lr))
        self.add_callback(_ZeroHeadGrads(self))

    # --- optimizer: the aggregator trains with the backbone's adapters and the prefix
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.pdf_aggregator is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [p for p in self.pdf_aggregator.parameters() if id(p) not in held]
            group = {"params": params, "weight_decay": self.args.weight_decay}
            if params and deepspeed_stage(self) is None:
                optimizer.add_param_group(group)
            elif params:  # ZeRO takes only the engine's parameters: the aggregator gets an optimizer of the same kind
                cls, options = self.get_optimizer_cls_and_kwargs(self.args)
                self.pdf_aggregator_optimizer = cls([group], **options)
                if self._pdf_aggregator_state is not None:
                    self.pdf_aggregator_optimizer.load_state_dict(self._pdf_aggregator_state)
        return optimizer

    def pdf_step_aggregator(self, lr: float) -> None:
        """Under DeepSpeed, after the engine's step: the aggregator's, at the engine's learning rate of it."""
        if self.pdf_aggregator_optimizer is not None:
            for group in self.pdf_aggregator_optimizer.param_groups:
                group["lr"] = lr
            self.pdf_aggregator_optimizer.step()

    # --- the step
    def _pdf_temperature(self) -> float:
        if self.pdf_objective.temperature is not None:
            return self.pdf_objective.temperature
        return float(getattr(self.model, "temperature", 0.02))

    def _pdf_encode(self, model: nn.Module, chunk: dict, side: str) -> torch.Tensor:
        """``[N, b, d]`` fp32 embeddings of every path through VLM2Vec's own forward (k·b rows, path-major)."""
        reps = model(**{side: chunk})[f"{side}_reps"]
        return reps.float().view(self.pdf_objective.num_paths, -1, reps.shape[-1])

    def training_step(self, model: nn.Module, inputs, *args, **kwargs) -> torch.Tensor:
        model.train()
        for head in (self.pdf_aggregator, self.pdf_estimator):
            if head is not None:
                head.train()
        objective = self.pdf_objective
        queries, targets, negatives, valid = split_inputs(to_device(inputs, self.args.device),
                                                          objective.hard_negatives)
        target_size = getattr(self.args, "gc_p_chunk_size", None)
        batch = Batch(split_rows(queries, getattr(self.args, "gc_q_chunk_size", None)),
                      split_rows(targets, target_size),
                      split_rows(negatives, target_size) if negatives is not None else [], valid)
        sides = {QUERY: "qry", TARGET: "tgt", NEGATIVE: "tgt"}  # negatives are encoded as targets
        paths = list(range(objective.num_paths))

        def encode(side: str, chunk: dict) -> torch.Tensor:
            with models.use_paths(self.model, paths):
                return self._pdf_encode(model, chunk, sides[side])

        hooks = trainer_hooks(self, model)
        result = gradcache_step(encode, batch, objective, self._pdf_temperature(),
                                Heads(self.pdf_aggregator, self.pdf_estimator, self.pdf_estimator_optimizer), hooks)
        self.pdf_metrics = {k: float(v) for k, v in result.metrics.items()}
        return result.loss / accumulation_steps(self)

    def log(self, logs: dict, *args, **kwargs):
        """The PDF terms of the latest step beside the Trainer's loss (``pdf/loss_agg`` etc.)."""
        if "loss" in logs and self.pdf_metrics:
            logs = {**logs, **{f"pdf/{k}": v for k, v in self.pdf_metrics.items() if k != "loss"}}
        return super().log(logs, *args, **kwargs)

    # --- checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None):
        if not self.args.should_save:
            # DeepSpeed's save_model calls _save on every rank (the state already gathered); one rank writes, as
            # in the Trainer's own _save: two ranks renaming one temporary file into place raced
            return
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        models.save_pdf(os.path.join(output_dir, PDF_FILE), self.model, self.pdf_aggregator, self.pdf_estimator)
        for optimizer, name in ((self.pdf_estimator_optimizer, ESTIMATOR_OPTIMIZER_FILE),
                                (self.pdf_aggregator_optimizer, AGGREGATOR_OPTIMIZER_FILE)):
            if optimizer is not None:
                torch.save(optimizer.state_dict(), os.path.join(output_dir, name))

    def _pdf_file(self, checkpoint: str) -> str:
        path = os.path.join(checkpoint, PDF_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {checkpoint} holds no {PDF_FILE}: it was written "
                             f"by a run without PDF, and a PDF run does not continue from it (start the PDF run "
                             f"afresh, or resume this checkpoint with the plain trainer)")
        return path

    def _pdf_load(self, checkpoint: str, target: nn.Module) -> None:
        """The prefix (into ``target``), the heads and their optimizers' states from ``checkpoint``."""
        _patch(target, self.pdf_objective)
        models.load_pdf(self._pdf_file(checkpoint), target, self.pdf_aggregator, self.pdf_estimator)
        if self.pdf_estimator_optimizer is not None:
            self.pdf_estimator_optimizer.load_state_dict(torch.load(
                os.path.join(checkpoint, ESTIMATOR_OPTIMIZER_FILE), weights_only=True, map_location="cpu"))
        if deepspeed_stage(self) is not None and self.pdf_aggregator is not None:  # loaded when it is built
            self._pdf_aggregator_state = torch.load(os.path.join(checkpoint, AGGREGATOR_OPTIMIZER_FILE),
                                                    weights_only=True, map_location="cpu")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        self._pdf_file(resume_from_checkpoint)  # refused before anything loads
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # VLM2Vec rebuilds self.model, unpatched
        self._pdf_load(resume_from_checkpoint, self.model if model is None or not hasattr(model, "encode_input")
                       else model)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Under DeepSpeed the Trainer resumes through the engine's checkpoint (the model, prefix included) and
        never calls ``_load_from_checkpoint``: the heads and their optimizers are loaded here."""
        if resume_from_checkpoint and deepspeed_stage(self) is not None:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                from transformers.trainer_utils import get_last_checkpoint

                checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint:
                self._pdf_load(str(checkpoint), self.model)
        return super().train(resume_from_checkpoint, *args, **kwargs)


def pdf_trainer(base: type, **fields) -> type:
    """``base`` (VLM2Vec's ``GradCacheLateProcessTrainer``, ``MMEBTrainer``, ...) trained on the PDF objective;
    ``fields``: those of ``PDFObjective`` (``models.objective.Objective``'s). Constructed exactly as ``base``."""
    return type(f"PDF{base.__name__}", (PDFTrainerMixin, base), {"pdf_objective": objective_of(**fields)})


def load_pdf_weights(model: nn.Module, directory: str | os.PathLike, aggregator: bool = False):
    """Deploy from a VLM2Vec checkpoint (``checkpoint-N/`` or the final output folder): patch ``model`` (e.g.
    ``MMEBModel.load(model_args)``) with the N and K stored in its ``pdf.safetensors`` and load the prefix;
    with ``aggregator=True`` also return the trained aggregator (the "aggregate" strategy). Then embed
    with ``models.use_paths(model, 0)`` (the single-prefix embedding)."""
    from safetensors import safe_open

    path = os.path.join(directory, PDF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_pdf_weights: {directory} holds no {PDF_FILE} (not written by a PDF run)")
    with safe_open(path, framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("pdf", "{}"))
    objective = PDFObjective(num_paths=stored["num_paths"], prefix_len=stored["prefix_len"], lambda_mim=0.0)
    _patch(model, objective)
    head = build_heads(model, objective)[0] if aggregator else None
    models.load_pdf(path, model, head)
    return (model, head) if aggregator else model
