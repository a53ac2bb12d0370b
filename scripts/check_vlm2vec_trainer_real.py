"""Check ``pdfkernels.integrations.vlm2vec`` on VLM2Vec's *real* trainer and time its step:
``.venv-tf452/bin/python scripts/check_vlm2vec_trainer_real.py /path/to/VLM2Vec``.

Loads from the checkout, unchanged: ``src/trainer.py`` (``GradCacheLateProcessTrainer``, ``MMEBTrainer``),
``src/loss.py``, ``src/grad_cache/``, ``src/arguments.py`` (its ``TrainingArguments``), ``src/utils/basic_utils.py``,
the GradCache split/rep functions of ``src/data/collator/train_collator.py`` (only those function definitions:
the file's own imports need qwen_vl_utils and processors), and ``MMEBModel`` with the vendored Qwen2-VL the
way ``check_vlm2vec_real.py`` does. A tiny random Qwen2-VL saved locally, ``MMEBModel.build`` (bf16, DoRA),
text-only batches of 4 in GradCache chunks of 2, one process. Checks: the PDF trainer's step runs on the real
classes and moves every prefix element in bf16 at lr 2e-5; ``_save`` writes ``pdf.safetensors`` beside the
real adapters; the real ``_load_from_checkpoint`` (``MMEBModel.load``) is followed by our re-apply and load
(bit-exact prefix); hard negatives in VLM2Vec's ``b3``/``v2.2`` target layout (each query's positive then its
negatives, a query with fewer padded with an empty text) through the real classes give the loss and gradients
of the objective written out in float64 on the same embeddings (model cast to fp32 for that check, the padded
negative left out and counted). Then the step time, side by side, interleaved: VLM2Vec's own GradCache step
(``trainer.gc``, as its DDP branch calls it), the same with the drop-in (``apply_pdf`` + ``use_paths(model, 0)``),
and the full PDF ``training_step``. Nothing of VLM2Vec is copied into this repository.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers
from transformers import PreTrainedModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import check_vlm2vec_real as real  # noqa: E402

from pdfkernels import models  # noqa: E402
from pdfkernels.integrations import vlm2vec as pdf  # noqa: E402
from pdfkernels.models.anatomy import hf_model  # noqa: E402


def _module(name: str, path: Path, source: str | None = None):
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(source if source is not None else path.read_text(), str(path), "exec"), module.__dict__)
    return module


def _load_trainer(checkout: Path, loaded: dict):
    for name in ("src.grad_cache", "src.data", "src.data.collator"):
        sys.modules.setdefault(name, types.ModuleType(name)).__path__ = []
    _module("src.utils.basic_utils", checkout / "src/utils/basic_utils.py")
    _module("src.arguments", checkout / "src/arguments.py")
    _module("src.loss", checkout / "src/loss.py")
    _module("src.grad_cache.context_managers", checkout / "src/grad_cache/context_managers.py")
    _module("src.grad_cache.grad_cache", checkout / "src/grad_cache/grad_cache.py")
    collator = (checkout / "src/data/collator/train_collator.py").read_text()
    functions = collator[collator.index("def split_and_process_vlm_inputs"):collator.index("@dataclass")]
    _module("src.data.collator.train_collator", checkout / "src/data/collator/train_collator.py",
            "from itertools import repeat\nimport torch\nPHI_IMAGE_TOKEN_MAX_INPUT_ID = int(1e9)\n" + functions)
    model_module = types.ModuleType("src.model.model")
    model_module.MMEBModel = loaded["MMEBModel"]
    sys.modules["src.model.model"] = model_module
    return _module("src.trainer", checkout / "src/trainer.py")


def _batch(rows: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (rows,), generator=generator).tolist()
    length = max(lengths)
    ids, mask = torch.zeros(rows, length, dtype=torch.long), torch.zeros(rows, length, dtype=torch.long)
    for b, n in enumerate(lengths):  # left padded, as VLM2Vec's Qwen2-VL processor
        ids[b, length - n:] = torch.randint(10, 100, (n,), generator=generator)
        mask[b, length - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _grouped(rows: int, per_query: int, missing: int, seed: int) -> dict:
    """VLM2Vec's b3/v2.2 target batch: per query its positive then ``per_query`` negatives; the last query has
    ``missing`` fewer, padded with empty texts (the ids of ``' '``: a real tokenizer gives tokens for '')."""
    batch = _batch(rows * (1 + per_query), seed)
    texts = []
    for k in range(rows):
        real = per_query - (missing if k == rows - 1 else 0)
        texts += ["pos"] + ["neg"] * real + [""] * (per_query - real)
    return {**batch, "text": texts}


def _info_nce64(q, t, n, temperature):
    candidates = torch.cat([t, n])
    sims = (q / q.norm(dim=-1, keepdim=True)) @ (candidates / candidates.norm(dim=-1, keepdim=True)).T / temperature
    return (torch.logsumexp(sims, dim=1) - sims.diagonal()).mean()


def _check_hard_negatives(loaded, folder, base, targs) -> list[tuple[str, str, bool]]:
    """The PDF step with 2 hard negatives per query against the objective written out in float64."""
    model, margs = _model(loaded, folder)
    model.float()  # fp32 for a tight comparison (the prefix is fp32 already)
    trainer = pdf.pdf_trainer(base, num_paths=2, prefix_len=4, lambda_mim=0.0, hard_negatives=2)(
        model=model, args=targs, model_args=margs, max_length=512)
    trainer.create_optimizer()
    q, t = _batch(4, 5), _grouped(4, 2, 1, 6)
    trainer.model.train()
    # VLM2Vec's vendored Qwen2-VL computes multimodal positions (left padding respected) on its first forward
    # only and caches rope_deltas; every later call without cache_position uses 0..L-1. One forward first, so
    # that every call below takes the same position rule (the chunked step's and the direct computation's)
    with torch.no_grad(), models.use_paths(trainer.model, 0):
        trainer.model(qry=q)
    trainer.training_step(trainer.model, (q, t))
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    got.update({f"aggregator.{n}": p.grad.clone() for n, p in trainer.pdf_aggregator.named_parameters()})
    skipped = trainer.pdf_metrics["negatives_skipped"]
    for p in [*trainer.model.parameters(), *trainer.pdf_aggregator.parameters()]:
        p.grad = None

    # direct: one forward per side, no chunks; the padded negative (the last query's second) left out
    rows = list(range(t["input_ids"].shape[0]))
    pos = [k * 3 for k in range(4)]
    neg = [r for r in rows if r not in pos and t["text"][r]]
    with models.use_paths(trainer.model, [0, 1]):
        def reps(batch):
            out = trainer.model(qry=batch)["qry_reps"]
            return out.float().view(2, -1, out.shape[-1]).double()

        qr = reps(q)
        tr = reps({k: v[pos] for k, v in t.items() if k != "text"})
        nr = reps({k: v[neg] for k, v in t.items() if k != "text"})
    agg64 = copy.deepcopy(trainer.pdf_aggregator).double()
    temperature = trainer.model.temperature
    loss = _info_nce64(agg64(qr), agg64(tr), agg64(nr), temperature)
    loss = loss + sum(_info_nce64(qr[i], tr[i], nr[i], temperature) for i in range(2)) / 2
    loss.backward()
    want = {n: p.grad.float() for n, p in trainer.model.named_parameters() if p.grad is not None}
    want.update({f"aggregator.{n}": p.grad.float() for n, p in agg64.named_parameters()})
    worst = max(((got[n] - w).abs().max() / w.abs().max().clamp(min=1e-12)).item() for n, w in want.items())
    same_keys = set(got) == set(want) and any("pdf_prefix" in n for n in want)
    loss_error = abs(trainer.pdf_metrics["loss"] - loss.item()) / abs(loss.item())
    return [("hard negatives (b3 layout, 2 per query, one padded): padded slots counted", f"{skipped:.0f}",
             skipped == 1),
            ("hard negatives: loss vs float64 objective, relative error", f"{loss_error:.1e}", loss_error < 1e-5),
            ("hard negatives: gradients vs float64 objective, worst relative error", f"{worst:.1e} over "
             f"{len(want)} tensors", same_keys and worst < 1e-4)]


def _model(loaded, folder):
    args = SimpleNamespace(model_name=folder, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                           lora_target_modules="q_proj,k_proj,v_proj,o_proj,down_proj", pooling="last",
                           normalize=False, temperature=0.02, model_backbone="qwen2_vl", checkpoint_path=None,
                           model_type=None)
    model = loaded["MMEBModel"].build(args)  # bf16, as VLM2Vec loads it
    _sdpa_vision(model, loaded)
    return model, args


def _sdpa_vision(model, loaded):
    for block in getattr(getattr(hf_model(model), "visual", None), "blocks", []):  # no flash-attn on a CPU
        block.attn.__class__ = loaded["qwen2_vl"].VisionSdpaAttention


def main() -> int:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "src/trainer.py").is_file():
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    checkout = Path(sys.argv[1])
    PreTrainedModel._check_and_enable_flash_attn_2 = classmethod(lambda cls, config, *args, **kwargs: config)
    loaded = real._load_vlm2vec(checkout)
    trainer_module = _load_trainer(checkout, loaded)
    folder = real._save_tiny("qwen2_vl", loaded)
    out = tempfile.mkdtemp()
    targs = sys.modules["src.arguments"].TrainingArguments(
        output_dir=out, per_device_train_batch_size=4, gc_q_chunk_size=2, gc_p_chunk_size=2, report_to=[],
        use_cpu=True, learning_rate=2e-5, max_steps=3, save_strategy="no", disable_tqdm=True, logging_steps=1)
    base = trainer_module.GradCacheLateProcessTrainer
    rows, failed = [], 0
    q, t = _batch(4, 1), _batch(4, 2)

    def make(setup):
        model, margs = _model(loaded, folder)
        if setup == "unpatched":  # flash-attn cannot run on a CPU: VLM2Vec's SDPA class on the same weights
            from pdfkernels.models.anatomy import attention_modules, decoder_stack

            for attn in attention_modules(decoder_stack(hf_model(model))):
                attn.__class__ = loaded["qwen2_vl"].Qwen2VLSdpaAttention
            hf_model(model).config._attn_implementation = "sdpa"
            decoder_stack(hf_model(model)).config._attn_implementation = "sdpa"
        if setup == "drop-in":
            models.apply_pdf(model, num_paths=2, prefix_len=20)
        cls = pdf.pdf_trainer(base, num_paths=2, prefix_len=20) if setup == "pdf" else base
        trainer = cls(model=model, args=targs, model_args=margs, max_length=512)
        trainer.create_optimizer()
        return trainer

    trainers = {setup: make(setup) for setup in ("unpatched", "drop-in", "pdf")}

    def step(setup):
        trainer = trainers[setup]
        trainer.model.train()
        if setup == "pdf":
            trainer.training_step(trainer.model, (q, t))
        elif setup == "drop-in":
            with models.use_paths(trainer.model, 0):
                trainer.gc({"qry": q}, {"tgt": t}, no_sync_except_last=False)
        else:
            trainer.gc({"qry": q}, {"tgt": t}, no_sync_except_last=False)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    # checks on the real classes
    trainer = trainers["pdf"]
    prefix = models.pdf_parameters(trainer.model)[0]
    start = prefix.detach().clone()
    for _ in range(3):
        step("pdf")
    rows.append(("prefix dtype under the bf16 backbone", str(prefix.dtype), prefix.dtype == torch.float32))
    moved = (prefix.detach() != start).float().mean().item()
    rows.append(("prefix elements changed after 3 AdamW steps at lr 2e-5", f"{moved:.1%}", moved == 1.0))
    rows.append(("PDF terms of the last step", str({k: round(v, 3) for k, v in trainer.pdf_metrics.items()}),
                 all(v == v for v in trainer.pdf_metrics.values())))
    checkpoint = Path(out) / "checkpoint-3"
    trainer._save(str(checkpoint))
    files = sorted(p.name for p in checkpoint.iterdir())
    rows.append(("checkpoint files", ", ".join(files), pdf.PDF_FILE in files and "adapter_model.safetensors" in files))
    saved, before = prefix.detach().clone(), trainer.model
    trainer._load_from_checkpoint(str(checkpoint))  # VLM2Vec's: MMEBModel.load, then ours
    _sdpa_vision(trainer.model, loaded)
    rebuilt = models.pdf_parameters(trainer.model)[0]
    rows.append(("resume: model rebuilt by MMEBModel.load, re-patched, prefix bit-exact",
                 f"new model: {trainer.model is not before}",
                 trainer.model is not before and torch.equal(rebuilt, saved)))
    trainer.optimizer = None  # the Trainer builds its optimizer after loading a checkpoint
    trainer.create_optimizer()
    step("pdf")
    loss = trainer.pdf_metrics["loss"]
    rows.append(("a step after the resume", f"loss {loss:.3f}", loss == loss))

    rows += _check_hard_negatives(loaded, folder, base, targs)

    # step times, interleaved
    times = {setup: [] for setup in trainers}
    for setup in trainers:
        step(setup)  # warm-up
    for _ in range(5):
        for setup in trainers:
            begin = time.perf_counter()
            step(setup)
            times[setup].append(time.perf_counter() - begin)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| check | value | ok |\n|---|---|---|")
    for name, value, ok in rows:
        print(f"| {name} | {value} | {'ok' if ok else 'FAIL'} |")
        failed += not ok
    print("\n| step (batch 4 + 4, GradCache chunks 2, tiny bf16 Qwen2-VL, K=20) | median ms | min ms |\n|---|---|---|")
    labels = {"unpatched": "VLM2Vec's GradCache step, unpatched", "drop-in": "the same, drop-in path 0",
              "pdf": "full PDF training_step (N=2)"}
    for setup, values in times.items():
        print(f"| {labels[setup]} | {statistics.median(values) * 1e3:.1f} | {min(values) * 1e3:.1f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
