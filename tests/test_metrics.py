"""Tests of `modeling_medclip.metrics` and its `evaluate` modules: bootstrap confidence intervals, classification,
retrieval and labeler-agreement metrics on hand-checkable cases."""

import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from modeling_medclip.metrics import (
    EVALUATE_MODULES,
    ConfidenceInterval,
    accuracy,
    bootstrap_ci,
    classification_metrics,
    evaluate_module_path,
    label_relevance,
    labeler_agreement,
    macro_auc,
    macro_f1,
    retrieval_metrics,
    roc_auc_columns,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _random_scores(num_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, size=num_patients), rng.random(num_patients)


def test_perfect_classifier_has_interval_one_one():
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    ci = bootstrap_ci(roc_auc_score, labels, scores)
    assert (ci.value, ci.low, ci.high) == (1.0, 1.0, 1.0)
    # A resample holds one class only with probability 2 / 2**4 = 1/8: about 125 of 1000 are skipped.
    assert ci.n_resamples + ci.n_skipped == 1000
    assert 80 < ci.n_skipped < 170


def test_random_classifier_interval_is_around_one_half():
    labels, scores = _random_scores(2000)
    ci = bootstrap_ci(roc_auc_score, labels, scores)
    assert ci.value == pytest.approx(roc_auc_score(labels, scores))
    assert ci.low < 0.5 < ci.high
    # The AUC's standard error with 1000 positives and 1000 negatives is about 0.013, so the 95% interval's width
    # is about 4 * 0.013.
    assert 0.03 < ci.high - ci.low < 0.08
    assert ci.low <= ci.value <= ci.high


def test_interval_narrows_with_more_patients():
    widths = []
    for num_patients in (50, 500, 5000):
        labels, scores = _random_scores(num_patients, seed=1)
        ci = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=300)
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    # The width shrinks like 1 / sqrt(N): a factor of about sqrt(10) per step.
    assert 2.0 < widths[0] / widths[1] < 5.0 and 2.0 < widths[1] / widths[2] < 5.0


def test_group_resampling_keeps_a_patients_images_together():
    patients = np.repeat(np.arange(10), 3)  # 10 patients, 3 images each
    images = np.arange(30)
    seen = []

    def record(patient_ids, image_ids):
        seen.append((patient_ids.copy(), image_ids.copy()))
        return float(len(image_ids))

    ci = bootstrap_ci(record, patients, images, groups=patients, n_resamples=50)
    assert len(seen) == 51  # the full data, then every resample
    for patient_ids, image_ids in seen[1:]:
        assert len(image_ids) == 30  # 10 patients drawn, each with its 3 images
        copies = Counter(image_ids.tolist())
        for patient in set(patient_ids.tolist()):
            own = [copies[image] for image in range(3 * patient, 3 * patient + 3)]
            assert len(set(own)) == 1, f"patient {patient}'s images were split: {own}"
        assert all(patients[image] == patient for image, patient in zip(image_ids, patient_ids))
    assert ci.value == ci.low == ci.high == 30.0


def test_grouped_interval_of_duplicated_images_equals_the_per_patient_interval():
    """Two identical images per patient carry no more information than one: the grouped interval is the same."""
    labels, scores = _random_scores(200, seed=2)
    per_patient = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=200, seed=3)
    patients = np.repeat(np.arange(200), 2)
    duplicated = (np.repeat(labels, 2), np.repeat(scores, 2))
    grouped = bootstrap_ci(roc_auc_score, *duplicated, groups=patients, n_resamples=200, seed=3)
    assert (grouped.low, grouped.high) == pytest.approx((per_patient.low, per_patient.high))
    # Ignoring the patients treats the copies as independent evidence: an overconfident, narrower interval.
    per_image = bootstrap_ci(roc_auc_score, *duplicated, n_resamples=200, seed=3)
    assert per_image.high - per_image.low < 0.85 * (grouped.high - grouped.low)


def test_seeded_determinism():
    labels, scores = _random_scores(300, seed=4)
    first = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=200, seed=7)
    again = bootstrap_ci(roc_auc_score, torch.from_numpy(labels), torch.from_numpy(scores), n_resamples=200, seed=7)
    other = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=200, seed=8)
    assert first == again
    assert (first.low, first.high) != (other.low, other.high)


