"""Faults a hostile but realistic user meets: a full disk, bad input files, killed runs, a Hub outage.

Every fault is real (a tmpfs that fills up or a file-size limit, generated broken files, `kill -9`, a Hub server that
is not there); each test checks that the run either does the right thing or names the problem, and never loses a
finished checkpoint.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoint_worker import TinyRun

from modeling_medclip.checkpointing import CheckpointWriteError, read_checkpoint, sorted_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_WORKER = REPO_ROOT / "tests" / "support" / "checkpoint_worker.py"


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 24 MB tmpfs mounted at `tmp_path / "disk"` (needs the right to mount; skipped with a message otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or result.returncode}); the "
                    "file-size-limit variant of this test covers a full disk")  # fmt: skip
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the file system of `disk` so that only about `leave` bytes stay free."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as file:
        file.write(b"\0" * max(free - leave, 0))


def test_full_disk_names_the_checkpoint_not_written_and_keeps_the_finished_ones(small_tmpfs):
    output_dir = small_tmpfs / "run"
    run = TinyRun()
    first = run.save(output_dir, 1)
    before = folder_digest(first)
    run.step()
    fill(small_tmpfs, leave=256 * 1024)  # less than the model's weights
    with pytest.raises(CheckpointWriteError) as error:
        run.save(output_dir, 2)
    message = str(error.value)
    assert error.value.disk_full and error.value.folder == output_dir / "checkpoint-2"
    assert "checkpoint-2 was not written: the disk is full" in message and "(checkpoint-1)" in message
    assert "No space left on device" in message
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-1"]  # the partial folder is gone
    assert folder_digest(first) == before
    assert sorted_checkpoints(output_dir) == [first]

    resumed = TinyRun(seed=1)  # the finished checkpoint still resumes
    trainer_state, data_state = read_checkpoint(
        resumed.accelerator, first, optimizer=resumed.optimizer, scheduler=resumed.scheduler
    )
    assert trainer_state["global_step"] == 1 and data_state == {"epoch": 0, "step": 1}
    assert all(torch.isfinite(tensor).all() for tensor in load_file(first / "model.safetensors").values())

    (small_tmpfs / "filler").unlink()  # space again: the same step saves
    assert run.save(output_dir, 2) == output_dir / "checkpoint-2"
    assert sorted_checkpoints(output_dir) == [first, output_dir / "checkpoint-2"]


def test_file_size_limit_names_the_checkpoint_not_written_and_keeps_the_finished_ones(tmp_path):
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(CHECKPOINT_WORKER), str(output_dir), "--fsize_limit", str(200 * 1024)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome is not None, "writing past RLIMIT_FSIZE did not fail"
    assert outcome["type"] == "CheckpointWriteError" and outcome["disk_full"]
    assert outcome["folder"] == str(output_dir / "checkpoint-2")
    assert "checkpoint-2 was not written: the disk is full" in outcome["message"]
    assert "File too large" in outcome["message"] and "(checkpoint-1)" in outcome["message"]
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-1"]
    first = output_dir / "checkpoint-1"
    assert sorted_checkpoints(output_dir) == [first]
    state = load_file(first / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in state.values())
    assert json.loads((first / "trainer_state.json").read_text())["global_step"] == 1
