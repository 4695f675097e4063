"""The embedded default (`python run_pretrain.py`, the cpu-demo preset) at reduced steps, in a subprocess: the printed
table's shape, the held-out ids written to the output folder and disjoint from the training patients, the ROC PNGs."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from dataset_scripts.sources import image_stream, parse_source
from modeling_medclip.training import parse_args
from modeling_medclip.training.data import held_out_patients, training_sources

pytestmark = pytest.mark.slow

FLAGS = ["--max_steps", "2", "--save_steps", "0", "--disable_tqdm", "--bootstrap_resamples", "20",
         "--max_eval_images", "60", "--per_device_train_batch_size", "8"]  # fmt: skip


def test_cpu_demo_prints_the_table_and_holds_out_patients(tmp_path, shared_data):
    output_dir = tmp_path / "cpu-demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDCLIP_SHARED_DATA": str(shared_data)}
    command = [sys.executable, "run_pretrain.py", "--output_dir", str(output_dir), *FLAGS]
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]

    table = [line for line in completed.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| held-out metric (95% CI) | before training | after 2 steps |"
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    for row in ("pediatric-pneumonia/auc", "pediatric-pneumonia-bacterial-viral/auc", "nih-cxr14-normal/auc",
                "covid-cxr/macro_auc", "pediatric-pneumonia/text_precision@10"):  # fmt: skip
        assert row in rows, sorted(rows)
        cells = [cell.strip() for cell in rows[row].split("|")[2:4]]
        assert all(cell.count("[") == 1 and cell.endswith("]") for cell in cells), rows[row]  # value [low, high]
    assert all(line.count("|") == 4 for line in table)
    for task in ("pediatric-pneumonia", "nih-cxr14", "covid-cxr"):
        assert (output_dir / f"roc_{task}.png").stat().st_size > 1000

    args = parse_args(["--output_dir", str(output_dir), *FLAGS])
    image_sources, _ = training_sources(args.data, "decoupled")
    held_out = held_out_patients(args.data, image_sources)
    training_patients = {
        source.name: {example["patient_id"] for example in image_stream([source], held_out=held_out)}
        for source in image_sources
    }
    for task, corpus in (("pediatric-pneumonia", "pediatric_pneumonia"), ("nih-cxr14", "nih_cxr14")):
        written = json.loads((output_dir / "eval_splits" / f"{task}.json").read_text())["patient_ids"]
        assert written and not set(written) & training_patients[corpus]
        assert set(written) <= held_out[parse_source(corpus)]
