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
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.bad_inputs import BAD_TEXTS, BadImage, gradient, write_bad_images
from support.checkpoint_worker import TinyRun

from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.checkpointing import CheckpointWriteError, read_checkpoint, rotate_checkpoints, sorted_checkpoints
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
    """A 64 MB tmpfs mounted at `tmp_path / "disk"` (needs the right to mount; skipped with a message otherwise)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or result.returncode}); the "
                    "file-size-limit variant of this test covers a full disk")  # fmt: skip
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


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
            "--lr_scheduler_type", "constant", "--max_eval_samples", "8", "--max_eval_images", "8"]  # fmt: skip


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


# ---------------------------------------------------------------------------------------------------------------------
# Training runs: the token, other settings, a Hub outage, a full disk, a torn metrics line, bad files
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_accelerate():
    """Each run builds its own Accelerator; Accelerate keeps process-wide singletons otherwise."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield lambda: (AcceleratorState._reset_state(reset_partial_state=True), GradientState._reset_state())
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_run(output_dir, *flags):
    from modeling_medclip.training import parse_args

    return parse_args([*TINY_RUN, "--output_dir", str(output_dir), *flags])


def all_text(folder: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


@pytest.mark.slow
def test_the_hub_token_is_never_written_or_given_to_trackers(hub_server, tmp_path, shared_data, fresh_accelerate):
    from huggingface_hub import snapshot_download

    from modeling_medclip.training import train
    from modeling_medclip.training.arguments import public_arguments
    from modeling_medclip.training.loop import _flat_config

    secret = "hf_DoNotLeakThisToken0123456789"
    args = tiny_run(tmp_path / "run", "--max_steps", "2", "--push_to_hub", "--hub_model_id", "user/token-run",
                    "--hub_token", secret)  # fmt: skip
    assert secret not in repr(args) and secret not in json.dumps(public_arguments(args))
    assert secret not in json.dumps(_flat_config(args))  # what the trackers get
    result = train(args)
    assert result.hub_errors == []
    assert secret not in all_text(tmp_path / "run")
    assert "hub_token" not in json.loads((tmp_path / "run" / "final" / "training_args.json").read_text())["training"]
    assert secret not in all_text(Path(snapshot_download("user/token-run")))


@pytest.mark.slow
def test_resuming_a_run_of_other_settings_is_refused_unless_told(tmp_path, shared_data, fresh_accelerate, caplog):
    from modeling_medclip.training import train

    train(tiny_run(tmp_path / "run", "--max_steps", "2"))
    fresh_accelerate()
    with pytest.raises(ValueError, match=r"other settings \(learning_rate: 0.001 -> 0.002\).*--ignore_settings_mismatch"):
        train(tiny_run(tmp_path / "run", "--max_steps", "3", "--learning_rate", "2e-3", "--resume_from_checkpoint", "latest"))
    fresh_accelerate()
    with caplog.at_level(logging.WARNING):
        result = train(tiny_run(tmp_path / "run", "--max_steps", "3", "--learning_rate", "2e-3",
                                "--resume_from_checkpoint", "latest", "--ignore_settings_mismatch"))  # fmt: skip
    assert result.global_step == 3 and "Resuming anyway" in caplog.text
    fresh_accelerate()
    assert train(tiny_run(tmp_path / "run", "--max_steps", "4", "--learning_rate", "2e-3",
                          "--resume_from_checkpoint", "latest")).global_step == 4  # more steps: the same run


def test_every_bad_argument_is_named_before_anything_runs(tmp_path):
    from modeling_medclip.training import train

    flags = ["--batching", "decoupled", "--loss_type", "infonce", "--head_learning_rate", "-1", "--weight_decay", "-0.1",
             "--warmup_steps", "-5", "--label_similarity_scale", "-2", "--save_steps", "-1", "--max_steps", "0",
             "--num_train_epochs", "0", "--logging_steps", "0", "--metric_for_best_model", "eval_covid-cxr/zero_shot_auc_typo",
             "--image_size", "0"]  # fmt: skip
    args = tiny_run(tmp_path / "run", *flags)
    args.training.metric_for_best_model = "val_loss"
    with pytest.raises(ValueError) as error:
        train(args)
    message = str(error.value)
    for flag in ("--batching decoupled", "--head_learning_rate", "--weight_decay", "--warmup_steps",
                 "--label_similarity_scale", "--save_steps", "--num_train_epochs", "--logging_steps",
                 "--metric_for_best_model val_loss", "--image_size"):  # fmt: skip
        assert flag in message, (flag, message)
    assert message.startswith("10 bad argument(s)")
    assert not (tmp_path / "run").exists()  # nothing was created (or deleted) before the check


@pytest.mark.slow
def test_max_length_beyond_the_text_tower_is_named(tmp_path, shared_data, fresh_accelerate):
    from modeling_medclip.training import train

    with pytest.raises(ValueError, match=r"--max_length 100000 is beyond the text tower's \d+ positions"):
        train(tiny_run(tmp_path / "run", "--max_length", "100000"))


@pytest.mark.slow
def test_hub_outage_for_the_whole_run_then_the_next_run_uploads_everything(tmp_path, shared_data, monkeypatch,
                                                                           fresh_accelerate):  # fmt: skip
    from huggingface_hub import HfApi
    from hub_server import point_clients_at, start_hub_server

    from modeling_medclip.hub import UPLOAD_RECORD_NAME
    from modeling_medclip.training import train

    run_dir = tmp_path / "run"
    flags = ["--max_steps", "4", "--save_steps", "1", "--save_total_limit", "1", "--push_to_hub",
             "--hub_model_id", "user/outage", "--hub_revision", "ckpts", "--hub_upload_timeout", "10"]  # fmt: skip
    with start_hub_server(tmp_path / "hub") as down:
        point_clients_at(down, monkeypatch)
    start = time.monotonic()
    result = train(tiny_run(run_dir, *flags))  # the Hub refuses every connection during the whole run
    elapsed = time.monotonic() - start
    assert elapsed < 120, f"the run took {elapsed:.0f}s to end with the Hub down"  # not minutes of nested retries
    assert result.global_step == 4 and len(result.hub_errors) == 5  # 4 checkpoints and final/, all reported
    pending = [entry["folder"] for entry in json.loads((run_dir / UPLOAD_RECORD_NAME).read_text())["pending"]]
    assert pending == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4", "final"]
    assert [p.name for p in sorted_checkpoints(run_dir)] == pending[:4]  # rotation spared what is not uploaded

    fresh_accelerate()
    with start_hub_server(tmp_path / "hub") as hub:  # the Hub is back: the next run into the folder uploads it all
        point_clients_at(hub, monkeypatch)
        result = train(tiny_run(run_dir, *flags, "--resume_from_checkpoint", "latest"))
        assert result.hub_errors == []
        files = set(HfApi().list_repo_files("user/outage", revision="ckpts"))
    assert {f"checkpoint-{step}/model.safetensors" for step in (1, 2, 3, 4)} | {"model.safetensors"} <= files
    assert not (run_dir / UPLOAD_RECORD_NAME).exists()
    rotate_checkpoints(run_dir, 1)
    assert [p.name for p in sorted_checkpoints(run_dir)] == ["checkpoint-4"]


@pytest.mark.slow
def test_full_disk_during_a_run_keeps_the_finished_checkpoints_and_resumes_exactly(small_tmpfs, tmp_path, shared_data,
                                                                                   fresh_accelerate):  # fmt: skip
    from modeling_medclip.training import train

    straight = train(tiny_run(tmp_path / "straight", "--max_steps", "4", "--save_steps", "2"))
    fresh_accelerate()
    run_dir = small_tmpfs / "run"
    fill(small_tmpfs, leave=16 * 1024 * 1024)  # room for one checkpoint (about 12 MB), not two
    # step 4 validates (best/ is saved) and then saves checkpoint-4: one of them meets the full disk
    full = r"run/(best|checkpoint-4) was not written: the disk is full.*No space left on device.*\(checkpoint-2\)"
    with pytest.raises(CheckpointWriteError, match=full):
        train(tiny_run(run_dir, "--max_steps", "4", "--save_steps", "2"))
    assert [p.name for p in sorted_checkpoints(run_dir)] == ["checkpoint-2"]
    (small_tmpfs / "filler").unlink()
    fresh_accelerate()
    resumed = train(tiny_run(run_dir, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 4
    assert load_file(run_dir / "final" / "model.safetensors").keys() == load_file(straight.final_model_dir / "model.safetensors").keys()
    assert folder_digest(run_dir / "final")["model.safetensors"] == folder_digest(straight.final_model_dir)["model.safetensors"]


@pytest.mark.slow
def test_a_torn_last_metrics_line_is_ignored_on_resume(tmp_path, shared_data, fresh_accelerate, caplog):
    from modeling_medclip.training import train

    train(tiny_run(tmp_path / "run", "--max_steps", "2", "--save_steps", "2"))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as file:
        file.write('{"step": 3, "loss": 2.1')  # what a kill in the middle of a write leaves
    fresh_accelerate()
    with caplog.at_level(logging.WARNING):
        result = train(tiny_run(tmp_path / "run", "--max_steps", "3", "--resume_from_checkpoint", "latest"))
    assert result.global_step == 3 and "torn last line" in caplog.text
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries if "loss" in entry] == [1, 2, 3]


@pytest.mark.slow
def test_bad_files_through_a_training_run_and_run_eval_lose_no_checkpoint(tmp_path, shared_data, bad_images,
                                                                          fresh_accelerate, caplog):  # fmt: skip
    import pandas as pd

    from modeling_medclip.training import train

    covid = shared_data / "covid-cxr"
    corpus = tmp_path / "covid-with-bad-files"
    (corpus / "images").mkdir(parents=True)
    rows = pd.read_csv(covid / "metadata.csv", keep_default_na=False).iloc[:64]
    unreadable = [image for image in bad_images if not image.decodes and image.path.is_file()]
    replaced = {}
    for index, name in enumerate(rows["file_name"]):  # every other row of the first ones: a bad file in its place
        target = corpus / name
        if index % 2 == 0 and index // 2 < len(unreadable):
            shutil.copy(unreadable[index // 2].path, target)
            replaced[target.name] = unreadable[index // 2].kind
        else:
            target.symlink_to(covid / name)
    rows.to_csv(corpus / "metadata.csv", index=False)

    run_dir = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="modeling_medclip.collator"):
        result = train(tiny_run(run_dir, "--image_dataset", f"covid_cxr={corpus}", "--max_steps", "4",
                                "--save_steps", "2", "--shuffle_buffer_size", "4"))  # fmt: skip
    assert result.global_step == 4 and result.metrics["skipped_images"] > 0
    skipped = {name for name in replaced if name in caplog.text}
    assert len(skipped) == result.metrics["skipped_images"] > 0  # every skip counted and named
    assert [p.name for p in sorted_checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    saved = {p.name: folder_digest(p) for p in sorted_checkpoints(run_dir)}

    # run_eval.py on a task whose images include every kind: the awkward ones decode, a bad one is named
    task = tmp_path / "task"
    task.mkdir()
    decodable = [image for image in bad_images if image.decodes and image.size == (48, 40)]
    table = [{"image": str(image.path), "label": ["normal", "pneumonia"][i % 2], "patient_id": f"p{i}"}
             for i, image in enumerate(decodable * 2)]  # fmt: skip
    pd.DataFrame(table).to_csv(task / "good.csv", index=False)
    truncated = next(image for image in bad_images if image.kind == "truncated JPEG")
    with_bad = [*table, *({**row, "image": str(truncated.path)} for row in table)]  # in either part of any split
    pd.DataFrame(with_bad).to_csv(task / "with_bad.csv", index=False)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MEDCLIP_SHARED_DATA": str(shared_data)}
    outcomes = {}
    for name in ("good", "with_bad"):
        outcomes[name] = subprocess.run(
            [sys.executable, "run_eval.py", "--model_name_or_path", str(run_dir / "final"), "--eval_tasks",
             f"csv={task / f'{name}.csv'}", "--test_size", "0.5", "--output_dir", str(tmp_path / f"eval-{name}")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
        )  # fmt: skip
    assert outcomes["good"].returncode == 0, outcomes["good"].stderr[-3000:]
    assert (tmp_path / "eval-good" / "results.json").is_file()
    assert outcomes["with_bad"].returncode != 0
    assert "truncated.jpg" in outcomes["with_bad"].stderr and "ValueError" in outcomes["with_bad"].stderr
    assert {p.name: folder_digest(p) for p in sorted_checkpoints(run_dir)} == saved  # no checkpoint lost or changed


def test_training_start_up_names_a_bad_held_out_image_and_reads_dicom(bad_images, tokenizer_dir):
    from transformers import AutoTokenizer

    from modeling_medclip.training.validation import preprocess

    processor = MedCLIPProcessor(MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                                 AutoTokenizer.from_pretrained(tokenizer_dir))  # fmt: skip
    dicoms = [image.path for image in bad_images if image.decodes and "DICOM" in image.kind]
    assert preprocess(processor, dicoms * 150, batch_size=64).shape == (len(dicoms) * 150, 1, 32, 32)
    truncated = next(image.path for image in bad_images if image.kind == "truncated JPEG")
    with pytest.raises(ValueError, match="truncated.jpg"):
        preprocess(processor, [*dicoms, truncated])
