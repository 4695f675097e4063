"""Tests of `modeling_medclip.training.fine_tune`: a 1-epoch fine-tune of a tiny model on real pediatric pneumonia
X-rays at two label fractions, and the best validation epoch kept."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modeling_medclip import MedCLIPForImageClassification, MedCLIPImageProcessor
from modeling_medclip.training.fine_tune import FineTuneSettings, classifier_scores, run_fine_tune, train_classifier
from modeling_medclip.training.optim import parameter_groups


def _classifier(seed: int, num_labels: int = 3, **kwargs):
    torch.manual_seed(seed)
    return MedCLIPForImageClassification(tiny_config(num_labels=num_labels, **kwargs))


@pytest.fixture(scope="module")
def pneumonia(pneumonia_patients):
    subset, root = pneumonia_patients(16)
    classes = sorted(subset["label"].unique())
    return ([str(root / name) for name in subset["image"]], subset["label"].map(classes.index).to_numpy(),
            subset["patient_id"].to_numpy(), classes)  # fmt: skip


def test_the_head_trains_at_the_head_learning_rate():
    settings = FineTuneSettings(learning_rate=1e-4, head_learning_rate=1e-2)
    groups = parameter_groups(_classifier(0), settings.optimization_arguments())
    head = [group for group in groups if group["group_name"].startswith("head")]
    assert head and all(group["lr"] == 1e-2 for group in head)
    assert all(group["lr"] == 1e-4 for group in groups if group["group_name"].startswith("tower"))


def test_training_changes_the_weights_and_lowers_the_loss(pneumonia):
    images, labels, _, _ = pneumonia
    processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    classifier = _classifier(0)
    before = {name: p.detach().clone() for name, p in classifier.named_parameters()}
    batch = processor(images=images[:16], return_tensors="pt")["pixel_values"]
    targets = torch.tensor(labels[:16])
    with torch.no_grad():
        loss_before = classifier.eval()(pixel_values=batch, labels=targets).loss.item()
    settings = FineTuneSettings(num_train_epochs=3, min_steps=0, per_device_train_batch_size=8, num_workers=0,
                                learning_rate=1e-3, head_learning_rate=1e-2)  # fmt: skip
    assert train_classifier(classifier, processor, images[:16], labels[:16], settings) == {
        "epoch": 3, "validation_score": None
    }
    with torch.no_grad():
        loss_after = classifier(pixel_values=batch, labels=targets).loss.item()
    assert loss_after < loss_before
    changed = [name for name, p in classifier.named_parameters() if not torch.equal(p, before[name])]
    assert any(name.startswith("vision_model.") for name in changed) and "classifier.weight" in changed
    scores = classifier_scores(classifier, processor, images[:5], multilabel=False, num_workers=0)
    assert scores.shape == (5, 3) and np.allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_the_epoch_that_scores_best_on_validation_is_kept(pneumonia, monkeypatch):
    from modeling_medclip.training import fine_tune

    images, labels, _, _ = pneumonia
    processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    epoch_scores = iter([0.6, 0.9, 0.7])  # the validation scores of epochs 1, 2, 3
    weights_at_epoch = []

    def scripted_score(scores, labels):
        return next(epoch_scores)

    def record_weights(module, *args):
        weights_at_epoch.append(module.classifier.weight.detach().clone())

    monkeypatch.setattr(fine_tune, "validation_score", scripted_score)
    classifier = _classifier(0)
    monkeypatch.setattr(fine_tune._KeepBestEpoch, "on_epoch_end", _recording(fine_tune._KeepBestEpoch.on_epoch_end,
                                                                             record_weights))  # fmt: skip
    settings = FineTuneSettings(num_train_epochs=3, min_steps=0, per_device_train_batch_size=8, num_workers=0,
                                learning_rate=1e-3, head_learning_rate=1e-2)  # fmt: skip
    kept = train_classifier(classifier, processor, images[:16], labels[:16], settings,
                            validation=(images[16:24], labels[16:24]))  # fmt: skip
    assert kept == {"epoch": 2, "validation_score": 0.9}
    assert len(weights_at_epoch) == 3 and not torch.equal(weights_at_epoch[1], weights_at_epoch[2])
    assert torch.equal(classifier.classifier.weight, weights_at_epoch[1]) and not classifier.training


def test_a_small_draw_trains_min_steps_and_is_scored_about_num_train_epochs_times(pneumonia, monkeypatch):
    from modeling_medclip.training import fine_tune

    images, labels, _, _ = pneumonia
    processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    scored_epochs, steps = [], []
    monkeypatch.setattr(fine_tune, "validation_score", lambda scores, labels: scored_epochs.append(len(steps)) or 0.5)
    original = fine_tune._KeepBestEpoch.on_epoch_end

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        steps.append(state.global_step)
        return original(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(fine_tune._KeepBestEpoch, "on_epoch_end", on_epoch_end)
    settings = FineTuneSettings(num_train_epochs=2, min_steps=12, per_device_train_batch_size=8, num_workers=0)
    assert settings.epochs(16) == 6 and settings.epochs(400) == 2  # 2 steps per epoch: 6 epochs reach 12 steps
    kept = train_classifier(_classifier(0), processor, images[:16], labels[:16], settings,
                            validation=(images[16:24], labels[16:24]))  # fmt: skip
    assert steps[-1] == 12 and len(steps) == 6
    assert scored_epochs == [3, 6] and kept["epoch"] == 3  # ties keep the first


def _recording(on_epoch_end, record):
    def wrapped(self, args, state, control, model=None, **kwargs):
        record(model)
        return on_epoch_end(self, args, state, control, model=model, **kwargs)

    return wrapped


@pytest.mark.slow
def test_one_epoch_fine_tune_at_two_fractions(pneumonia):
    images, labels, patients, classes = pneumonia
    processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    test_patients = set(np.unique(patients)[::4])
    test = np.array([p in test_patients for p in patients])
    result = run_fine_tune(
        _classifier, processor,
        [images[i] for i in np.flatnonzero(~test)], labels[~test], patients[~test],
        [images[i] for i in np.flatnonzero(test)], labels[test], patients[test],
        settings=FineTuneSettings(num_train_epochs=1, min_steps=0, per_device_train_batch_size=8, num_workers=1),
        fractions=(0.1, 1.0), seeds={0.1: 2}, class_names=classes, n_resamples=100,
    )  # fmt: skip
    ten_percent, full = result.fractions
    assert [len(ten_percent.runs), len(full.runs)] == [2, 1]
    assert full.runs[0].num_train_images == len(result.split_ids["fit"])
    assert ten_percent.runs[0].num_train_images == round(0.1 * len(result.split_ids["fit"]))
    assert set(result.split_ids["fit"]).isdisjoint(result.split_ids["validation"])
    assert all(run.selected == {"epoch": 1} and 0.0 <= run.validation_score <= 1.0
               for fraction in result.fractions for run in fraction.runs)  # fmt: skip
    for fraction in result.fractions:
        for ci in fraction.metrics.values():
            assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0
