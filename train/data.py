"""MMEB-format data: rows from local jsonl/parquet through ``datasets``, images through pillow, batches
sampled per step from a seeded generator (so a resumed run sees the same batches), and collation into
Qwen2-VL inputs with ``<|image_1|>`` expanded into the backbone's image tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger("pdf.data")
IMAGE_PLACEHOLDER = "<|image_1|>"


def load_rows(path: str) -> list[dict]:
    """All rows of one jsonl or parquet file (one subset)."""
    from datasets import load_dataset

    kind = "parquet" if path.endswith(".parquet") else "json"
    if not Path(path).exists():
        raise FileNotFoundError(f"data file not found: {path}")
    return list(load_dataset(kind, data_files=path, split="train"))


class BadImage(Exception):
    pass


@dataclass
class ImageLoader:
    """Loads ``image_dir/path`` as RGB; a missing or corrupt file raises ``BadImage`` naming it."""

    image_dir: str
    bad: int = 0

    def __call__(self, path: str) -> Image.Image | None:
        if not path:
            return None
        full = Path(self.image_dir) / path
        try:
            with Image.open(full) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise BadImage(f"image {full}: {type(exc).__name__}: {exc}") from exc


class TrainSampler:
    """Global batches of (query, target) examples, drawn per step from ``torch.Generator(seed + step)``: the
    subset by its weight, the row uniformly. A row with a bad image is counted and replaced (``skip``) or
    stops the run with the file named (``error``)."""

    def __init__(self, subsets: list[list[dict]], weights: list[float] | None, loader: ImageLoader, seed: int,
                 policy: str = "skip"):
        if not subsets or any(len(s) == 0 for s in subsets):
            raise ValueError("train data: every subset needs at least one row")
        self.subsets, self.loader, self.seed, self.policy = subsets, loader, seed, policy
        self.weights = torch.tensor(weights or [1.0] * len(subsets), dtype=torch.float64)

    def _example(self, row: dict) -> tuple[tuple[str, Image.Image | None], tuple[str, Image.Image | None]]:
        return ((row["qry"], self.loader(row.get("qry_image_path") or "")),
                (row["pos_text"], self.loader(row.get("pos_image_path") or "")))

    def batch(self, step: int, size: int) -> tuple[list, list]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        queries, targets = [], []
        while len(queries) < size:
            subset = self.subsets[int(torch.multinomial(self.weights, 1, generator=g))]
            row = subset[int(torch.randint(len(subset), (1,), generator=g))]
            try:
                q, t = self._example(row)
            except BadImage as exc:
                if self.policy == "error":
                    raise RuntimeError(f"bad training image (run with --bad-images skip to skip it): {exc}") from exc
                self.loader.bad += 1
                log.warning("skipping a row: %s (%d skipped so far)", exc, self.loader.bad)
                continue
            queries.append(q)
            targets.append(t)
        return queries, targets


class Collator:
    """(text, image or None) pairs -> model inputs, left padded (the last token is the embedding), with each
    ``<|image_1|>`` replaced by the backbone's image tokens (as many as the image yields)."""

    def __init__(self, tokenizer, image_processor, image_token_id: int, max_text_tokens: int = 64):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_id = image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_text_tokens = max_text_tokens

    def images(self, images: list[Image.Image]) -> tuple[dict, list[int]]:
        """(model inputs for the images, number of image tokens of each)."""
        raise NotImplementedError

    def image_block(self, count: int) -> list[int]:
        return [self.image_id] * count

    def extra(self, ids: torch.Tensor) -> dict:
        return {}

    def _ids(self, text: str, image_tokens: int | None) -> list[int]:
        if (IMAGE_PLACEHOLDER in text) != (image_tokens is not None):
            raise ValueError(f"text and image disagree: {text!r} has {'an' if IMAGE_PLACEHOLDER in text else 'no'} "
                             f"{IMAGE_PLACEHOLDER} but {'an' if image_tokens is not None else 'no'} image")
        ids: list[int] = []
        for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i:
                ids += self.image_block(image_tokens)
            ids += self.tokenizer(part.strip(), add_special_tokens=False)["input_ids"][: self.max_text_tokens]
        return ids

    def __call__(self, examples: list[tuple[str, Image.Image | None]]) -> dict:
        images = [img for _, img in examples if img is not None]
        out, counts = self.images(images) if images else ({}, [])
        rows, k = [], 0
        for text, img in examples:
            rows.append(self._ids(text, counts[k] if img is not None else None))
            k += img is not None
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, length - len(row):] = 1
        out.update(input_ids=ids, attention_mask=mask, **self.extra(ids))
        return out


class Qwen2VLCollator(Collator):
    """Qwen2-VL: ``<|vision_start|>`` + grid/merge² image tokens + ``<|vision_end|>``, and mm_token_type_ids."""

    def __init__(self, tokenizer, image_processor, config, max_text_tokens: int = 64):
        super().__init__(tokenizer, image_processor, config.image_token_id, max_text_tokens)
        self.start_id, self.end_id = config.vision_start_token_id, config.vision_end_token_id
        self.merge = config.vision_config.spatial_merge_size

    def images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        counts = [int(g.prod()) // self.merge ** 2 for g in processed["image_grid_thw"]]
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}, counts

    def image_block(self, count):
        return [self.start_id] + [self.image_id] * count + [self.end_id]

    def extra(self, ids):
        return {"mm_token_type_ids": (ids == self.image_id).long()}


class LlavaCollator(Collator):
    """LLaVA and LLaVA-NeXT: the image token repeated once per visual feature. How many features an image
    yields (AnyRes tiles, newline tokens, CLS handling) is asked of the model itself, once per image size."""

    def __init__(self, tokenizer, image_processor, model, max_text_tokens: int = 64):
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        super().__init__(tokenizer, image_processor, hf.config.image_token_id, max_text_tokens)
        self.inner = hf.model
        self.next = hasattr(hf.config, "image_grid_pinpoints")
        self.cache: dict = {}

    def _count(self, pixel_values: torch.Tensor, size) -> int:
        key = tuple(int(x) for x in size) if size is not None else tuple(pixel_values.shape)
        if key not in self.cache:
            param = next(self.inner.parameters())
            kwargs = {"image_sizes": size[None].to(param.device)} if size is not None else {}
            with torch.no_grad():
                out = self.inner.get_image_features(pixel_values=pixel_values[None].to(param.device, param.dtype),
                                                    **kwargs)
            feats = getattr(out, "pooler_output", out)
            self.cache[key] = int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[-2])
        return self.cache[key]

    def images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        pixels = processed["pixel_values"]
        sizes = processed.get("image_sizes") if self.next else None
        counts = [self._count(pixels[i], sizes[i] if sizes is not None else None) for i in range(len(images))]
        out = {"pixel_values": pixels}
        if sizes is not None:
            out["image_sizes"] = sizes
        return out, counts
