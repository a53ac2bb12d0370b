"""Checkpoints that cannot run code and are verified without their record (issue 21, item 1)."""

import json
import os
import struct
import zipfile

import torch

from pdfkernels.train import checkpoint
from pdfkernels.train.config import TrainConfig
from pdfkernels.train.step import Parts


def _parts() -> Parts:
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return Parts(model, None, None, optimizer, None, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a crafted checkpoint would do with a real payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_crafted_checkpoint_with_a_matching_record_runs_no_code(tmp_path):
    parts = _parts()
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=0, run_id="r")
    marker = tmp_path / "payload-ran"
    crafted = tmp_path / "step_0000002.pt"
    torch.save({"step": 2, "model": _Payload(str(marker))}, crafted)
    record = {"step": 2, "run": "r", "bytes": crafted.stat().st_size, "sha256": checkpoint.file_sha256(crafted)}
    checkpoint.checksum_file(crafted).write_text(json.dumps(record))  # whoever crafts it can compute this
    path, state = checkpoint.load_latest_intact(tmp_path)
    assert not marker.exists(), "loading the crafted checkpoint ran its payload"
    assert path.name == "step_0000001.pt" and state["step"] == 1
    assert (tmp_path / "step_0000002.pt.damaged").exists()


def _flip_in_member(path, member_suffix: str, count: int) -> None:
    """Flip ``count`` bytes inside the stored data of the zip member whose name ends with ``member_suffix``."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    assert info.file_size > count
    for i in range(count):
        data[start + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_without_a_record_are_found_by_the_zip_crc(tmp_path, caplog):
    parts = _parts()
    checkpoint.save(tmp_path, 1, parts, TrainConfig(), keep=0, run_id="r")
    checkpoint.save(tmp_path, 2, parts, TrainConfig(), keep=0, run_id="r")
    newest = tmp_path / "step_0000002.pt"
    checkpoint.checksum_file(newest).unlink()  # a kill between the two renames, or the .pt copied alone
    _flip_in_member(newest, "data/0", 233)  # the first tensor's bytes (the weight)
    assert torch.load(newest, weights_only=True)["step"] == 2  # torch.load alone reads it without a word
    caplog.set_level("WARNING", logger="pdf")
    path, state = checkpoint.load_latest_intact(tmp_path)
    assert path.name == "step_0000001.pt" and state["step"] == 1
    assert "step_0000002.pt is damaged" in caplog.text and "CRC-32" in caplog.text


def test_an_intact_checkpoint_without_its_record_still_loads(tmp_path):
    parts = _parts()
    checkpoint.save(tmp_path, 3, parts, TrainConfig(), keep=0, run_id="r")
    checkpoint.checksum_file(tmp_path / "step_0000003.pt").unlink()
    path, state = checkpoint.load_latest_intact(tmp_path)
    assert path.name == "step_0000003.pt"
    assert torch.equal(state["model"]["weight"], parts.model.weight.detach())


def test_checkpoints_carry_crc32s_even_when_the_user_turned_them_off(tmp_path):
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)  # a user's speed setting must not make checkpoints "damaged"
    try:
        checkpoint.save(tmp_path, 1, _parts(), TrainConfig(), keep=0, run_id="r")
        assert not torch.serialization.get_crc32_options()  # the user's setting is restored
    finally:
        torch.serialization.set_crc32_options(previous)
    assert checkpoint.damage(tmp_path / "step_0000001.pt") is None
    assert checkpoint.load_latest_intact(tmp_path)[0].name == "step_0000001.pt"
