"""MMEB training examples: images through pillow, the rows of each step drawn from a seeded generator (so
a resumed run sees the same batches, and every rank knows the whole plan without decoding it), and the
collators that turn (text, image) pairs into backbone inputs with ``<|image_1|>`` expanded into the
backbone's image tokens.

A collator works in two halves so that the expensive one runs in data-loader workers: ``prepare`` (image
processor and tokenizer; picklable output) and ``assemble`` (image-token counts, truncation to
``max_length``, left padding; in the training process, where a LLaVA collator can ask the model)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from PIL import Image

from pdfkernels.models.families import FAMILIES

from . import images, video
from .images import BadImage
from .rows import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER
from .video import Video

log = logging.getLogger("pdf.data")

__all__ = ["IMAGE_PLACEHOLDER", "BadImage", "ImageLoader", "TrainSampler", "Collator", "Qwen2VLCollator",
           "LlavaCollator", "example", "negatives"]


@dataclass
class ImageLoader:
    """Loads ``image_dir/path`` as RGB (train/images.py); a missing, corrupt, outside or unusable file raises
    ``BadImage`` naming it."""

    image_dir: str
    allow_outside: bool = False
    num_frames: int = 8  # frames sampled per video (VLM2Vec's num_frames)
    video_fps: float = 0.0  # > 0: a video file gives at most duration x fps frames

    def __call__(self, path: str) -> Image.Image | None:
        if not path:
            return None
        return images.load(self.image_dir, path, self.allow_outside)

    def video(self, path: str) -> Video:
        """The sampled frames of the video at ``image_dir/path`` (train/video.py); ``BadImage`` naming it."""
        return video.load(self.image_dir, path, self.num_frames, self.video_fps, self.allow_outside)

    def visual(self, image_path: str, video_path: str = "") -> Image.Image | Video | None:
        """A side's image or video, or None for a text-only side."""
        return self.video(video_path) if video_path else self(image_path)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class TrainSampler:
    """Which rows a step trains on. ``plan(step, size)``: per position the subset by its weight, then the row
    uniformly, from ``torch.Generator(seed * 1_000_003 + step)`` (the draws of the original sampler).
    A position whose row has a bad image takes ``replacement(step, position, attempt)``, drawn from a
    generator of its own, so that any rank can replace a row of its share without knowing the others'."""

    def __init__(self, subsets: list[list[dict]], weights: list[float] | None, seed: int):
        if not subsets or any(len(s) == 0 for s in subsets):
            raise ValueError("train data: every subset needs at least one row")
        self.subsets, self.seed = subsets, seed
        self.weights = torch.tensor(weights or [1.0] * len(subsets), dtype=torch.float64)

    def _draw(self, g: torch.Generator) -> dict:
        subset = self.subsets[int(torch.multinomial(self.weights, 1, generator=g))]
        return subset[int(torch.randint(len(subset), (1,), generator=g))]

    def plan(self, step: int, size: int) -> list[dict]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return [self._draw(g) for _ in range(size)]

    def replacement(self, step: int, position: int, attempt: int) -> dict:
        return self._draw(torch.Generator().manual_seed(_seed(self.seed, step, position, attempt)))


def example(row: dict, loader: ImageLoader) -> tuple[tuple[str, Image.Image | None], tuple[str, Image.Image | None]]:
    """(query, target) of a training row, images decoded; ``BadImage`` if either cannot be read."""
    return ((row["qry"], loader.visual(row["qry_image_path"], row.get("qry_video_path", ""))),
            (row["pos_text"], loader.visual(row["pos_image_path"], row.get("pos_video_path", ""))))


def negatives(row: dict, loader: ImageLoader, count: int) -> list[tuple[str, Image.Image | None]]:
    """The first ``count`` hard negatives of a training row (checked at start to have them), images decoded;
    ``BadImage`` if one cannot be read."""
    return [(text, loader(image)) for text, image in zip(row["neg_text"][:count], row["neg_image_path"][:count])]


