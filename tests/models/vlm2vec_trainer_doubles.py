"""Small doubles of VLM2Vec's trainer structure (written here, not copied), what our integration meets:

- ``ModelArgs``/``TrainingArgs``: the fields VLM2Vec's ``MMEBModel.build``/``load`` and its trainer read
  (``checkpoint_path``, ``temperature``; ``gc_q_chunk_size``/``gc_p_chunk_size``).
- ``MMEBModel``: ``build`` (the backbone in the requested dtype, DoRA on VLM2Vec's targets) and ``load``
  (rebuild the backbone, then the adapters from ``checkpoint_path``, trainable) classmethods; ``forward(qry,
  tgt)`` returning ``{"qry_reps", "tgt_reps"}`` for one side, else the dot-product InfoNCE over the
  all-gathered reps, times the world size under DDP.
- ``Collator(negatives=...)``: hard negatives as VLM2Vec's ``b3``/``v2.2`` collators lay them out
  (``"grouped"``: each query's positive then its negatives in the target batch, rows with fewer padded up to
  the batch's most with an empty text) or as a third batch (``"batch"``, query-major), the batch's ``text``
  list beside the tensors (VLM2Vec's vendored forwards take and ignore it; ``encode_input`` here drops it).
- ``MMEBTrainer(transformers.Trainer)``: ``(qry, tgt)`` batches, its own dataloader (no accelerate
  sharding, each rank its own rows), ``_save`` writing only the encoder's adapters after asserting every key
  starts with ``encoder.``, ``_load_from_checkpoint`` replacing ``self.model`` with ``MMEBModel.load``.
- ``GradCacheTrainer(MMEBTrainer)``: ``training_step`` with GradCache under DDP (chunked forward without
  gradients, loss on the cached reps, chunk-wise re-forward and backward, no_sync except the last chunk),
  the loss times the world size and divided by it on return; one process: ``model(qry, tgt)`` and no
  backward, as VLM2Vec.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainingArguments

from tests.models import vlm2vec_doubles

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


@dataclass
class ModelArgs:
    dtype: str = "float32"
    checkpoint_path: str | None = None
    temperature: float = 0.02
    seed: int = 0  # the "pretrained" backbone: the same random weights on every build


@dataclass
class TrainingArgs(TrainingArguments):
    gc_q_chunk_size: int = field(default=2)
    gc_p_chunk_size: int = field(default=2)


def _backbone(model_args: ModelArgs):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_args.seed)
        base = vlm2vec_doubles.build_double("vendored-qwen2vl", "sdpa")
    base.config.use_cache = False
    return base.to(getattr(torch, model_args.dtype))


def _gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    parts[dist.get_rank()] = t  # the own slot keeps its graph
    return torch.cat(parts)


class MMEBModel(vlm2vec_doubles.MMEBModel):
    @classmethod
    def build(cls, model_args: ModelArgs):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian",
                                 use_dora=True, inference_mode=False, lora_dropout=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_args.seed + 1)
            encoder = peft.get_peft_model(_backbone(model_args), config)
        return cls(encoder, temperature=model_args.temperature)

    @classmethod
    def load(cls, model_args: ModelArgs, is_trainable: bool = True):
        encoder = peft.PeftModel.from_pretrained(_backbone(model_args), model_args.checkpoint_path,
                                                 is_trainable=is_trainable)
        return cls(encoder, temperature=model_args.temperature)

    def encode_input(self, input):
        return super().encode_input({k: v for k, v in input.items() if isinstance(v, torch.Tensor)})

    def forward(self, qry=None, tgt=None, *args, **kwargs):
        qry_reps = self.encode_input(qry) if qry else None
        tgt_reps = self.encode_input(tgt) if tgt else None
        if qry_reps is None or tgt_reps is None:
            return {"qry_reps": qry_reps, "tgt_reps": tgt_reps}
        return contrastive(qry_reps, tgt_reps, self.temperature)


def contrastive(q: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """VLM2Vec's loss: dot-product logits over the gathered reps, times the world size under DDP."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if distributed:
        q, t = _gather(q), _gather(t)
    loss = F.cross_entropy(q @ t.T / temperature, torch.arange(q.shape[0], device=q.device))
    return loss * dist.get_world_size() if distributed else loss


class Collator:
    """Rows ``{"qry": ids, "tgt": ids[, "neg": [ids, ...]]}`` -> ``(qry, tgt)`` batches, padded on ``padding``;
    ``negatives``: None (left out), ``"grouped"`` or ``"batch"`` (see the module's docstring)."""

    FILLER = [1, 1]  # the ids of an empty text's row (VLM2Vec's processor still makes tokens of '')

    def __init__(self, padding: str = "left", negatives: str | None = None, hard_negatives: int = 0):
        self.padding, self.negatives, self.hard_negatives = padding, negatives, hard_negatives

    def _batch(self, rows, texts=None):
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(length - len(row), length) if self.padding == "left" else slice(0, len(row))
            ids[b, span], mask[b, span] = torch.tensor(row), 1
        batch = {"input_ids": ids, "attention_mask": mask}
        return batch if texts is None else {**batch, "text": texts}

    def __call__(self, examples):
        qry = self._batch([e["qry"] for e in examples])
        if self.negatives is None:
            return qry, self._batch([e["tgt"] for e in examples])
        if self.negatives == "batch":  # the first H of each row, query-major
            negs = [n for e in examples for n in e["neg"][:self.hard_negatives]]
            return qry, self._batch([e["tgt"] for e in examples]), self._batch(negs, ["neg"] * len(negs))
        most = max(len(e["neg"]) for e in examples)
        rows, texts = [], []
        for e in examples:
            padding = most - len(e["neg"])
            rows += [e["tgt"], *e["neg"], *[self.FILLER] * padding]
            texts += ["pos"] + ["neg"] * len(e["neg"]) + [""] * padding
        return qry, self._batch(rows, texts)


