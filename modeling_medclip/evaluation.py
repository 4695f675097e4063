"""Evaluation of a pretrained dual encoder: zero-shot classification and retrieval on a labelled split, a results table.

The functions take a model, its processor and plain Python data (images as paths or PIL images, texts, class ids or
multi-hot label vectors), so the training loop (periodic validation) and `run_eval.py` share them; which corpus a
split comes from is the business of the task registry (`dataset_scripts.tasks`). [`evaluate_split`] runs both
protocols on one labelled split:

- zero-shot classification with a prompt set per class (multi-class: softmax over the classes; multi-label: each class
  against its negated prompts): accuracy and macro ROC AUC;
- retrieval over the split's distinct texts, ConVIRT's protocol (a retrieved item is relevant when it shares the
  query's class): image->text and image->image Precision@k, plus exact-pair image->text retrieval (the image's own
  report) where pairs exist.
"""

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from .metrics import label_relevance, pair_relevance, retrieval_metrics, zero_shot_metrics
from .retrieval import EmbeddingIndex, embed_images, embed_texts
from .zero_shot import ZeroShotClassifier


@dataclass
class EvaluationSplit:
    """A labelled evaluation split.

    Args:
        images: image file paths, `{"path", "bytes"}` dicts or PIL images.
        labels: `(N,)` class ids over `class_names` (multi-class), or `(N, C)` 0/1 vectors (multi-label).
        class_names: the classes, in id order (the keys of the zero-shot prompt sets).
        texts: the report (or note) of each image; `None` or `""` where an image has none.
        patient_ids, image_ids: the ids of every image (patient ids group bootstrap resamples).
    """

    images: list
    labels: list
    class_names: list[str]
    texts: list[str | None] = field(default_factory=list)
    patient_ids: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in ("labels", "texts", "patient_ids", "image_ids"):
            values = getattr(self, name)
            if (values or name == "labels") and len(values) != len(self.images):
                raise ValueError(f"{len(self.images)} images but {len(values)} {name}")

    @property
    def multilabel(self) -> bool:
        """Whether the labels are multi-hot vectors (each class decided on its own)."""
        return bool(self.labels) and isinstance(self.labels[0], (list, tuple))


def load_images(images: Sequence) -> list[Image.Image]:
    """Opens image paths and `{"path", "bytes"}` dicts (PIL images pass through); the processor decodes every mode,
    16-bit and DICOM included."""
    return [_open(image) for image in images]


def _open(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):
        return Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    return Image.open(image)


