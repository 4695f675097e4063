"""Tests of `modeling_medclip.metrics`: bootstrap confidence intervals on hand-checkable cases."""

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from modeling_medclip.metrics import ConfidenceInterval, bootstrap_ci


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
