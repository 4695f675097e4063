"""Tests of `modeling_medclip.plots`: every plot is a valid, non-blank PNG file."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from modeling_medclip.metrics import ConfidenceInterval
from modeling_medclip.plots import (
    plot_confusion_matrix,
    plot_label_efficiency,
    plot_precision_at_k,
    plot_retrieval_examples,
    plot_roc_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["normal", "bacterial pneumonia", "viral pneumonia"]


def assert_drawn_png(path, min_width: int = 300, min_height: int = 200) -> None:
    """A PNG file by its signature, of a plausible size, with drawn content (many colours, not one flat fill)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_width and image.height >= min_height
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    # most of a plot is white background, but a real drawing covers a fair share of it
    assert 0.02 < (pixels.min(axis=2) < 200).mean() < 0.9


def _scores(seed: int, signal: float):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=150)
    scores = rng.random((150, 3)) + signal * np.eye(3)[labels]
    return labels, scores / scores.sum(axis=1, keepdims=True)


def _ci(value: float, half_width: float) -> ConfidenceInterval:
    return ConfidenceInterval(value, value - half_width, value + half_width)


def test_roc_curves_of_two_models(tmp_path):
    labels, trained = _scores(0, 1.0)
    _, untrained = _scores(1, 0.0)
    path = plot_roc_curves({"trained": trained, "random-init": untrained}, labels, CLASSES, tmp_path / "roc.png",
                           title="pediatric-pneumonia test split")
    assert_drawn_png(path)


def test_roc_curves_of_a_multilabel_task_with_an_undefined_class(tmp_path):
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=(80, 5))
    labels[:, 4] = 0  # no positive: the panel says so instead of drawing a curve
    path = plot_roc_curves(rng.random((80, 5)), labels, ["A", "B", "C", "D", "E"], tmp_path / "roc-multilabel.png")
    assert_drawn_png(path)


def test_confusion_matrix(tmp_path):
    labels, scores = _scores(3, 0.8)
    path = plot_confusion_matrix(labels, scores.argmax(axis=1), CLASSES, tmp_path / "confusion.png")
    assert_drawn_png(path)


def test_precision_at_k_curves(tmp_path):
    ks = [1, 5, 10, 50]
    curves = {
        "trained, image->text": {k: _ci(0.8 - 0.05 * i, 0.06) for i, k in enumerate(ks)},
        "random-init, image->text": {k: _ci(0.35, 0.08) for k in ks},
        "trained, image->image": {k: 0.7 - 0.04 * i for i, k in enumerate(ks)},
    }
    assert_drawn_png(plot_precision_at_k(curves, tmp_path / "precision_at_k.png", chance=0.33))


def test_label_efficiency_curve(tmp_path):
    curves = {
        "pretrained": {0.01: _ci(0.80, 0.05), 0.1: _ci(0.88, 0.03), 1.0: _ci(0.92, 0.02)},
        "random-init": {0.01: _ci(0.60, 0.07), 0.1: _ci(0.70, 0.04), 1.0: _ci(0.82, 0.03)},
    }
    assert_drawn_png(plot_label_efficiency(curves, tmp_path / "label_efficiency.png", chance=0.5))


def test_retrieval_examples_on_real_xrays(tmp_path, shared_data):
    root = shared_data / "pediatric-pneumonia-cxr"
    metadata = pd.read_csv(root / "metadata.csv").groupby("label").head(1)
    sentences = [
        [("Right lower lobe consolidation consistent with pneumonia.", "Pneumonia", label != "normal"),
         ("The lungs are clear. No pleural effusion or pneumothorax.", "No Finding", label == "normal"),
         ("Heart size is normal. There is no focal airspace disease and no pneumothorax or effusion, the "
          "mediastinal contour is within normal limits.", "No Finding", label == "normal")]
        for label in metadata["label"]
    ]
    path = plot_retrieval_examples(
        [root / name for name in metadata["image"]], list(metadata["label"]), sentences, tmp_path / "retrieval.png"
    )
    assert_drawn_png(path, min_width=800)
    with pytest.raises(ValueError, match="differ"):
        plot_retrieval_examples([root / metadata["image"].iloc[0]], ["normal"], [], tmp_path / "bad.png")
