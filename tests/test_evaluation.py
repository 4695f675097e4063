"""Evaluation on real held-out X-rays and the results table (run_eval.py: tests/test_run_eval.py)."""

import math

import pytest
import torch
from conftest import tiny_config
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
