"""Faults a hostile but realistic user meets: a full disk, bad input files, killed runs, a Hub outage.

Every fault is real (a tmpfs that fills up or a file-size limit, generated broken files, `kill -9`, a Hub server that
is not there); each test checks that the run either does the right thing or names the problem, and never loses a
finished checkpoint.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.bad_inputs import BAD_TEXTS, BadImage, gradient, write_bad_images
from support.checkpoint_worker import TinyRun

from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.checkpointing import CheckpointWriteError, read_checkpoint, sorted_checkpoints
from modeling_medclip.collator import LazyImages, MedCLIPCollator, decode_image
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor, load_grayscale_image
from modeling_medclip.processing_medclip import MedCLIPProcessor

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


# ---------------------------------------------------------------------------------------------------------------------
# Bad input files through the processor, the collator and the lazy evaluation path
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> list[BadImage]:
    pytest.importorskip("pydicom")
    return write_bad_images(tmp_path_factory.mktemp("bad_inputs"))


def check_decoded(image: BadImage, decoded: np.ndarray) -> None:
    """The decoded image has the expected size and, for the small ones, the content they were written from."""
    assert (decoded.shape[1], decoded.shape[0]) == image.size, image.kind
    if image.size == (gradient().shape[1], gradient().shape[0]):
        difference = np.abs(decoded.astype(int) - gradient().astype(int)).mean()
        assert difference < 2.0, (image.kind, difference)  # 0 for lossless files; JPEG's loss otherwise


def test_every_bad_image_is_decoded_or_named_in_a_clear_error_by_the_processor(bad_images):
    processor = MedCLIPImageProcessor()
    outcomes = {}
    for image in bad_images:
        if image.decodes:
            check_decoded(image, load_grayscale_image(image.path))
            pixel_values = processor(image.path, return_tensors="pt")["pixel_values"]
            assert pixel_values.shape == (1, 1, 224, 224) and torch.isfinite(pixel_values).all(), image.kind
            outcomes[image.kind] = "decoded"
        else:
            with pytest.raises(ValueError, match=image.error) as error:
                processor(image.path)
            assert image.path.name in str(error.value), (image.kind, str(error.value))
            outcomes[image.kind] = str(error.value)
    assert len(outcomes) == len(bad_images) >= 25


def test_the_pixel_limit_is_adjustable(bad_images):
    huge = next(image for image in bad_images if image.kind.startswith("16-bit 10,000"))
    big_jpeg = next(image for image in bad_images if image.kind.startswith("64-megapixel JPEG"))
    assert load_grayscale_image(big_jpeg.path, max_image_pixels=None).shape == (8000, 8000)  # full resolution
    assert load_grayscale_image(big_jpeg.path, max_image_pixels=1_000_000).shape == (1000, 1000)  # 1/8 scale
    with pytest.raises(ValueError, match="over the limit of 100,000"):
        load_grayscale_image(big_jpeg.path, max_image_pixels=100_000)  # even 1/8 is too much
    with pytest.raises(ValueError, match="over the limit of 1,000"):
        MedCLIPImageProcessor(max_image_pixels=1_000)(bad_images[0].path.with_name("palette.png"))
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        MedCLIPImageProcessor(max_image_pixels=0)
    saved = MedCLIPImageProcessor(max_image_pixels=123_456).to_dict()
    assert MedCLIPImageProcessor(**{k: v for k, v in saved.items() if k != "image_processor_type"}).max_image_pixels == 123_456
    with pytest.raises(ValueError, match="huge_16bit.png.*over the limit"):
        decode_image(huge.path.read_bytes(), name=str(huge.path))  # embedded bytes (parquet): the same check


@pytest.mark.parametrize("decode_size", [None, 64])
def test_the_collator_decodes_or_skips_and_counts_every_bad_image(bad_images, tokenizer_dir, decode_size, caplog):
    from transformers import AutoTokenizer

    collator = MedCLIPCollator(
        AutoTokenizer.from_pretrained(tokenizer_dir),
        build_augmentation("medclip", MedCLIPImageProcessor(), size=32),
        decode_size=decode_size,
    )
    examples = [
        {"image": str(image.path), "text": f"report {i}", "image_id": image.path.name} for i, image in enumerate(bad_images)
    ]
    bad = [image for image in bad_images if not image.decodes]
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.collator"):
        batch = collator(examples)
    assert batch["num_skipped_images"] == len(bad) and batch["num_skipped_texts"] == 0
    assert batch["image_ids"] == [image.path.name for image in bad_images if image.decodes]
    assert batch["pixel_values"].shape == (len(bad_images) - len(bad), 1, 32, 32)
    assert batch["input_ids"].shape[0] == len(bad_images) - len(bad)  # pairs stay aligned
    assert torch.isfinite(batch["pixel_values"]).all()
    for image in bad:
        assert any(image.path.name in record.getMessage() for record in caplog.records), image.kind
    for image in bad_images:  # the same outcome from embedded bytes (parquet rows), DICOM sniffed from the magic
        if image.path.is_file() and image.path.stat().st_size < 1_000_000:
            outcome = collator([{"image": image.path.read_bytes(), "text": "x", "image_id": image.path.name}])
            assert outcome["num_skipped_images"] == (not image.decodes), image.kind
    if decode_size is not None:
        extensionless = next(image for image in bad_images if image.kind == "extensionless DICOM")
        assert decode_image(str(extensionless.path), "x", decode_size=decode_size).size == extensionless.size


def test_the_collator_skips_and_counts_bad_texts(tokenizer_dir):
    from transformers import AutoTokenizer

    collator = MedCLIPCollator(AutoTokenizer.from_pretrained(tokenizer_dir), lambda image: torch.zeros(1, 8, 8))
    texts = [text for text, _ in BAD_TEXTS] + ["no acute findings"]
    batch = collator({"images": [], "texts": [{"text": t, "image_id": str(i)} for i, t in enumerate(texts)], "paired": False})
    assert batch["num_skipped_texts"] == len(BAD_TEXTS) and batch["text_ids"] == [str(len(BAD_TEXTS))]


@pytest.mark.parametrize(("text", "message"), BAD_TEXTS)
def test_the_processor_names_the_bad_text_and_its_type(tokenizer_dir, text, message):
    from transformers import AutoTokenizer

    processor = MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))
    with pytest.raises(ValueError, match=message):
        processor(text=[text])
    with pytest.raises(ValueError, match=message.replace("#0", "#1")):
        processor(text=["no effusion", text])


def test_lazy_images_decode_one_file_at_a_time_and_name_the_bad_one(bad_images, tmp_path):
    good = [image.path for image in bad_images if image.decodes and image.size == (48, 40)]
    many = good * 30  # more files than a low open-file limit would allow at once
    lazy = LazyImages(many)
    assert len(lazy) == len(many)
    open_before = len(os.listdir("/proc/self/fd"))
    batch = lazy[5:37]
    assert len(batch) == 32 and all(image.mode == "L" and image.size == (48, 40) for image in batch)
    assert len(os.listdir("/proc/self/fd")) == open_before  # decoded images hold no file open
    assert np.array_equal(np.asarray(lazy[-1]), load_grayscale_image(many[-1]))
    truncated = next(image.path for image in bad_images if image.kind == "truncated JPEG")
    with pytest.raises(ValueError, match="truncated.jpg"):
        LazyImages([*good, truncated])[len(good)]


# ---------------------------------------------------------------------------------------------------------------------
# Killed runs
# ---------------------------------------------------------------------------------------------------------------------

TINY_RUN = ["--preset", "tiny", "--disable_tqdm", "--max_steps", "6", "--save_steps", "1", "--eval_steps", "0",
            "--lr_scheduler_type", "constant", "--zero_shot_eval", "false"]  # fmt: skip


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path, shared_data):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "support" / "kill_worker.py"), str(tmp_path), "--kills", "20",
         "--seed", "13", "--", *TINY_RUN],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MEDCLIP_SHARED_DATA": str(shared_data)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    header, *trials = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert header["steps"] == 6
    killed = [trial for trial in trials if trial["killed"]]
    assert len(killed) == 20
    for trial in trials:
        assert trial["code"] == 0, trial.get("log")
        assert trial["weights_equal"] and trial["losses_equal"], trial
    # the seeded schedule hit every phase: before the first checkpoint (resumed from scratch), while one was being
    # written (a partial .checkpoint-N.tmp left), and after some were finished (resumed from the latest)
    before_any = [t for t in killed if not any(name.startswith("checkpoint-") for name in t["left"])]
    while_writing = [t for t in killed if any(name.endswith(".tmp") for name in t["left"])]
    assert before_any and while_writing and len(killed) - len(before_any) >= 5
