"""Tests of `modeling_medclip.linear_probe`: synthetic features with a known answer, the splits, and a probe of a tiny
random model's features on real pediatric pneumonia X-rays."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy.stats import norm
from torch.utils.data import DataLoader

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel
from modeling_medclip.linear_probe import (
    ProbeData,
    extract_features,
    image_features,
    label_fraction,
    patient_split,
    run_linear_probe,
)


def _gaussian_classes(num_patients: int, separation: float, seed: int, images_per_patient: int = 2) -> ProbeData:
    """Binary labels per patient; feature 0 is the label times `separation` plus unit noise, 7 more features are
    noise. The Bayes-optimal AUC is then `Phi(separation / sqrt(2))`."""
    rng = np.random.default_rng(seed)
    patient_labels = rng.integers(0, 2, size=num_patients)
    labels = np.repeat(patient_labels, images_per_patient)
    features = rng.normal(size=(len(labels), 8))
    features[:, 0] += separation * labels
    groups = np.repeat(np.arange(num_patients) + seed * 100_000, images_per_patient)
    return ProbeData(features, labels, groups, ids=[f"{seed}-{i}" for i in range(len(labels))])


def test_probe_recovers_the_known_auc_and_chance():
    train, test = _gaussian_classes(1000, 2.0, seed=0), _gaussian_classes(600, 2.0, seed=1)
    result = run_linear_probe(train, test, fractions=(0.01, 1.0), n_resamples=200)
    one_percent, full = result.fractions
    optimal = norm.cdf(2.0 / np.sqrt(2))  # 0.921
    assert full.metrics["macro_auc"].low <= optimal <= full.metrics["macro_auc"].high
    assert len(full.runs) == 1 and len(one_percent.runs) == 5  # the default seeds per fraction
    # 1% of the ~1600 fit images: 16 labels, a wider interval than with all of them, averaged over 5 draws
    assert all(run.num_train_images == 16 for run in one_percent.runs)
    assert len({tuple(run.train_ids) for run in one_percent.runs}) == 5
    assert one_percent.metrics["macro_auc"].value == pytest.approx(
        np.mean([run.test_metrics["macro_auc"] for run in one_percent.runs])
    )
    assert one_percent.seed_std["macro_auc"] > 0.0

    noise = _gaussian_classes(600, 0.0, seed=2)
    chance = run_linear_probe(noise, _gaussian_classes(600, 0.0, seed=3), fractions=(1.0,), n_resamples=200)
    auc = chance.fractions[0].metrics["macro_auc"]
    assert auc.low < 0.5 < auc.high


def test_multilabel_probe_on_per_class_signals():
    rng = np.random.default_rng(0)

    def make(num_images: int, offset: int) -> ProbeData:
        labels = rng.integers(0, 2, size=(num_images, 3))
        features = rng.normal(size=(num_images, 6))
        features[:, :3] += 3.0 * labels  # class c is visible in feature c only
        return ProbeData(features, labels, groups=np.arange(num_images) // 3 + offset)

    result = run_linear_probe(make(600, 0), make(300, 10_000), fractions=(0.1, 1.0), class_names=["a", "b", "c"],
                              n_resamples=100)
    for fraction in result.fractions:
        for run in fraction.runs:
            # Phi(3 / sqrt(2)) = 0.983 per class
            assert min(run.test_metrics["per_class_auc"].values()) > 0.9
    assert result.fractions[1].metrics["macro_auc"].low > 0.95


def test_patient_split_and_label_fraction():
    data = _gaussian_classes(200, 1.0, seed=4, images_per_patient=3)
    fit, validation = patient_split(data.labels, data.groups, validation_size=0.2, seed=0)
    assert set(data.groups[fit]).isdisjoint(data.groups[validation])
    assert len(fit) + len(validation) == len(data.labels)
    assert 0.1 < len(validation) / len(data.labels) < 0.3
    assert np.array_equal(patient_split(data.labels, data.groups, 0.2, seed=0)[1], validation)
    assert not np.array_equal(patient_split(data.labels, data.groups, 0.2, seed=1)[1], validation)

    chosen = label_fraction(data.labels, 0.1, seed=0)
    assert len(chosen) == 60
    # stratified: the class balance of the draw is the data's, to one image
    assert abs(data.labels[chosen].mean() * 60 - data.labels.mean() * 60) <= 1
    assert np.array_equal(label_fraction(data.labels, 0.1, seed=0), chosen)
    assert not np.array_equal(label_fraction(data.labels, 0.1, seed=1), chosen)
    # a tiny fraction still keeps one image of every class
    assert set(data.labels[label_fraction(data.labels, 0.001, seed=0)]) == {0, 1}
    imbalanced = np.array([0] * 90 + [1] * 10 + [2] * 3)  # a stratified draw of 3 would give no 2 (and often no 1)
    for seed in range(20):
        assert sorted(imbalanced[label_fraction(imbalanced, 0.01, seed)]) == [0, 1, 2]
        assert set(imbalanced[label_fraction(imbalanced, 0.04, seed)]) == {0, 1, 2}  # one image beyond the three
        assert set(imbalanced[label_fraction(imbalanced, 0.1, seed)]) == {0, 1, 2}
    assert len(label_fraction(data.labels, 1.0, seed=0)) == len(data.labels)
    with pytest.raises(ValueError, match="label fractions"):
        label_fraction(data.labels, 0.0, seed=0)


def test_bad_probe_input_names_the_input():
    with pytest.raises(ValueError, match="feature rows but 3 labels"):
        ProbeData(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="patient ids"):
        ProbeData(np.zeros((4, 2)), np.zeros(4), groups=np.zeros(2))
    data = _gaussian_classes(20, 1.0, seed=5)
    with pytest.raises(ValueError, match="8-d, test features 2-d"):
        run_linear_probe(data, ProbeData(np.zeros((4, 2)), np.zeros(4)))
    with pytest.raises(ValueError, match="'pooled' or 'projection'"):
        image_features(MedCLIPModel(tiny_config()), torch.zeros(1, 1, 32, 32), kind="cls")


@pytest.fixture(scope="module")
def pneumonia_subset(pneumonia_patients):
    """60 patients of each pediatric-pneumonia class (normal / bacterial / viral), every image of them."""
    subset, root = pneumonia_patients(60)
    return root, subset, sorted(subset["label"].unique())


@pytest.mark.slow
def test_linear_probe_of_a_tiny_model_on_pediatric_pneumonia(pneumonia_subset):
    root, subset, class_names = pneumonia_subset
    processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64)
    torch.manual_seed(0)
    model = MedCLIPModel(tiny_config()).eval()
    paths = [root / name for name in subset["image"]]
    loader = DataLoader(
        paths, batch_size=32, num_workers=1,
        collate_fn=lambda batch: processor(images=[str(p) for p in batch], return_tensors="pt"),
    )
    features = extract_features(model, loader, kind="pooled")
    assert features.shape == (len(paths), model.config.vision_config.hidden_sizes[-1])
    # the projection features are the (normalised) zero-shot embeddings
    projected = extract_features(model, [processor(images=[str(paths[0])], return_tensors="pt")], kind="projection")
    assert projected.shape == (1, 16) and np.linalg.norm(projected) == pytest.approx(1.0, abs=1e-5)

    labels = subset["label"].map(class_names.index).to_numpy()
    data = ProbeData(features, labels, subset["patient_id"].to_numpy(), ids=list(subset["image"]))
    train_indices, test_indices = patient_split(data.labels, data.groups, validation_size=0.3, seed=1)
    result = run_linear_probe(
        data.subset(train_indices), data.subset(test_indices), fractions=(0.1, 1.0), class_names=class_names,
        n_resamples=200,
    )
    ten_percent, full = result.fractions
    assert [len(ten_percent.runs), len(full.runs)] == [3, 1]
    for fraction in result.fractions:
        for name, ci in fraction.metrics.items():
            assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0, (fraction.fraction, name, ci)
        assert set(fraction.runs[0].test_metrics["per_class_auc"]) == set(class_names)
    # the splits are patient-disjoint and written out
    patient_of = dict(zip(subset["image"], subset["patient_id"]))
    parts = {name: {patient_of[i] for i in ids} for name, ids in result.split_ids.items()}
    assert parts["fit"].isdisjoint(parts["validation"]) and parts["fit"].isdisjoint(parts["test"])
    assert parts["validation"].isdisjoint(parts["test"])
    assert len(ten_percent.runs[0].train_ids) == round(0.1 * len(result.split_ids["fit"]))
    json_ready = result.to_dict()
    assert json_ready["fractions"][1]["metrics"]["macro_auc"]["value"] == full.metrics["macro_auc"].value
