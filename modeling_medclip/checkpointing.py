"""Atomic, resumable training checkpoints for [`modeling_medclip.training`].

A checkpoint is one folder `<output_dir>/checkpoint-<step>/`:

    config.json, model.safetensors, *.py   the model (`save_pretrained`, loads with `AutoModel.from_pretrained`)
    processor / tokenizer files            `MedCLIPProcessor.save_pretrained`
    optimizer.pt, scheduler.pt             optimizer and LR-scheduler state (`torch.load(..., weights_only=True)`)
    scaler.pt                              the fp16 gradient scaler, when there is one
    rng_state_<rank>.pt                    Python, NumPy and torch RNG states of each process
    data_state_<rank>.json                 the position of each process in its training stream
    trainer_state.json                     global step, best metric so far, number of processes, the settings of
                                           the run and their fingerprint (`settings_fingerprint`)

Every process writes its own files into a temporary folder `.checkpoint-<step>.tmp` next to the final one; once all
are written (barrier), the main process `fsync`s every file and the folder, renames it with `os.replace` and
`fsync`s the parent folder, so `checkpoint-<step>/` either exists complete (also after a power loss) or not at all,
and an error while writing never touches the previous checkpoints. A write that fails raises
[`CheckpointWriteError`] naming the checkpoint that was not written, saying when the disk is full, and listing the
finished checkpoints (intact); the partial temporary folder is removed to give the space back. Rotation
(`save_total_limit`) only runs after a successful rename, and spares the folders it is told to keep (checkpoints not
yet on the Hub).
"""

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a `checkpoint-<step>` folder."""
    match = _CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a `{CHECKPOINT_PREFIX}<step>` folder")
    return int(match.group(1))


def sorted_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-<step>` folders of `output_dir`, oldest step first (temporary folders excluded)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    folders = [p for p in output_dir.iterdir() if p.is_dir() and _CHECKPOINT_PATTERN.match(p.name)]
    folders = [p for p in folders if (p / TRAINER_STATE_NAME).is_file()]
    return sorted(folders, key=checkpoint_step)


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`"latest"` -> the newest checkpoint of `output_dir` (None, with a warning that the run starts from scratch,
    when there is none); a path -> that folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = sorted_checkpoints(output_dir)
        if not checkpoints:
            logger.warning(
                "--resume_from_checkpoint latest: no checkpoint in %s, so this run starts from scratch.", output_dir
            )
            return None
        return checkpoints[-1]
    path = Path(resume_from_checkpoint)
    if not (path / TRAINER_STATE_NAME).is_file():
        raise ValueError(f"--resume_from_checkpoint {path}: not a checkpoint folder (no {TRAINER_STATE_NAME})")
    return path


def settings_fingerprint(settings: dict) -> str:
    """A SHA-256 of `settings` (JSON-able; key order does not matter): what a checkpoint stores to recognise its run."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_checkpoint_settings(checkpoint: str | os.PathLike, settings: dict, allow_mismatch: bool = False) -> None:
    """Refuse to resume from `checkpoint` when it was written with other `settings` than this run's.

    The checkpoint's `trainer_state.json` holds the `settings` and `settings_fingerprint` of the run that wrote it
    (see [`write_checkpoint`]'s `trainer_state`). Raises a `ValueError` listing every setting that differs, unless
    `allow_mismatch` (then it is logged as a warning). Checkpoints without a fingerprint (older ones) are accepted
    with a warning.
    """
    checkpoint = Path(checkpoint)
    saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    if "settings_fingerprint" not in saved:
        logger.warning("%s stores no settings fingerprint: it cannot be checked against this run's.", checkpoint)
        return
    if saved["settings_fingerprint"] == settings_fingerprint(settings):
        return
    old = saved.get("settings", {})
    changes = [
        f"{key}: {old.get(key, '<unset>')!r} -> {settings.get(key, '<unset>')!r}"
        for key in sorted(set(old) | set(settings))
        if json.dumps(old.get(key), default=str) != json.dumps(settings.get(key), default=str)
    ]
    message = (
        f"{checkpoint} was written by a run with other settings ({'; '.join(changes) or 'fingerprint differs'})."
    )
    if not allow_mismatch:
        raise ValueError(
            f"{message} Resuming would mix two runs: use another --output_dir, the same settings, or "
            "--ignore_settings_mismatch to resume from it anyway."
        )
    logger.warning("%s Resuming anyway (--ignore_settings_mismatch).", message)


