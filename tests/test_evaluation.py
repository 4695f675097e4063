"""Evaluation on real held-out X-rays, the results table, the model card and run_eval.py."""

import json
import math

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from dataset_scripts.tasks import get_task
from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.evaluation import EvaluationSplit, evaluate_split, format_results_table, load_images
from modeling_medclip.metrics import zero_shot_metrics
from modeling_medclip.zero_shot import ZeroShotClassifier


@pytest.fixture(scope="module")
def model_and_processor(tokenizer_dir):
    torch.manual_seed(0)
    model = MedCLIPModel(tiny_config()).eval()
    processor = MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))
    return model, processor


def test_evaluate_split_matches_the_zero_shot_classifier(model_and_processor, covid_cxr_dir):
    model, processor = model_and_processor
    task = get_task("covid-cxr")
    full = task.split(covid_cxr_dir)
    split = EvaluationSplit(full.images[:12], full.labels[:12], full.class_names, full.texts[:12])
    prompts = task.prompts(n_per_class=3)
    results = evaluate_split(model, processor, split, prompts, ks=(1, 5))
    probs = ZeroShotClassifier(model, processor, prompts).classify(load_images(split.images)).probs
    expected = zero_shot_metrics(probs, split.labels)
    assert results["zero_shot_accuracy"] == pytest.approx(expected["accuracy"])
    assert results["num_images"] == 12
    for key in ("image_to_text_precision@1", "image_to_text_precision@5", "image_to_image_precision@5",
                "image_to_own_text_recall@5"):
        assert 0.0 <= results[key] <= 1.0, key


def test_results_table_lists_every_run_and_marks_missing_values():
    table = format_results_table({"random init": {"auc": 0.5, "p@1": math.nan}, "trained": {"auc": 0.75, "p@1": 0.25}})
    lines = table.splitlines()
    assert lines[0] == "| metric | random init | trained |"
    assert "| auc | 0.500 | 0.750 |" in lines and "| p@1 | n/a | 0.250 |" in lines


def test_run_eval_writes_results_and_a_model_card(model_and_processor, covid_cxr_dir, tmp_path):
    import sys

    sys.path.insert(0, str(REPO_ROOT))
    import run_eval

    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    results = run_eval.main(
        ["--model_name_or_path", str(tmp_path / "model"), "--eval_tasks", f"covid-cxr={covid_cxr_dir}",
         "--prompts_per_class", "2", "--output_dir", str(tmp_path / "eval")]
    )["covid-cxr"]
    saved = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert saved["covid-cxr"] == pytest.approx(results)
    card = ModelCard.load(tmp_path / "eval" / "README.md")
    metrics = {m.metric_type: m.metric_value for m in card.data.eval_results if m.dataset_name == "covid-cxr"}
    assert metrics["zero_shot_macro_auc"] == pytest.approx(results["zero_shot_macro_auc"], abs=1e-4)
    split_ids = json.loads((tmp_path / "eval" / "eval_splits" / "covid-cxr.json").read_text())
    assert len(split_ids["image_ids"]) == results["num_images"]
    assert "not** a medical device" in card.text