def test_confidence_level_widens_the_interval():
    labels, scores = _random_scores(300, seed=5)
    ci_80 = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=400, confidence=0.8)
    ci_99 = bootstrap_ci(roc_auc_score, labels, scores, n_resamples=400, confidence=0.99)
    assert ci_99.low < ci_80.low < ci_80.high < ci_99.high
    assert ci_80.to_dict() == {
        "value": ci_80.value, "low": ci_80.low, "high": ci_80.high, "confidence": 0.8, "n_resamples": 400,
        "n_skipped": 0,
    }
    assert isinstance(ci_80, ConfidenceInterval) and str(ci_80).count("[") == 1


def test_too_few_defined_resamples_is_a_clear_error():
    # A one-vs-rest AUC over three classes needs all three in a resample: with three samples only 6 / 27 do.
    labels = np.array([0, 1, 2])
    probs = np.eye(3)
    with pytest.raises(ValueError, match="undefined on .* of 1000 bootstrap resamples"):
        bootstrap_ci(lambda y, p: roc_auc_score(y, p, multi_class="ovr", labels=[0, 1, 2]), labels, probs)


@pytest.mark.parametrize(
    "arrays, kwargs, message",
    [
        ((np.zeros(4), np.arange(4)), {}, "undefined on the full data"),  # one class only
        ((np.array([0, 1, 0, 1]), np.arange(3)), {}, "one common length"),
        ((np.array([0, 1, 0, 1]), np.arange(4)), {"groups": np.arange(3)}, "`groups` must have one id per sample"),
        ((np.array([0, 1, 0, 1]), np.arange(4)), {"confidence": 1.0}, "`confidence`"),
        ((np.array([0, 1, 0, 1]), np.arange(4)), {"n_resamples": 0}, "`n_resamples`"),
        ((), {}, "at least one array"),
    ],
)
def test_bad_input_names_the_input(arrays, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(roc_auc_score, *arrays, **kwargs)


# ------------------------------------------------------------------------------------ classification metrics

MULTICLASS_SCORES = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
MULTICLASS_LABELS = np.array([0, 1, 1, 0, 1])  # class "c" has no positive: its AUC is undefined
MULTILABEL_SCORES = np.array([[0.9, 0.2], [0.4, 0.6], [0.7, 0.8], [0.1, 0.3]])
MULTILABEL_LABELS = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])


def test_multiclass_classification_metrics_by_hand():
    result = classification_metrics(MULTICLASS_SCORES, MULTICLASS_LABELS, class_names=["a", "b", "c"])
    # argmax [0, 1, 0, 2, 1] against [0, 1, 1, 0, 1]: 3 of 5 right
    assert result["accuracy"] == pytest.approx(0.6)
    # F1: a: TP 1, FP 1, FN 1 -> 0.5; b: TP 2, FP 0, FN 1 -> 0.8; c: one false positive -> 0
    assert result["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # AUC a: positives .7 .1 against negatives .2 .6 .3: 3 of 6 pairs; b: .5 .3 .4 against .2 .3: 5.5 of 6 (one tie)
    assert result["per_class_auc"]["a"] == pytest.approx(0.5)
    assert result["per_class_auc"]["b"] == pytest.approx(5.5 / 6)
    assert np.isnan(result["per_class_auc"]["c"])
    assert result["macro_auc"] == pytest.approx((0.5 + 5.5 / 6) / 2)
    # the bootstrap's macro AUC is strict: undefined while a class lacks positives, unless left out
    assert np.isnan(macro_auc(MULTICLASS_SCORES, MULTICLASS_LABELS))
    assert macro_auc(MULTICLASS_SCORES, MULTICLASS_LABELS, columns=[0, 1]) == pytest.approx(result["macro_auc"])


def test_multilabel_classification_metrics_by_hand():
    result = classification_metrics(MULTILABEL_SCORES, MULTILABEL_LABELS)
    # decisions at 0.5: [[1, 0], [0, 1], [1, 1], [0, 0]]: 7 of 8 entries right
    assert result["accuracy"] == pytest.approx(7 / 8)
    # F1 class 0: perfect; class 1: TP 1, FP 1 -> 2/3
    assert result["macro_f1"] == pytest.approx((1 + 2 / 3) / 2)
    # AUC class 0: .9 .7 above .4 .1 -> 1; class 1: .6 against .2 .8 .3 -> 2/3
    assert result["per_class_auc"] == pytest.approx({"0": 1.0, "1": 2 / 3})
    assert accuracy(MULTILABEL_SCORES, MULTILABEL_LABELS, threshold=0.95) == pytest.approx(5 / 8)
    assert macro_f1(MULTILABEL_SCORES, MULTILABEL_LABELS, threshold=0.65) == pytest.approx((1 + 0) / 2)


@pytest.mark.parametrize("multilabel", [False, True])
def test_fast_bootstrap_metrics_equal_scikit_learn(multilabel):
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(200, 4)) / 4  # coarse scores: many ties
    labels = rng.integers(0, 2, size=(200, 4)) if multilabel else rng.integers(0, 4, size=200)
    targets = labels if multilabel else np.eye(4, dtype=int)[labels]
    decisions = scores >= 0.5 if multilabel else np.eye(4, dtype=int)[scores.argmax(axis=1)]
    expected_aucs = [roc_auc_score(targets[:, c], scores[:, c]) for c in range(4)]
    assert roc_auc_columns(scores, labels) == pytest.approx(expected_aucs)
    assert macro_auc(scores, labels) == pytest.approx(np.mean(expected_aucs))
    assert macro_f1(scores, labels) == pytest.approx(f1_score(targets, decisions, average="macro", zero_division=0))
    reference = classification_metrics(scores, labels)
    assert accuracy(scores, labels) == pytest.approx(reference["accuracy"])
    assert macro_f1(scores, labels) == pytest.approx(reference["macro_f1"])


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        (np.zeros(4), np.zeros(4), "`scores` must have shape"),
        (np.zeros((4, 2)), np.zeros(3), r"`labels` must have shape \(4,\)"),
        (np.zeros((4, 2)), np.array([0, 1, 2, 0]), r"class ids in \[0, 2\)"),
        (np.zeros((4, 2)), np.zeros((4, 3)), "or \\(4, 2\\)"),
    ],
)
def test_classification_bad_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(scores, labels)


