"""The headline numbers of a run's evaluation tasks: AUCs with patient-bootstrap intervals, retrieval rows, the table."""

import numpy as np
import pytest
import torch

from dataset_scripts.tasks import get_task
from modeling_medclip.evaluation import EvaluationSplit
from modeling_medclip.training.headline import (
    SentenceGallery,
    format_headline_table,
    observation_vectors,
    zero_shot_headline,
)
from modeling_medclip.training.validation import TaskEvaluation


def _evaluation(task_name: str, labels, patients) -> TaskEvaluation:
    task = get_task(task_name)
    split = EvaluationSplit(
        images=[f"{i}.png" for i in range(len(labels))], labels=labels, class_names=list(task.class_names),
        patient_ids=patients, image_ids=[str(i) for i in range(len(labels))],
    )  # fmt: skip
    return TaskEvaluation(task, split, prompts={}, pixel_values=torch.zeros(len(labels), 1, 2, 2))


def test_perfect_and_random_scores_of_a_two_class_task():
    rng = np.random.default_rng(0)
    labels = [0, 1] * 200  # pneumonia (class 0) / normal
    patients = [str(i // 2) for i in range(400)]  # two images per patient
    evaluation = _evaluation("pediatric-pneumonia", labels, patients)
    perfect = np.eye(2)[labels]
    metrics = zero_shot_headline(evaluation, perfect, n_resamples=200, seed=0)
    assert (metrics["auc"], metrics["auc_ci_low"], metrics["auc_ci_high"]) == (1.0, 1.0, 1.0)
    random = rng.random((400, 2))
    metrics = zero_shot_headline(evaluation, random, n_resamples=200, seed=0)
    assert abs(metrics["auc"] - 0.5) < 0.1 and metrics["auc_ci_low"] < metrics["auc"] < metrics["auc_ci_high"]
    assert metrics["auc_ci_high"] - metrics["auc_ci_low"] < 0.15
    assert metrics == zero_shot_headline(evaluation, random, n_resamples=200, seed=0)  # seeded
    assert zero_shot_headline(evaluation, random, n_resamples=0, seed=0) == {"auc": metrics["auc"]}
    one_class = _evaluation("pediatric-pneumonia", [0, 0, 0], ["a", "b", "c"])  # AUC undefined: no row
    assert zero_shot_headline(one_class, np.eye(2)[[0, 0, 0]], n_resamples=20, seed=0) == {}


def test_multilabel_task_reports_findings_with_enough_positives_and_their_macro():
    rng = np.random.default_rng(1)
    task = get_task("nih-cxr14")
    labels = np.zeros((100, len(task.class_names)))
    labels[:30, 0] = 1  # 30 positives of the first finding, 5 of the second: only the first is scored
    labels[30:35, 1] = 1  # (fewer than MIN_POSITIVES = 10)
    evaluation = _evaluation("nih-cxr14", labels.tolist(), [str(i) for i in range(100)])
    scores = rng.random(labels.shape)
    scores[:, 0] = labels[:, 0] * 0.5 + rng.random(100) * 0.6
    metrics = zero_shot_headline(evaluation, scores, n_resamples=100, seed=0)
    first = task.class_names[0]
    assert set(metrics) == {f"auc/{first}", f"auc/{first}_ci_low", f"auc/{first}_ci_high", "macro_auc",
                            "macro_auc_ci_low", "macro_auc_ci_high"}  # fmt: skip
    assert metrics["macro_auc"] == metrics[f"auc/{first}"] > 0.7


def test_observations_of_task_classes():
    pediatric = _evaluation("pediatric-pneumonia", [0, 1], ["a", "b"])
    vectors = observation_vectors(pediatric)
    assert vectors[0].nonzero()[0].tolist() == [7] and vectors[1].nonzero()[0].tolist() == [0]  # Pneumonia, No Finding
    normal = _evaluation("nih-cxr14-normal", [0, 1], ["a", "b"])  # "Abnormal" names no observation
    assert observation_vectors(normal).sum(axis=1).tolist() == [0.0, 1.0]


def test_gallery_keeps_distinct_sentences_and_a_seeded_subset():
    sentences = ["a", "b", "a", "c", "d"]
    labels = [[1, 0], [0, 1], [1, 0], [0, 0], [1, 1]]
    gallery = SentenceGallery(sentences, labels)
    assert gallery.texts == ["a", "b", "c", "d"] and gallery.labels.tolist() == [[1, 0], [0, 1], [0, 0], [1, 1]]
    small = SentenceGallery(sentences, labels, seed=3, max_size=2)
    assert len(small.texts) == 2 and small.texts == SentenceGallery(sentences, labels, seed=3, max_size=2).texts


def test_headline_table_shows_intervals_per_run():
    before = {"eval_t/auc": 0.5, "eval_t/auc_ci_low": 0.4, "eval_t/auc_ci_high": 0.6, "eval_t/zero_shot_accuracy": 0.3}
    after = {"eval_t/auc": 0.9, "eval_t/auc_ci_low": 0.85, "eval_t/auc_ci_high": 0.95, "eval_t/text_precision@10": 0.4}
    table = format_headline_table({"before": before, "after": after}).splitlines()
    assert table[0] == "| held-out metric (95% CI) | before | after |"
    assert table[2] == "| t/auc | 0.500 [0.400, 0.600] | 0.900 [0.850, 0.950] |"
    assert table[3] == "| t/text_precision@10 | n/a | 0.400 |" and len(table) == 4


@pytest.mark.parametrize("task_name", ["pediatric-pneumonia-bacterial-viral", "nih-cxr14-normal"])
def test_no_retrieval_rows_where_every_image_has_the_same_observations(task_name):
    from modeling_medclip.training.headline import retrieval_headline

    evaluation = _evaluation(task_name, [0, 1, 0, 1], ["a", "b", "c", "d"])
    gallery = SentenceGallery(["x"], [[1.0] * 14])
    assert retrieval_headline(None, None, evaluation, torch.zeros(4, 8), gallery, 10, 0) == {}
