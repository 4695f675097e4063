"""`run_pretrain.py` on every dataset builder, as a user runs it: `--preset tiny --image_dataset NAME=PATH ...` in a
subprocess, on fixture layouts written here and on the real shared folders; two image sources mixed; a Hub dataset
repo on the local Hub server; ConVIRT paired batches from a corpus with reports."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from support.corpora import push_covid_subset, write_chexpert, write_image, write_mimic, write_rsna
from test_datasets import _nih_fixture
from transformers import AutoModel

pytestmark = pytest.mark.slow

DECOUPLED = ["--batching", "decoupled", "--loss_type", "semantic", "--text_dataset", "iu_xray"]
PAIRED_CONVIRT = ["--model_type", "convirt", "--num_frozen_text_layers", "1", "--batching", "paired"]


def run_pretrain(output_dir, *flags, env=None) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "run_pretrain.py", "--preset", "tiny", "--output_dir", str(output_dir), "--disable_tqdm",
        "--max_steps", "2", "--eval_steps", "0", "--save_steps", "0", "--per_device_train_batch_size", "4",
        "--max_eval_samples", "4", "--max_eval_images", "16", *flags,
    ]  # fmt: skip
    env = {**(env or os.environ), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def check_run(output_dir) -> list[dict]:
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in entries if "loss" in entry] == [1, 2]
    assert AutoModel.from_pretrained(output_dir / "final").config.projection_dim == 16
    return entries


def _image_folder(root):
    for i in range(8):
        write_image(root / ["normal", "pneumonia"][i % 2] / f"{i}.png", i)
    return root


@pytest.mark.parametrize(
    "builder, layout, flags",
    [
        ("mimic_cxr", lambda tmp: write_mimic(tmp / "mimic", 12), PAIRED_CONVIRT),  # paired from its reports
        ("chexpert", lambda tmp: write_chexpert(tmp / "CheXpert-v1.0-small", 12), DECOUPLED),
        ("nih_cxr14", lambda tmp: (_nih_fixture(tmp, False) and tmp), DECOUPLED),  # NIH's images_0xx/images/ layout
        ("rsna", lambda tmp: write_rsna(tmp / "rsna", 12), DECOUPLED),
        ("image_folder", lambda tmp: _image_folder(tmp / "folders"), DECOUPLED),
    ],
)
def test_every_builder_on_its_fixture_layout(builder, layout, flags, tmp_path, shared_data):
    folder = tmp_path / "data"
    folder.mkdir()
    if builder == "chexpert":
        (folder / "CheXpert-v1.0-small").mkdir()
    elif builder in ("mimic_cxr", "rsna"):
        (folder / {"mimic_cxr": "mimic", "rsna": "rsna"}[builder]).mkdir()
    root = layout(folder)
    run_pretrain(tmp_path / "run", "--image_dataset", f"{builder}={root}", *flags)
    check_run(tmp_path / "run")


@pytest.mark.parametrize(
    "builder, folder, flags, task",
    [
        ("covid_cxr", "covid-cxr", PAIRED_CONVIRT, "covid-cxr"),  # paired batches from the clinical notes
        ("nih_cxr14", "nih-cxr14-1000", DECOUPLED, "nih-cxr14"),
        ("pediatric_pneumonia", "pediatric-pneumonia-cxr", DECOUPLED, "pediatric-pneumonia"),
    ],
)
def test_every_builder_on_its_shared_folder(builder, folder, flags, task, tmp_path, shared_data):
    run_pretrain(tmp_path / "run", "--image_dataset", f"{builder}={shared_data / folder}", *flags, "--eval_tasks", task)
    entries = check_run(tmp_path / "run")
    assert any(f"eval_{task}/zero_shot_macro_auc" in entry for entry in entries)
    held_out = set(json.loads((tmp_path / "run" / "eval_splits" / f"{task}.json").read_text())["patient_ids"])
    assert held_out  # and training left them out: see test_sources.py / test_tasks.py


def test_two_image_sources_mixed(tmp_path, shared_data):
    completed = run_pretrain(
        tmp_path / "run", "--image_dataset", f"nih_cxr14={shared_data / 'nih-cxr14-1000'}",
        f"pediatric_pneumonia={shared_data / 'pediatric-pneumonia-cxr'}", "--image_dataset_weights", "0.7", "0.3",
        *DECOUPLED, "--eval_tasks", "nih-cxr14", "pediatric-pneumonia",
    )  # fmt: skip
    entries = check_run(tmp_path / "run")
    names = {name for entry in entries for name in entry}
    assert {"eval_nih-cxr14/zero_shot_macro_auc", "eval_nih-cxr14-normal/zero_shot_macro_auc",
            "eval_pediatric-pneumonia/zero_shot_macro_auc",
            "eval_pediatric-pneumonia-bacterial-viral/zero_shot_macro_auc"} <= names  # fmt: skip
    assert "| pediatric-pneumonia/auc |" in completed.stdout  # the headline table, with its intervals
    arguments = json.loads((tmp_path / "run" / "final" / "training_args.json").read_text())
    assert arguments["data"]["image_dataset_weights"] == [0.7, 0.3]


def test_a_hub_dataset_repo(hub_server, tmp_path, covid_cxr_dir):
    push_covid_subset(covid_cxr_dir, tmp_path, "user/covid-subset", rows=40, shard_size=20)
    run_pretrain(tmp_path / "run", "--image_dataset", "hub:user/covid-subset", *PAIRED_CONVIRT, env=hub_server.env)
    check_run(tmp_path / "run")
    assert "user/covid-subset" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_bad_data_flags_fail_before_any_work(tmp_path, shared_data):
    completed = subprocess.run(
        [sys.executable, "run_pretrain.py", "--preset", "tiny", "--output_dir", str(tmp_path / "run"),
         "--image_dataset", "mimic=/nowhere"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert completed.returncode != 0 and "known builders" in completed.stderr