# ------------------------------------------------------------------------------------------------ retrieval

def _two_queries_over_sixty_items():
    """Gallery item i has class i % 3; both queries rank the gallery in index order; queries of class 0 and 1."""
    gallery_labels = [i % 3 for i in range(60)]
    ranking = [list(range(60)), list(range(60))]
    return ranking, [0, 1], gallery_labels


# Class-0 items among the first 1 / 5 / 10 / 50: 1, 2, 4, 17 (of 20); class-1: 0, 2, 3, 17; first class-1 at rank 2.
EXPECTED_RETRIEVAL = {
    "precision@1": (1 + 0) / 2, "recall@1": (1 / 20 + 0) / 2,
    "precision@5": (2 / 5 + 2 / 5) / 2, "recall@5": (2 / 20 + 2 / 20) / 2,
    "precision@10": (4 / 10 + 3 / 10) / 2, "recall@10": (4 / 20 + 3 / 20) / 2,
    "precision@50": 17 / 50, "recall@50": 17 / 20,
    "mrr": (1 + 1 / 2) / 2,
}


def test_retrieval_metrics_at_the_issue_cutoffs_by_hand():
    ranking, query_labels, gallery_labels = _two_queries_over_sixty_items()
    relevant = label_relevance(np.array(query_labels), np.array(gallery_labels))
    assert retrieval_metrics(ranking, relevant, ks=(1, 5, 10, 50)) == pytest.approx(EXPECTED_RETRIEVAL)


# ------------------------------------------------------------------------------------------ labeler agreement

LABELER_CLASSES = ["No Finding", "Cardiomegaly", "Edema"]
NAN = float("nan")
REFERENCE_LABELS = [[1.0, 0.0, NAN], [NAN, 1.0, -1.0], [NAN, 1.0, 0.0], [NAN, -1.0, 1.0]]
LABELER_LABELS = [[1.0, 0.0, 0.0], [None, 1.0, 1.0], [None, None, 0.0], [None, -1.0, -1.0]]