class Collator:
    """(text, image or None) pairs -> model inputs, left padded (the last token is the embedding), with each
    ``<|image_1|>`` replaced by the backbone's image tokens (as many as the image yields). A row's text
    tokens beyond ``max_length`` are cut from its end (image tokens never are); truncated rows are counted
    in ``truncated`` and announced once."""

    counts_in_prepare = True  # image-token counts known from the processor output alone

    image_side = 0  # > 0: every image resized to image_side x image_side first (VLM2Vec's image_resolution)

    def __init__(self, tokenizer, image_processor, image_token_id: int, max_length: int = 512):
        if max_length < 1:
            raise ValueError(f"config: 'max_length' expected >= 1, got {max_length}")
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_id = image_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_length = max_length
        self.truncated = 0

    def images(self, images: list[Image.Image]) -> tuple[dict, list[int] | None]:
        """(model inputs for the images, number of image tokens of each, or None to ask ``image_counts``)."""
        raise NotImplementedError

    def image_counts(self, images: dict) -> list[int]:
        raise NotImplementedError

    def image_block(self, count: int) -> list[int]:
        return [self.image_id] * count

    reads_video = False  # whether ``videos`` builds inputs (models/families.py says which families do)

    def videos(self, videos: list[Video]) -> tuple[dict, list[int]]:
        """(model inputs for the videos, number of video tokens of each)."""
        raise ValueError(f"{type(self).__name__}: this backbone takes no video rows ({VIDEO_PLACEHOLDER}); "
                         f"videos are supported for Qwen2-VL")

    def video_block(self, count: int) -> list[int]:
        raise NotImplementedError

    def extra(self, ids: torch.Tensor) -> dict:
        return {}

    def prepare(self, examples: list[tuple[str, Image.Image | None]]) -> dict:
        """The expensive, model-free half (image processor, tokenizer): runs in data-loader workers."""
        for text, img in examples:
            is_video = isinstance(img, Video)
            if (IMAGE_PLACEHOLDER in text) != (img is not None and not is_video):
                raise ValueError(f"text and image disagree: {text!r} has {'an' if IMAGE_PLACEHOLDER in text else 'no'} "
                                 f"{IMAGE_PLACEHOLDER} but {'an' if img is not None else 'no'} image")
            if (VIDEO_PLACEHOLDER in text) != is_video:
                raise ValueError(f"text and video disagree: {text!r} has {'a' if VIDEO_PLACEHOLDER in text else 'no'} "
                                 f"{VIDEO_PLACEHOLDER} but {'a' if is_video else 'no'} video")
        images = [img for _, img in examples if img is not None and not isinstance(img, Video)]
        clips = [img for _, img in examples if isinstance(img, Video)]
        if self.image_side:
            images = [img.resize((self.image_side, self.image_side), Image.Resampling.BICUBIC) for img in images]
            side = (self.image_side, self.image_side)
            clips = [Video([f.resize(side, Image.Resampling.BICUBIC) for f in c.frames], c.path) for c in clips]
        processed, counts = self.images(images) if images else ({}, [])
        video_counts: list[int] = []
        if clips:
            video_inputs, video_counts = self.videos(clips)
            processed = {**processed, **video_inputs}
        # split_special_tokens: a typed "<|image_pad|>" is text, never the backbone's image token
        parts = [[self.tokenizer(p.strip(), add_special_tokens=False, split_special_tokens=True)["input_ids"]
                  for p in text.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER).split(IMAGE_PLACEHOLDER)]
                 for text, _ in examples]
        prepared = {"parts": parts, "images": processed, "counts": counts}
        if clips:  # which rows hold a video (their block is the video's), and its token count
            prepared["is_video"] = [isinstance(img, Video) for _, img in examples]
            prepared["video_counts"] = video_counts
        return prepared

    def _ids(self, parts: list[list[int]], image_tokens: int | None, is_video: bool = False) -> list[int]:
        budget, ids = self.max_length, []
        cut = sum(len(p) for p in parts) > budget
        for i, part in enumerate(parts):
            if i:
                ids += self.video_block(image_tokens) if is_video else self.image_block(image_tokens)
            ids += part[:budget]
            budget -= min(budget, len(part))
        if cut:
            if not self.truncated:
                log.warning("a text longer than max_length=%d tokens is cut (image tokens never are); truncated rows "
                            "are counted in metrics.jsonl as 'truncated_rows'", self.max_length)
            self.truncated += 1
        return ids

    def assemble(self, prepared: dict) -> dict:
        """The cheap half, in the training process: image-token counts, truncation, left padding."""
        images = dict(prepared["images"])
        is_video = prepared.get("is_video") or [False] * len(prepared["parts"])
        video_counts = list(prepared.get("video_counts", []))
        has_images = any(len(p) > 1 and not v for p, v in zip(prepared["parts"], is_video))
        counts = prepared["counts"] if prepared["counts"] is not None or not has_images else self.image_counts(images)
        rows, k = [], 0
        for b, parts in enumerate(prepared["parts"]):
            if is_video[b]:
                rows.append(self._ids(parts, video_counts.pop(0), is_video=True))
                continue
            has_image = len(parts) > 1
            rows.append(self._ids(parts, counts[k] if has_image else None))
            k += has_image
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, length - len(row):] = 1
        images.update(input_ids=ids, attention_mask=mask, **self.extra(ids))
        return images

    def __call__(self, examples: list[tuple[str, Image.Image | None]]) -> dict:
        return self.assemble(self.prepare(examples))


