"""Checkpoint folders: atomic writes made durable, rotation that spares what is not yet on the Hub, disk-full errors."""

import errno
import logging
import os
from pathlib import Path

import pytest
from support.checkpoint_worker import TinyRun

from modeling_medclip.checkpointing import (
    check_checkpoint_settings,
    is_disk_full,
    resolve_checkpoint,
    rotate_checkpoints,
    save_pretrained_atomic,
    settings_fingerprint,
    sorted_checkpoints,
    write_checkpoint,
)


def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    run = TinyRun()
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    folder = run.save(tmp_path, 3)
    rename = next(i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(folder))
    tmp = tmp_path / ".checkpoint-3.tmp"
    synced_before = {event[1] for event in events[:rename] if event[0] == "fsync"}
    assert {str(tmp / name) for name in os.listdir(folder)} | {str(tmp)} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename + 1 :]  # the new name itself is made durable

    events.clear()
    save_pretrained_atomic(tmp_path / "best", run.model)
    rename = next(i for i, event in enumerate(events) if event[0] == "replace" and event[2] == str(tmp_path / "best"))
    assert ("fsync", str(tmp_path / ".best.tmp" / "model.safetensors")) in events[:rename]


def test_rotation_spares_the_folders_it_is_told_to_keep(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    rotate_checkpoints(tmp_path, 1, keep={tmp_path / "checkpoint-2", Path(os.path.relpath(tmp_path / "checkpoint-3"))})
    assert [p.name for p in sorted_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    rotate_checkpoints(tmp_path, 1)  # uploaded since: the next rotation removes them
    assert [p.name for p in sorted_checkpoints(tmp_path)] == ["checkpoint-4"]


def test_disk_full_is_recognised_through_wrapped_errors():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EFBIG, "File too large"))
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
    except RuntimeError as error:
        assert is_disk_full(error)  # torch's zip writer hides the OSError in __context__
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("bad value"))


def test_a_checkpoint_of_other_settings_is_refused_unless_allowed(tmp_path, caplog):
    settings = {"learning_rate": 1e-4, "loss_type": "semantic", "seed": 0}
    run = TinyRun()
    folder = write_checkpoint(
        run.accelerator, tmp_path, 1, model=run.model, processor=None, optimizer=run.optimizer,
        scheduler=run.scheduler, data_state={},
        trainer_state={"global_step": 1, "settings": settings, "settings_fingerprint": settings_fingerprint(settings)},
    )  # fmt: skip
    check_checkpoint_settings(folder, dict(reversed(settings.items())))  # same settings, other order: accepted
    other = {**settings, "learning_rate": 5e-4, "batching": "decoupled"}
    changes = r"other settings \(batching: '<unset>' -> 'decoupled'; learning_rate: 0.0001 -> 0.0005\)"
    with pytest.raises(ValueError, match=changes + ".*--ignore_settings_mismatch"):
        check_checkpoint_settings(folder, other)
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.checkpointing"):
        check_checkpoint_settings(folder, other, allow_mismatch=True)
    assert "Resuming anyway" in caplog.text


def test_latest_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.checkpointing"):
        assert resolve_checkpoint("latest", tmp_path) is None
    assert "starts from scratch" in caplog.text and str(tmp_path) in caplog.text
