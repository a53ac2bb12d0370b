"""Full PDF training inside VLM2Vec's own trainer (TIGER-AI-Lab/VLM2Vec), its ``train.py`` changed by two lines::

    from pdfkernels.integrations.vlm2vec import pdf_trainer
    trainer_cls = pdf_trainer(GradCacheLateProcessTrainer, num_paths=2, prefix_len=20)  # was: = GradCache...Trainer

``pdf_trainer(base)`` subclasses VLM2Vec's trainer class (``MMEBTrainer``, ``GradCacheLateProcessTrainer``, or
any ``transformers.Trainer`` whose model is an ``MMEBModel``) with ``PDFTrainerMixin``:

- **construction**: ``apply_pdf`` on the ``MMEBModel`` (prefix an fp32 master copy whatever the backbone's
  dtype), an fp32 aggregator and vCLUB estimator built from a fixed seed (identical on every rank), the
  estimator's own AdamW; the aggregator joins the Trainer's optimizer as one more parameter group.
- **step** (``training_step``, which VLM2Vec's loop calls unchanged): GradCache over VLM2Vec's chunk sizes
  (``gc_q_chunk_size``/``gc_p_chunk_size``; one chunk without them), every path through VLM2Vec's own
  ``model(qry=...)``/``model(tgt=...)`` (so its autocast, DDP wrapper and ``encode_input`` are used); stage 1:
  ``estimator_steps`` estimator updates on the detached embeddings gathered from every rank (the same data
  on every rank keeps the estimator identical there without a collective on its gradients); stage 2:
  InfoNCE(aggregate) + lambda_con * mean per-path InfoNCE on the global batch (differentiable all-gather)
  + lambda_mim * vCLUB (negatives across ranks); then chunk-wise re-forward (RNG replayed) and backward
  of the cached gradients, DDP's all-reduce only on the last chunk. Gradients equal one process's on the
  union batch; the returned loss is the union batch's, on the scale VLM2Vec logs (its ``loss × world /
  world``). Unlike VLM2Vec's own single-process step, one process trains too.
- **checkpoints**: every save (``checkpoint-N/`` and the final ``save_model``) also writes ``pdf.safetensors``
  (prefix, aggregator, estimator; ``models.save_pdf``) and the estimator optimizer's state; the Trainer's
  ``optimizer.pt`` holds the prefix's and aggregator's AdamW state. On resume VLM2Vec rebuilds the model
  (``MMEBModel.load``, unpatched): the mixin re-applies PDF, then loads. A checkpoint without
  ``pdf.safetensors`` is refused before anything loads; a PDF checkpoint resumed by VLM2Vec's plain trainer
  is refused by torch's optimizer-state check (a different parameter layout), never silently continued.

The aggregator's gradients are not clipped: VLM2Vec's loop clips ``model.parameters()`` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import torch
from torch import nn

from pdfkernels import models
from pdfkernels.models.anatomy import hf_model
from pdfkernels.models.contrastive import gather, pdf_contrastive, world

PDF_FILE = "pdf.safetensors"
ESTIMATOR_OPTIMIZER_FILE = "pdf_estimator_optimizer.pt"

__all__ = ["ESTIMATOR_OPTIMIZER_FILE", "PDF_FILE", "PDFSettings", "PDFTrainerMixin", "load_checkpoint",
           "pdf_trainer"]


@dataclasses.dataclass(frozen=True)
class PDFSettings:
    """The PDF objective's settings (the paper's defaults; ``temperature=None`` takes VLM2Vec's
    ``--temperature`` from the ``MMEBModel``)."""

    num_paths: int = 2
    prefix_len: int = 20
    lambda_con: float = 1.0
    lambda_mim: float = 1e-4
    estimator_steps: int = 1
    estimator_lr: float = 1e-4
    temperature: float | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("num_paths", "prefix_len", "estimator_steps", "seed"):
            value = getattr(self, name)
            low = 1 if name in ("num_paths", "estimator_steps") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"pdf_trainer: argument '{name}' expected an int >= {low}, got {value!r}")
        for name in ("lambda_con", "lambda_mim", "estimator_lr", "temperature"):
            value = getattr(self, name)
            if value is None and name == "temperature":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
                    value == 0 and name in ("estimator_lr", "temperature")):
                raise ValueError(f"pdf_trainer: argument '{name}' expected a number > 0 "
                                 f"{'' if name in ('estimator_lr', 'temperature') else 'or 0 '}, got {value!r}")

    @property
    def uses_mim(self) -> bool:
        return self.num_paths > 1 and self.lambda_mim > 0


def _patch(model: nn.Module, settings: PDFSettings) -> None:
    """``apply_pdf`` on an unpatched model; a patched one must have the settings' N and K."""
    hf = hf_model(model)
    if not hasattr(hf, "pdf_prefix"):
        models.apply_pdf(model, settings.num_paths, settings.prefix_len, seed=settings.seed)
    elif (hf.pdf_num_paths, hf.pdf_prefix_len) != (settings.num_paths, settings.prefix_len):
        raise ValueError(f"pdf_trainer: the model is already patched with num_paths={hf.pdf_num_paths}, "
                         f"prefix_len={hf.pdf_prefix_len}, but the trainer asks for num_paths={settings.num_paths}, "
                         f"prefix_len={settings.prefix_len}")
    models.mark_pdf_trainable(model)  # peft may have frozen it