VIDEO_FIELDS = ("qry_video_path", "pos_video_path", "tgt_video_path")


def refuse_unread_videos(collator: Collator, rows: list[dict], path: str) -> None:
    """Stop at the start when ``path`` holds video rows the backbone cannot read: row by row they would be
    taken for bad images (and skipped under ``--bad-images skip``) instead."""
    if collator.reads_video:
        return
    def has(value) -> bool:  # a path, or a list of paths ('' for none)
        return any(value) if isinstance(value, list) else bool(value)

    found = next(((i, key) for i, row in enumerate(rows) for key in VIDEO_FIELDS if has(row.get(key))), None)
    if found is not None:
        supported = [f.title for f in FAMILIES.values() if f.video]
        raise ValueError(f"config: {path} row {found[0] + 1} has '{found[1]}', but this backbone "
                         f"({type(collator).__name__}) reads no video rows (video rows: {', '.join(supported)} only)")


def takes_token_types(forward) -> bool:
    """Whether a model's ``forward`` takes ``mm_token_type_ids`` (Qwen-VL on transformers 5.x; 4.52 has none)."""
    import inspect

    return "mm_token_type_ids" in inspect.signature(forward).parameters


def _installed_takes_token_types(model_config) -> bool:
    import transformers

    entry = FAMILIES.get(getattr(model_config, "model_type", ""))
    cls = getattr(transformers, entry.inner_class, None) if entry is not None and entry.inner_class else None
    return cls is not None and takes_token_types(cls.forward)