def rng_state() -> dict:
    """This process's RNG states (Python, NumPy, torch CPU and accelerator) as `torch.save`-able plain objects."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores states returned by [`rng_state`]."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
# How libraries that bypass Python's file objects report the same (safetensors: a Rust `io::Error` in the message)
_DISK_FULL_MESSAGES = ("No space left on device", "File too large", "Disk quota exceeded", "os error 28", "os error 27")


class CheckpointWriteError(OSError):
    """A checkpoint (or `best/` / `final/`) folder could not be written; `folder` is the one that was not written,
    `disk_full` says whether the disk (or a quota / file-size limit) was full. The cause is chained."""

    def __init__(self, message: str, folder: Path, disk_full: bool):
        super().__init__(message)
        self.folder = folder
        self.disk_full = disk_full


def _disk_full_error(error: BaseException | None) -> BaseException | None:
    """The error of `error`'s chain (causes and contexts) that says the disk is full, if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return error
        if any(message in str(error) for message in _DISK_FULL_MESSAGES):
            return error
        error = error.__cause__ or error.__context__
    return None


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error` (or an error it was raised from) says that the disk, a quota or a file-size limit is full."""
    return _disk_full_error(error) is not None


@contextmanager
def _writing(folder: Path, tmp: Path):
    """Turn an error while writing `tmp` (to become `folder`) into a `CheckpointWriteError`; remove `tmp`."""
    try:
        yield
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder is useless, and on a full disk its space is needed
        full = _disk_full_error(error)
        finished = ", ".join(p.name for p in sorted_checkpoints(folder.parent)) or "none"
        reason = "the disk is full (or a quota / file-size limit was reached)" if full else "writing failed"
        raise CheckpointWriteError(
            f"{folder} was not written: {reason}: {full or error}. The finished checkpoints in {folder.parent} are "
            f"intact ({finished}).",
            folder,
            full is not None,
        ) from error


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """`fsync` every file and folder under `folder`, and `folder` itself, so that their contents are on disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root, name))
        _fsync(Path(root), directory=True)


def _replace_folder(tmp: Path, folder: Path) -> None:
    """Moves the complete folder `tmp` to `folder` with renames only, after `fsync`ing its contents; an existing
    `folder` is swapped out first. The parent is `fsync`ed after the rename, so the new name is on disk too."""
    _fsync_tree(tmp)
    if folder.exists():
        stale = folder.parent / f".{folder.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(folder, stale)
        os.replace(tmp, folder)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, folder)
    _fsync(folder.parent, directory=True)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


def _torch_save(obj, path: Path) -> None:
    """`torch.save` through a Python file, so a full disk raises `OSError(ENOSPC)` rather than torch's zip error."""
    with open(path, "wb") as file:
        torch.save(obj, file)


def write_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    model,
    processor,
    optimizer,
    scheduler,
    data_state: dict,
    trainer_state: dict,
) -> Path:
    """Writes `checkpoint-<step>` atomically (see the module docstring). Call it on every process.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        output_dir: the run's folder.
        step: the optimizer step just completed.
        model: the unwrapped model (`accelerator.unwrap_model`).
        processor: a processor (or anything with `save_pretrained`), or `None`.
        optimizer, scheduler: the prepared optimizer and the LR scheduler.
        data_state: this process's training-stream `state_dict()`.
        trainer_state: JSON-able run state (global step, best metric, ...), written by the main process.

    Returns:
        The final folder.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        if tmp.exists():  # left over by a run that died while writing
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        with _writing(final, tmp):
            if accelerator.is_main_process:
                model.save_pretrained(tmp)
                if processor is not None:
                    processor.save_pretrained(tmp)
                _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
                _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
                if accelerator.scaler is not None:
                    _torch_save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            _torch_save(rng_state(), tmp / f"rng_state_{rank}.pt")
            _write_json(tmp / f"data_state_{rank}.json", data_state)
    finally:
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(final, tmp):
            missing = [
                name
                for index in range(accelerator.num_processes)
                for name in (f"rng_state_{index}.pt", f"data_state_{index}.json")
                if not (tmp / name).is_file()
            ]
            if missing:
                raise OSError(f"process files missing (another process failed to write them): {missing}")
            # written last: a folder without trainer_state.json is never taken for a checkpoint
            _write_json(tmp / TRAINER_STATE_NAME, {**trainer_state, "num_processes": accelerator.num_processes})
            _replace_folder(tmp, final)  # the same step saved again (e.g. re-run after a resume) is swapped out
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(accelerator, checkpoint: str | os.PathLike, *, optimizer, scheduler) -> tuple[dict, dict]:
    """Loads optimizer, scheduler, scaler and RNG states of `checkpoint` in place (the model weights are loaded by the
    caller with `from_pretrained`, before `accelerator.prepare`).

    Returns:
        `(trainer_state, data_state)` of this process.
    """
    checkpoint = Path(checkpoint)
    trainer_state = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
    if trainer_state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{checkpoint} was written by {trainer_state['num_processes']} processes; resuming it exactly needs the "
            f"same number, got {accelerator.num_processes}"
        )
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    rank = accelerator.process_index
    set_rng_state(torch.load(checkpoint / f"rng_state_{rank}.pt", weights_only=True))
    data_state = json.loads((checkpoint / f"data_state_{rank}.json").read_text())
    return trainer_state, data_state


def rotate_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, keep: Collection[str | os.PathLike] = ()
) -> None:
    """Deletes the oldest checkpoints beyond the last `save_total_limit` (the best model lives in `best/`), except
    those in `keep` (e.g. `BackgroundUploader.pending_folders()`: not yet on the Hub), which a later call removes."""
    if not save_total_limit or save_total_limit <= 0:
        return
    kept = {Path(folder).resolve() for folder in keep}
    checkpoints = sorted_checkpoints(output_dir)
    for folder in checkpoints[: max(len(checkpoints) - save_total_limit, 0)]:
        if folder.resolve() not in kept:
            shutil.rmtree(folder)


def save_pretrained_atomic(folder: str | os.PathLike, model, processor=None, extra_json: dict | None = None) -> Path:
    """`save_pretrained` of `model` (and `processor`) into `folder` through a temporary sibling, `fsync` and
    `os.replace`; raises [`CheckpointWriteError`] (the old `folder` intact) when it cannot be written."""
    folder = Path(folder)
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with _writing(folder, tmp):
        model.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            _write_json(tmp / name, content)
        _replace_folder(tmp, folder)
    return folder


__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointWriteError",
    "check_checkpoint_settings",
    "checkpoint_step",
    "is_disk_full",
    "read_checkpoint",
    "resolve_checkpoint",
    "rotate_checkpoints",
    "rng_state",
    "save_pretrained_atomic",
    "set_rng_state",
    "settings_fingerprint",
    "sorted_checkpoints",
    "write_checkpoint",
]