def build_heads(model: nn.Module, settings: PDFSettings) -> tuple[nn.Module | None, nn.Module | None]:
    """The aggregator (N > 1) and the vCLUB estimator (when the MIM term is on), fp32, from ``settings.seed``
    (the global RNG is left as it was): every rank builds the same weights."""
    dim = models.text_config(model).hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        aggregator = models.Aggregator(dim, settings.num_paths) if settings.num_paths > 1 else None
        estimator = models.VCLUB(dim) if settings.uses_mim else None
    return aggregator, estimator


def split_rows(batch: dict, size: int | None) -> list[dict]:
    """A collated batch in chunks of ``size`` rows: every tensor and list split along its first dimension, as
    VLM2Vec's GradCache splits its inputs; other values are shared."""
    rows = len(batch["input_ids"])
    if not size or size >= rows:
        return [batch]
    return [{k: v[start:start + size] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) == rows else v
             for k, v in batch.items()} for start in range(0, rows, size)]


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict)) for v in value):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _gather_detached(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x [N, B, d]`` along the batch, without gradients (the estimator's data)."""
    if world()[1] == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world()[1])]
    torch.distributed.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=1)


class _RandomState:
    """The RNG state before a chunk's first forward, replayed for its re-forward (dropout masks match) without
    moving the outer stream."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.gpu = torch.cuda.get_rng_state(device) if self.cuda is not None else None

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.cuda] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.gpu, self.cuda)
            yield


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

    pdf_settings: PDFSettings = PDFSettings()

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        if model is None or not hasattr(model, "encode_input"):
            raise TypeError(f"pdf_trainer: argument 'model' expected VLM2Vec's MMEBModel (with encode_input), got "
                            f"{type(model).__name__}")
        _patch(model, self.pdf_settings)
        self.pdf_aggregator, self.pdf_estimator = build_heads(model, self.pdf_settings)
        self.pdf_metrics: dict[str, float] = {}
        super().__init__(*args, **kwargs)
        for head in (self.pdf_aggregator, self.pdf_estimator):
            if head is not None:
                head.to(self.args.device)
        self.pdf_estimator_optimizer = (None if self.pdf_estimator is None else torch.optim.AdamW(
            self.pdf_estimator.parameters(), lr=self.pdf_settings.estimator_lr))
        self.add_callback(_ZeroHeadGrads(self))

    # --- optimizer: the aggregator trains with the backbone's adapters and the prefix
    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.pdf_aggregator is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [p for p in self.pdf_aggregator.parameters() if id(p) not in held]
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    # --- the step
    def _pdf_temperature(self) -> float:
        if self.pdf_settings.temperature is not None:
            return self.pdf_settings.temperature
        return float(getattr(self.model, "temperature", 0.02))

    def _pdf_encode(self, model: nn.Module, chunk: dict, side: str) -> torch.Tensor:
        """``[N, b, d]`` fp32 embeddings of every path through VLM2Vec's own forward (k·b rows, path-major)."""
        reps = model(**{side: chunk})[f"{side}_reps"]
        return reps.float().view(self.pdf_settings.num_paths, -1, reps.shape[-1])

    def training_step(self, model: nn.Module, inputs, *args, **kwargs) -> torch.Tensor:
        model.train()
        for head in (self.pdf_aggregator, self.pdf_estimator):
            if head is not None:
                head.train()
        settings, device = self.pdf_settings, self.args.device
        queries, targets = _to_device(inputs[0], device), _to_device(inputs[1], device)
        sides = (("qry", split_rows(queries, getattr(self.args, "gc_q_chunk_size", None))),
                 ("tgt", split_rows(targets, getattr(self.args, "gc_p_chunk_size", None))))
        paths = list(range(settings.num_paths))
        _, world_size = world()

        # 1. chunked forward without gradients, each chunk's RNG state kept for its re-forward
        reps, states = {}, {}
        with torch.no_grad(), models.use_paths(self.model, paths):
            for side, chunks in sides:
                states[side] = [_RandomState(device) for _ in chunks]
                parts = []
                for chunk, state in zip(chunks, states[side]):
                    with state.replay():
                        parts.append(self._pdf_encode(model, chunk, side))
                reps[side] = torch.cat(parts, dim=1)
        metrics = {}

        # 2. stage 1: the estimator on every rank's detached embeddings (the same on every rank)
        if self.pdf_estimator is not None:
            q_all, t_all = _gather_detached(reps["qry"]), _gather_detached(reps["tgt"])
            for step in range(settings.estimator_steps):
                self.pdf_estimator_optimizer.zero_grad(set_to_none=True)
                est = (self.pdf_estimator.estimator_loss(q_all) + self.pdf_estimator.estimator_loss(t_all)) / 2
                est.backward()
                self.pdf_estimator_optimizer.step()
                if step == 0:
                    metrics["loss_estimator"] = est.detach()

        # 3. stage 2, estimator frozen: the loss on the cached embeddings, its gradients cached
        leaves = {side: r.clone().requires_grad_() for side, r in reps.items()}
        loss, agg, per_path = pdf_contrastive(gather(leaves["qry"], dim=1), gather(leaves["tgt"], dim=1),
                                              self.pdf_aggregator, self._pdf_temperature(), settings.lambda_con)
        metrics.update(loss_agg=agg.detach(), loss_path=per_path.detach())
        backward = loss
        if self.pdf_estimator is not None:
            mim = (self.pdf_estimator.mim_loss(leaves["qry"]) + self.pdf_estimator.mim_loss(leaves["tgt"])) / 2
            metrics["mim"] = mim.detach()
            loss = loss + settings.lambda_mim * mim
            # mim_loss's gradients are exact per rank (not summed by a gather): DDP's mean needs world_size
            backward = backward + settings.lambda_mim * world_size * mim
        backward.backward()

        # 4. re-forward chunk by chunk with gradients, backpropagating the cached gradients; DDP reduces once
        sync = getattr(model, "no_sync", None)
        last = (sides[-1][0], len(sides[-1][1]) - 1)
        with models.use_paths(self.model, paths):
            for side, chunks in sides:
                grad, offset = leaves[side].grad, 0
                for index, (chunk, state) in enumerate(zip(chunks, states[side])):
                    context = sync() if sync is not None and (side, index) != last else contextlib.nullcontext()
                    with context:
                        with state.replay():
                            chunk_reps = self._pdf_encode(model, chunk, side)
                        rows = chunk_reps.shape[1]
                        torch.dot(chunk_reps.flatten(), grad[:, offset:offset + rows].flatten()).backward()
                    offset += rows
        metrics["loss"] = loss.detach()
        self.pdf_metrics = {k: float(v) for k, v in metrics.items()}
        return loss.detach()

    def log(self, logs: dict, *args, **kwargs):
        """The PDF terms of the latest step beside the Trainer's loss (``pdf/loss_agg`` etc.)."""
        if "loss" in logs and self.pdf_metrics:
            logs = {**logs, **{f"pdf/{k}": v for k, v in self.pdf_metrics.items() if k != "loss"}}
        return super().log(logs, *args, **kwargs)

    # --- checkpoints
    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        models.save_pdf(os.path.join(output_dir, PDF_FILE), self.model, self.pdf_aggregator, self.pdf_estimator)
        if self.pdf_estimator_optimizer is not None:
            torch.save(self.pdf_estimator_optimizer.state_dict(), os.path.join(output_dir, ESTIMATOR_OPTIMIZER_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None):
        path = os.path.join(resume_from_checkpoint, PDF_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} holds no {PDF_FILE}: it was written "
                             f"by a run without PDF, and a PDF run does not continue from it (start the PDF run "
                             f"afresh, or resume this checkpoint with the plain trainer)")
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # VLM2Vec rebuilds self.model, unpatched
        target = self.model if model is None or not hasattr(model, "encode_input") else model
        _patch(target, self.pdf_settings)
        models.load_pdf(path, target, self.pdf_aggregator, self.pdf_estimator)
        if self.pdf_estimator_optimizer is not None:
            state = torch.load(os.path.join(resume_from_checkpoint, ESTIMATOR_OPTIMIZER_FILE), weights_only=True,
                               map_location="cpu")
            self.pdf_estimator_optimizer.load_state_dict(state)