class Qwen2VLCollator(Collator):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: ``<|vision_start|>`` + grid/merge² image tokens + ``<|vision_end|>``,
    and ``mm_token_type_ids`` where the model takes them (``token_types``; by default: where the installed
    transformers' class of ``model_config.model_type`` does, i.e. on 5.x)."""

    def __init__(self, tokenizer, image_processor, model_config, max_length: int = 512,
                 token_types: bool | None = None):
        super().__init__(tokenizer, image_processor, model_config.image_token_id, max_length)
        self.start_id, self.end_id = model_config.vision_start_token_id, model_config.vision_end_token_id
        self.merge = model_config.vision_config.spatial_merge_size
        self.video_id = getattr(model_config, "video_token_id", None)
        self.model_type = getattr(model_config, "model_type", "")
        self.temporal_patch = getattr(model_config.vision_config, "temporal_patch_size", 2)
        self.token_types = _installed_takes_token_types(model_config) if token_types is None else token_types

    def images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        counts = [int(g.prod()) // self.merge ** 2 for g in processed["image_grid_thw"]]
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": processed["image_grid_thw"]}, counts

    def image_block(self, count):
        return [self.start_id] + [self.image_id] * count + [self.end_id]

    @property
    def reads_video(self) -> bool:
        entry = FAMILIES.get(self.model_type)
        return entry is not None and entry.video

    def videos(self, videos):
        if not self.reads_video:  # models/families.py says which families read video rows
            supported = [f.title for f in FAMILIES.values() if f.video]
            raise ValueError(f"video rows are supported for {', '.join(supported)} only, not {self.model_type!r}")
        processed = [qwen_video_patches(self.image_processor, v.frames, self.temporal_patch) for v in videos]
        grids = torch.stack([grid for _, grid in processed])
        counts = [int(g.prod()) // self.merge ** 2 for g in grids]
        return {"pixel_values_videos": torch.cat([p for p, _ in processed]), "video_grid_thw": grids}, counts

    def video_block(self, count):
        return [self.start_id] + [self.video_id] * count + [self.end_id]

    def extra(self, ids):
        if not self.token_types:
            return {}
        return {"mm_token_type_ids": (ids == self.image_id).long() + 2 * (ids == self.video_id).long()}


def qwen_video_patches(image_processor, frames: list[Image.Image], temporal_patch: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(``pixel_values_videos`` ``[grid_t·h·w, C·T·P·P]``, ``video_grid_thw`` ``[3]``) of one video, as Qwen2-VL's
    processors build them (4.52's image processor given ``videos=``), from the image processor alone: each
    frame is resized and normalised as an image (whose T temporal slots repeat the frame), and temporal patch
    g takes slot t from frame g·T + t; the frames are padded to a multiple of T with the last one, as the
    processors do. The token order within a temporal group is the image's (rows, columns in merge blocks), so
    no torchvision video processor is needed (transformers 5.x's requires torchvision)."""
    frames = list(frames) + [frames[-1]] * (-len(frames) % temporal_patch)
    out = image_processor(images=frames, return_tensors="pt")
    grid = out["image_grid_thw"]
    if not bool((grid == grid[:1]).all()):
        raise ValueError(f"video frames resized to different grids {grid.tolist()}; frames must share one size")
    per_frame = out["pixel_values"].reshape(len(frames), int(grid[0].prod()), 3, temporal_patch, -1)  # RGB
    groups = len(frames) // temporal_patch
    slots = per_frame.reshape(groups, temporal_patch, *per_frame.shape[1:])  # [G, t (frame), N, C, T, P·P]
    picked = torch.stack([slots[:, t, :, :, t] for t in range(temporal_patch)], dim=3)  # [G, N, C, T, P·P]
    return picked.reshape(groups * per_frame.shape[1], -1), torch.tensor([groups, *grid[0, 1:].tolist()])


class LlavaCollator(Collator):
    """LLaVA and LLaVA-NeXT: the image token repeated once per visual feature. How many features an image
    yields (AnyRes tiles, newline tokens, CLS handling) is asked of the model itself, once per image size,
    in ``assemble`` (the training process holds the model; workers do not)."""

    def __init__(self, tokenizer, image_processor, model, max_length: int = 512):
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        super().__init__(tokenizer, image_processor, hf.config.image_token_id, max_length)
        self.next = hasattr(hf.config, "image_grid_pinpoints")
        self.cache: dict = {}
        self._inner = [hf.model]  # a list: kept out of the pickled state sent to workers

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_inner"] = []
        return state

    def _count(self, pixel_values: torch.Tensor, size) -> int:
        key = tuple(int(x) for x in size) if size is not None else tuple(pixel_values.shape)
        if key not in self.cache:
            inner = self._inner[0]
            param = next(inner.parameters())
            kwargs = {"image_sizes": size[None].to(param.device)} if size is not None else {}
            bf16 = any(p.dtype == torch.bfloat16 for p in inner.parameters())
            with torch.no_grad(), torch.autocast(param.device.type, dtype=torch.bfloat16, enabled=bf16):
                out = inner.get_image_features(pixel_values=pixel_values[None].to(param.device, param.dtype),
                                               **kwargs)
                feats = getattr(out, "pooler_output", out)
                if isinstance(feats, (list, tuple)) and feats[0].dim() == 3 and hasattr(inner, "pack_image_features"):
                    # transformers 4.52 returns each image's AnyRes tiles unpacked; its forward packs them
                    # (unpadding, newline tokens) before matching the image tokens: count what it matches
                    feats = inner.pack_image_features(feats, kwargs["image_sizes"],
                                                      inner.config.vision_feature_select_strategy,
                                                      image_newline=inner.image_newline)[0]
            self.cache[key] = int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[-2])
        return self.cache[key]

    def images(self, images):
        processed = self.image_processor(images=images, return_tensors="pt")
        out = {"pixel_values": processed["pixel_values"]}
        if self.next:
            out["image_sizes"] = processed["image_sizes"]
        return out, None

    def image_counts(self, images):
        pixels, sizes = images["pixel_values"], images.get("image_sizes")
        return [self._count(pixels[i], sizes[i] if sizes is not None else None) for i in range(pixels.shape[0])]