@torch.no_grad()
def evaluate_zero_shot(
    model, processor, split: EvaluationSplit, class_prompts: dict[str, list[str]], batch_size: int = 32,
    image_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy and macro AUC of `class_prompts` (one prompt list per class, in `split.class_names` order;
    for a multi-label split, `{"positive": [...], "negative": [...]}` per class)."""
    if list(class_prompts) != list(split.class_names):
        raise ValueError(f"prompt classes {list(class_prompts)} differ from the split's {split.class_names}")
    mode = "multilabel" if split.multilabel else "multiclass"
    classifier = ZeroShotClassifier(model, processor, class_prompts, mode=mode, batch_size=batch_size)
    if image_embeddings is None:
        image_embeddings = classifier.encode_images(load_images(split.images))
    probs = classifier.classify_embeddings(image_embeddings).probs
    metrics = zero_shot_metrics(probs, split.labels, split.class_names)
    return {"zero_shot_accuracy": metrics["accuracy"], "zero_shot_macro_auc": metrics["macro_auc"]}


@torch.no_grad()
def evaluate_retrieval(
    model, processor, split: EvaluationSplit, ks: Sequence[int] = (1, 5, 10), batch_size: int = 32,
    image_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image->text (class agreement and exact pair) and image->image (class agreement) retrieval metrics.

    The text gallery is the split's distinct non-empty texts, each labelled with the class of its images (texts shared
    by images of different classes are dropped from the class-agreement protocol's gallery).
    """
    if image_embeddings is None:
        image_embeddings = embed_images(model, processor, load_images(split.images), batch_size)
    labels = torch.as_tensor(split.labels)  # (N,) class ids or (N, C) multi-hot
    results = {}
    max_k = max(ks)

    gallery = EmbeddingIndex(image_embeddings, ids=[str(i) for i in range(len(labels))])
    if len(gallery) > 1:
        _, indices = gallery.search(image_embeddings, min(max_k + 1, len(gallery)))
        indices = indices[:, 1:]  # every query retrieves itself first
        relevant = label_relevance(labels, labels)
        for name, value in retrieval_metrics(indices, relevant, [k for k in ks if k < len(gallery)]).items():
            results[f"image_to_image_{name}"] = value

    if split.texts:
        text_classes: dict[str, set] = {}
        for text, label in zip(split.texts, split.labels):
            if text and text.strip():
                text_classes.setdefault(text, set()).add(tuple(label) if split.multilabel else int(label))
        texts = list(text_classes)
        if len(texts) > 1:
            text_embeddings = embed_texts(model, processor, texts, batch_size)
            index = EmbeddingIndex(text_embeddings, ids=[str(i) for i in range(len(texts))])
            k = min(max_k, len(texts))
            _, indices = index.search(image_embeddings, k)
            usable_ks = [value for value in ks if value <= k]
            # class agreement: texts whose images all share one class (multi-hot: one label vector)
            unshared = [0.0] * len(split.class_names) if split.multilabel else -1
            text_labels = torch.tensor([next(iter(c)) if len(c) == 1 else unshared for c in text_classes.values()])
            relevant = label_relevance(labels, text_labels)
            for name, value in retrieval_metrics(indices, relevant, usable_ks).items():
                results[f"image_to_text_{name}"] = value
            # exact pair: the image's own report, for images that have one
            has_text = [i for i, text in enumerate(split.texts) if text and text.strip()]
            pair_ids = [split.texts[i] for i in has_text]
            relevant = pair_relevance(pair_ids, texts)
            for name, value in retrieval_metrics(indices[has_text], relevant, usable_ks).items():
                results[f"image_to_own_text_{name}"] = value
    return results


PROTOCOLS = ("zero-shot", "retrieval")


def evaluate_split(
    model, processor, split: EvaluationSplit, class_prompts: dict | None = None, ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32, pixel_values: torch.Tensor | None = None, protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, float]:
    """The metrics of `protocols` (zero-shot, needing `class_prompts`, and / or retrieval) on one split, the images
    encoded once for all.

    `pixel_values` `(N, C, H, W)`: the split's images already preprocessed by `processor` (the training loop
    preprocesses its held-out split once and evaluates it many times); by default they are read from `split.images`.
    """
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"unknown evaluation protocol(s) {unknown}; expected {PROTOCOLS}")
    model.eval()
    images = pixel_values if pixel_values is not None else load_images(split.images)
    image_embeddings = embed_images(model, processor, images, batch_size)
    results = {}
    if "zero-shot" in protocols:
        if class_prompts is None:
            raise ValueError("the zero-shot protocol needs class_prompts")
        results.update(evaluate_zero_shot(model, processor, split, class_prompts, batch_size, image_embeddings))
    if "retrieval" in protocols:
        results.update(evaluate_retrieval(model, processor, split, ks, batch_size, image_embeddings))
    results["num_images"] = len(split.images)
    return results


def format_results_table(columns: dict[str, dict[str, float]], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table with one row per metric and one column per run (e.g. `{"random init": ..., "trained": ...}`)."""
    names = list(columns)
    if metrics is None:
        metrics = [key for key in columns[names[0]] if isinstance(columns[names[0]][key], float)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        cells = []
        for name in names:
            value = columns[name].get(metric)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "PROTOCOLS",
    "EvaluationSplit",
    "evaluate_retrieval",
    "evaluate_split",
    "evaluate_zero_shot",
    "format_results_table",
    "load_images",
]