def make_rows(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        lengths = torch.randint(3, 9, (2,), generator=generator).tolist()
        rows.append({side: torch.randint(10, 100, (n,), generator=generator).tolist()
                     for side, n in zip(("qry", "tgt"), lengths)})
    return rows


def add_negatives(rows: list[dict], counts: list[int], seed: int) -> list[dict]:
    """``rows`` with ``counts[i]`` random negatives each (their own generator: the rows stay as they were)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row, count in zip(rows, counts):
        lengths = torch.randint(3, 9, (count,), generator=generator).tolist()
        out.append({**row, "neg": [torch.randint(10, 100, (n,), generator=generator).tolist() for n in lengths]})
    return out


class MMEBTrainer(Trainer):
    def __init__(self, *args, model_args: ModelArgs | None = None, max_length: int | None = None, **kwargs):
        self.model_args = model_args
        super().__init__(*args, **kwargs)
        self.is_ddp = dist.is_initialized()
        self._dist_loss_scale_factor = dist.get_world_size() if self.is_ddp else 1

    def compute_loss(self, model, inputs, *args, **kwargs):
        return model(qry=inputs[0], tgt=inputs[1])

    def get_train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          sampler=SequentialSampler(self.train_dataset), drop_last=True)

    def _save(self, output_dir=None, state_dict=None):
        state_dict = self.model.state_dict() if state_dict is None else state_dict
        assert all(k.startswith("encoder.") for k in state_dict), list(state_dict)
        self.model.encoder.save_pretrained(output_dir, state_dict={k[len("encoder."):]: v for k, v in
                                                                   state_dict.items()})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.model_args.checkpoint_path = resume_from_checkpoint
        self.model = MMEBModel.load(self.model_args)
        self.model_wrapped = self.model


class GradCacheTrainer(MMEBTrainer):
    def _cache_step(self, model, queries, targets):
        sides = [("qry", queries, self.args.gc_q_chunk_size), ("tgt", targets, self.args.gc_p_chunk_size)]
        chunks = {side: [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, len(batch["input_ids"]),
                                                                                  size)]
                  for side, batch, size in sides}
        reps, states = {}, {}
        with torch.no_grad():
            for side, parts in chunks.items():
                states[side] = [torch.get_rng_state() for _ in parts]
                reps[side] = torch.cat([model(**{side: c})[f"{side}_reps"] for c in parts])
        leaves = {side: r.detach().requires_grad_() for side, r in reps.items()}
        loss = contrastive(leaves["qry"], leaves["tgt"], self.model.temperature)
        loss.backward()
        order = [(side, i) for side, parts in chunks.items() for i in range(len(parts))]
        for side, parts in chunks.items():
            offset = 0
            for i, chunk in enumerate(parts):
                context = model.no_sync() if (side, i) != order[-1] else contextlib.nullcontext()
                with context, torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(states[side][i])
                    out = model(**{side: chunk})[f"{side}_reps"]
                    rows = out.shape[0]
                    torch.dot(out.flatten(), leaves[side].grad[offset:offset + rows].flatten()).backward()
                offset += rows
        return loss.detach()

    def training_step(self, model, inputs, *args, **kwargs):
        model.train()
        queries, targets = inputs
        if self.is_ddp and dist.get_world_size() > 1:
            loss = self._cache_step(model, queries, targets)
        else:
            loss = model(queries, targets)  # VLM2Vec's one-process step: no backward
        return loss / self._dist_loss_scale_factor


def training_args(output_dir: str, **overrides) -> TrainingArgs:
    values = dict(output_dir=output_dir, per_device_train_batch_size=4, learning_rate=1e-3, max_steps=1,
                  report_to=[], save_strategy="no", logging_steps=1, remove_unused_columns=False, use_cpu=True,
                  max_grad_norm=0.0, lr_scheduler_type="constant", seed=0, disable_tqdm=True,
                  dataloader_num_workers=0)
    values.update(overrides)
    return TrainingArgs(**values)


@contextlib.contextmanager
def gloo_rank(rank: int, world: int, port: int):
    """A forked worker as torchrun would start it: environment, one thread, a fresh accelerate state, a gloo
    process group (destroyed at the end)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)  # a forked child must not inherit the parent's one-process state
    PartialState._reset_state()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
