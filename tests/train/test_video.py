"""Video rows: frame sampling as VLM2Vec's, frame folders and video files (PyAV), bad videos under
--bad-images, Qwen2-VL's video patches equal to 4.52's processor, per-path rows equal to single-path calls,
and a tiny Qwen2-VL run on images and videos together."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pdfkernels.train.run as run
from pdfkernels import models
from pdfkernels.train import synthetic, synthetic_docs, synthetic_video, video
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.data import ImageLoader, qwen_video_patches
from pdfkernels.train.images import BadImage
from pdfkernels.train.model import build, image_processor, make_collator
from pdfkernels.train.rows import BadRow, check_eval_row, check_train_row
from tests.train.helpers import run_args
from tests.train.video_helpers import moving_square, write_frames, write_video

needs_av = pytest.mark.skipif(not __import__("importlib").util.find_spec("av"), reason="PyAV (av) not installed")


def test_sample_indices_match_vlm2vec_linspace():
    assert video.sample_indices(10, 4) == [0, 3, 6, 9]  # np.linspace(0, 9, 4, dtype=int)
    assert video.sample_indices(3, 5) == [0, 0, 1, 1, 2]  # a short video repeats frames
    with pytest.raises(ValueError, match="'num_frames'"):
        video.sample_indices(3, 0)


def test_frame_folder_is_sampled_in_natural_order(tmp_path):
    clip = moving_square(12)
    write_frames(tmp_path / "clip", clip)
    got = video.load(str(tmp_path), "clip", num_frames=4)
    for frame, index in zip(got.frames, [0, 3, 7, 11]):  # frame_10.png after frame_9.png
        assert np.array_equal(np.asarray(frame), np.asarray(clip[index]))


@needs_av
def test_video_file_decodes_the_sampled_frames(tmp_path):
    clip = moving_square(12)
    write_video(tmp_path / "clip.mp4", clip)
    got = video.load(str(tmp_path), "clip.mp4", num_frames=4)
    assert len(got.frames) == 4 and got.frames[0].size == (32, 32)
    for frame, index in zip(got.frames, [0, 3, 7, 11]):  # lossy codec: close to the frame drawn, not another
        errors = [np.abs(np.asarray(frame, float) - np.asarray(c, float)).mean() for c in clip]
        assert int(np.argmin(errors)) == index
    fps_limited = video.load(str(tmp_path), "clip.mp4", num_frames=8, fps=1.0)  # 12 frames at 4 fps = 3 s
    assert len(fps_limited.frames) == 3
    assert len(video.load(str(tmp_path), "clip.mp4", num_frames=1, fps=1.0).frames) == 1  # never above num_frames
    assert len(video.load(str(tmp_path), "clip.mp4", num_frames=8, fps=0.1).frames) == 2  # 0.3 frames: a patch
    video.check(str(tmp_path), "clip.mp4")


@needs_av
def test_bad_videos_are_bad_images(tmp_path, monkeypatch):
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 10)
    (tmp_path / "empty").mkdir()
    write_frames(tmp_path / "long", moving_square(5))
    write_video(tmp_path / "long.mp4", moving_square(5))
    with pytest.raises(BadImage, match="junk.mp4"):
        video.load(str(tmp_path), "junk.mp4")
    with pytest.raises(BadImage, match="junk.mp4"):
        video.check(str(tmp_path), "junk.mp4")
    with pytest.raises(BadImage, match="without frame images"):
        video.load(str(tmp_path), "empty")
    with pytest.raises(BadImage, match="no such file"):
        video.load(str(tmp_path), "missing.mp4")
    with pytest.raises(BadImage, match="outside --image-dir"):
        video.load(str(tmp_path / "empty"), "../long")
    with monkeypatch.context() as scaled:  # an enormous frame size, scaled down: the clips are 32x32
        scaled.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        for refuse in (video.load, video.check):
            with pytest.raises(BadImage, match=r"video .*long.mp4: 32x32 = 1024 pixels, above the 1000"):
                refuse(str(tmp_path), "long.mp4")
    monkeypatch.setattr(video, "MAX_FRAMES", 4)  # an enormous frame count, scaled down
    for path in ("long", "long.mp4"):
        with pytest.raises(BadImage, match="5 frames, above the 4"):
            video.load(str(tmp_path), path)


def test_rows_with_videos_are_checked():
    row = {"qry": "a caption", "pos_text": "<|video_1|> what", "pos_video_path": "v/1"}
    assert check_train_row(row, "f line 1")["pos_video_path"] == "v/1"
    assert "pos_video_path" not in check_train_row({"qry": "a", "pos_text": "b"}, "f line 1")  # old rows unchanged
    with pytest.raises(BadRow, match="'pos_text' has no <\\|video_1\\|>"):
        check_train_row({**row, "pos_text": "what"}, "f line 1")
    with pytest.raises(BadRow, match="one visual per side"):
        check_train_row({**row, "pos_text": "<|video_1|> <|image_1|>", "pos_image_path": "x.png"}, "f line 1")
    ev = {"qry_text": "q", "tgt_text": ["<|video_1|> a", "b"], "tgt_video_path": ["v/1", ""]}
    assert check_eval_row(ev, "e line 1")["tgt_video_path"] == ["v/1", ""]
    with pytest.raises(BadRow, match="'tgt_video_path' has 1"):
        check_eval_row({**ev, "tgt_video_path": ["v/1"]}, "e line 1")


def test_video_patches_equal_the_processors_video_path():
    """transformers 4.52's Qwen2VLImageProcessor takes ``videos=``: ours, built from image calls, must equal it
    (5.x moved videos to a torchvision-only processor; there the patch layout is checked by the model run)."""
    from pdfkernels.models.architectures import tiny_qwen2vl

    processor = image_processor(32, model_type="qwen2_vl", model_config=tiny_qwen2vl())
    clip = moving_square(5)  # odd: padded with the last frame to a multiple of temporal_patch_size 2
    patches, grid = qwen_video_patches(processor, clip, 2)
    assert grid.tolist() == [3, 8, 8] and patches.shape == (3 * 64, 3 * 2 * 4 * 4)
    try:
        reference = processor(images=None, videos=[clip], return_tensors="pt")
    except (TypeError, ValueError) as exc:
        pytest.skip(f"this transformers' image processor takes no videos: {exc}")
    assert reference["video_grid_thw"].tolist() == [grid.tolist()]
    torch.testing.assert_close(patches, reference["pixel_values_videos"], rtol=0, atol=0)


def test_video_batch_per_path_rows_equal_single_path_calls(tmp_path):
    write_frames(tmp_path / "clip", moving_square(6))
    config = TrainConfig(model="tiny", out_dir=str(tmp_path / "out"), num_paths=2, prefix_len=3)
    model, tokenizer, processor = build(config, synthetic.all_words(), "cpu")
    collator = make_collator(model, tokenizer, processor, 64)
    loader = ImageLoader(str(tmp_path), num_frames=4)
    batch = collator([("<|video_1|> what is shown", loader.video("clip")), ("a red circle", None),
                      ("<|image_1|> what", loader.video("clip").frames[0])])
    assert batch["video_grid_thw"].tolist() == [[2, 8, 8]]
    both = models.encode(model, batch, [0, 1])
    for path in (0, 1):
        torch.testing.assert_close(both[path], models.encode(model, batch, [path])[0], rtol=0, atol=0)
    without_video = models.encode(model, {k: v for k, v in collator([("a red circle", None)]).items()}, [0])[0]
    torch.testing.assert_close(both[0, 1:2], without_video, rtol=1e-5, atol=1e-5)  # rows stay independent


def test_tiny_qwen2vl_trains_and_evaluates_on_images_videos_and_documents(tmp_path, capsys):
    data = synthetic.generate(tmp_path / "data", num_train=24, num_eval=4, seed=1)
    synthetic_video.generate(tmp_path / "data", num_train=24, num_eval=4, seed=2)
    synthetic_docs.generate(tmp_path / "data", num_train=24, num_eval=4, seed=3)
    (tmp_path / "data" / "images" / "videos" / "v000000" / "frame_1.png").write_bytes(b"broken")  # a bad video
    args = run_args(data, tmp_path / "out", "--steps", "3", "--num-frames", "4", "--num-workers", "0")
    args[args.index("--train-data") + 2:args.index("--train-data") + 2] = [str(data / "train" / "t2v.jsonl"),
                                                                           str(data / "train" / "t2d.jsonl")]
    args[args.index("--eval-data") + 2:args.index("--eval-data") + 2] = [str(data / "eval" / "t2v.jsonl"),
                                                                         str(data / "eval" / "visdoc.jsonl")]
    result = run.main(args)
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(m["loss"]) for m in lines)
    evaluation = json.loads(Path(tmp_path / "out" / "eval.json").read_text())
    assert {"t2i", "t2v", "visdoc", "i2t", "average"} <= set(evaluation) and result["eval"] == evaluation
    assert evaluation["t2v"]["chance"] == pytest.approx(1 / synthetic_video.EVAL_CANDIDATES)
    assert evaluation["visdoc"]["chance"] == pytest.approx(1 / (4 * synthetic_docs.JUDGED))  # every page ranked
    printed = capsys.readouterr().out
    assert "Hit@1 single" in printed and "NDCG@5 single" in printed and "| visdoc |" in printed


@pytest.mark.parametrize("side", ["train", "eval"])
def test_video_rows_for_a_backbone_that_reads_none_stop_the_run_at_the_start(tmp_path, side):
    """LLaVA-NeXT reads no video: its rows would otherwise be taken for bad images (and skipped) row by row."""
    data = synthetic.generate(tmp_path / "data", num_train=24, num_eval=4, seed=1)
    synthetic_video.generate(tmp_path / "data", num_train=24, num_eval=4, seed=2)
    args = run_args(data, tmp_path / "out", "--steps", "1", "--num-workers", "0", "--model", "tiny-llava-next",
                    "--bad-images", "skip")
    flag = "--train-data" if side == "train" else "--eval-data"
    videos = str(data / side / "t2v.jsonl")
    args[args.index(flag) + 1:args.index(flag) + 1] = [videos]
    with pytest.raises(ValueError, match=rf"{videos} row 1 has '(pos|qry|tgt)_video_path', but this backbone "
                                         r"\(LlavaCollator\) reads no video rows \(video rows: Qwen2-VL only\)"):
        run.main(args)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # stopped before the first step