def pdf_trainer(base: type, **settings) -> type:
    """``base`` (VLM2Vec's ``GradCacheLateProcessTrainer``, ``MMEBTrainer``, ...) trained on the PDF objective;
    ``settings``: the fields of ``PDFSettings``. Constructed exactly as ``base``."""
    return type(f"PDF{base.__name__}", (PDFTrainerMixin, base), {"pdf_settings": PDFSettings(**settings)})


def load_checkpoint(model: nn.Module, directory: str | os.PathLike, aggregator: bool = False):
    """Deploy from a VLM2Vec checkpoint (``checkpoint-N/`` or the final output folder): patch ``model`` (e.g.
    ``MMEBModel.load(model_args)``) with the N and K stored in its ``pdf.safetensors`` and load the prefix;
    with ``aggregator=True`` also return the trained aggregator (the "aggregate" strategy). Then embed
    with ``models.use_paths(model, 0)`` (the single-prefix embedding)."""
    from safetensors import safe_open

    path = os.path.join(directory, PDF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: {directory} holds no {PDF_FILE} (not written by a PDF run)")
    with safe_open(path, framework="pt") as f:
        stored = json.loads((f.metadata() or {}).get("pdf", "{}"))
    settings = PDFSettings(num_paths=stored["num_paths"], prefix_len=stored["prefix_len"], lambda_mim=0.0)
    _patch(model, settings)
    head = build_heads(model, settings)[0] if aggregator else None
    models.load_pdf(path, model, head)
    return (model, head) if aggregator else model