def test_labeler_agreement_by_hand():
    result = labeler_agreement(LABELER_LABELS, REFERENCE_LABELS, LABELER_CLASSES, micro_classes=LABELER_CLASSES[1:])
    cardiomegaly, edema = result["per_class"]["Cardiomegaly"], result["per_class"]["Edema"]
    # Cardiomegaly positive: reference in reports 1, 2, labeler in report 1 only
    assert cardiomegaly["positive"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert cardiomegaly["negative"]["f1"] == cardiomegaly["uncertain"]["f1"] == 1.0
    # Edema: positive in report 3 vs 1 (miss and false alarm), negative in 2 vs 0 and 2, uncertain in 1 vs 3
    assert edema["positive"] == pytest.approx({"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1})
    assert edema["negative"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    # No Finding is never negative: precision and recall undefined
    assert all(np.isnan(result["per_class"]["No Finding"]["negative"][key]) for key in ("precision", "recall", "f1"))
    # micro over the two findings: positive TP 1, FP 1, FN 2; negative TP 2, FP 1; uncertain TP 1, FP 1, FN 1
    micro = result["micro"]
    assert micro["positive"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert micro["negative"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert micro["uncertain"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # pooling No Finding too adds one agreeing positive
    every_class = labeler_agreement(LABELER_LABELS, REFERENCE_LABELS, LABELER_CLASSES)
    assert every_class["micro"]["positive"]["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


@pytest.mark.parametrize(
    "predicted, kwargs, message",
    [
        ([[2.0, 0.0, 0.0]] * 4, {}, "values other than"),
        ([[1.0, 0.0]] * 4, {}, "differ in shape"),
        (LABELER_LABELS, {"class_names": ["a", "b"]}, "2 names for 3 columns"),
        (LABELER_LABELS, {"class_names": LABELER_CLASSES, "micro_classes": ["Edemaa"]}, "Edemaa"),
    ],
)
def test_labeler_agreement_bad_input(predicted, kwargs, message):
    with pytest.raises(ValueError, match=message):
        labeler_agreement(predicted, REFERENCE_LABELS, **kwargs)


# ------------------------------------------------------------------------------------ shipped evaluate modules

def test_evaluate_modules_load_offline_and_match_the_hand_computations(tmp_path):
    """`evaluate.load(<path>)` of every shipped module, in a fresh process with the Hub switched off."""
    script = tmp_path / "load_modules.py"
    script.write_text(
        "import json, evaluate\n"
        "from modeling_medclip.metrics import evaluate_module_path\n"
        "args = json.loads(open(0).read())\n"
        "out = {}\n"
        "for key, (name, config, inputs) in args.items():\n"
        "    out[key] = evaluate.load(evaluate_module_path(name), config).compute(**inputs)\n"
        "print(json.dumps(out))\n"
    )
    ranking, query_labels, gallery_labels = _two_queries_over_sixty_items()
    inputs = {
        "multiclass": ("classification", None, {
            "prediction_scores": MULTICLASS_SCORES.tolist(), "references": MULTICLASS_LABELS.tolist(),
            "class_names": ["a", "b", "c"]}),
        "multilabel": ("classification", "multilabel", {
            "prediction_scores": MULTILABEL_SCORES.tolist(), "references": MULTILABEL_LABELS.tolist()}),
        "retrieval": ("retrieval", None, {
            "predictions": ranking, "references": query_labels, "gallery_labels": gallery_labels}),
        "labeler": ("labeler_agreement", None, {
            "predictions": LABELER_LABELS, "references": [[None if np.isnan(v) else v for v in row]
                                                          for row in REFERENCE_LABELS],
            "class_names": LABELER_CLASSES, "micro_classes": LABELER_CLASSES[1:]}),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf-home"), "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, str(script)], input=json.dumps(inputs), capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout.strip().splitlines()[-1])
    # float32 features: the scores go through Arrow as float32
    assert out["multiclass"]["accuracy"] == pytest.approx(0.6)
    assert out["multiclass"]["macro_auc"] == pytest.approx((0.5 + 5.5 / 6) / 2)
    assert out["multiclass"]["macro_f1"] == pytest.approx((0.5 + 0.8) / 3)
    assert out["multilabel"]["accuracy"] == pytest.approx(7 / 8)
    assert out["multilabel"]["per_class_auc"] == pytest.approx({"0": 1.0, "1": 2 / 3})
    assert out["retrieval"] == pytest.approx(EXPECTED_RETRIEVAL)
    assert out["labeler"]["micro"]["negative"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )


def test_evaluate_modules_are_package_data():
    """Every shipped module sits where pyproject.toml's package-data patterns put it into the wheel."""
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = REPO_ROOT / "modeling_medclip"
    for name in EVALUATE_MODULES:
        relative = Path(evaluate_module_path(name)).relative_to(package_dir).as_posix()
        assert Path(evaluate_module_path(name)).is_file()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data["modeling_medclip"]), relative
    with pytest.raises(ValueError, match="accuracy"):
        evaluate_module_path("accuracy")
