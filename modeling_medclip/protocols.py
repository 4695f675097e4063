"""Evaluation protocols with confidence intervals on one labelled split: what `run_eval.py --task` runs per model.

- Images are decoded and preprocessed in DataLoader workers ([`image_loader`]) while the model encodes the previous
  batch, under bf16 autocast where the hardware supports it ([`autocast_dtype`]), with the BatchNorms of frozen
  ResNet towers folded into their convolutions ([`fold_batch_norms`]).
- [`zero_shot_protocol`]: class scores from a prompt set (built in or a user's JSON / YAML file,
  [`load_prompt_file`]), scored by the shipped `classification` evaluate module, with patient-level bootstrap CIs.
- [`retrieval_protocol`]: image->text, text->image and image->image Precision@k / Recall@k / MRR, a retrieved item
  being relevant when it shares the query's label (ConVIRT), scored by the shipped `retrieval` evaluate module, with
  bootstrap CIs over the queries (query patients for image queries).
- [`labeler_protocol`]: the report labeler against a reference label file in the CheXpert CSV format, scored by the
  shipped `labeler_agreement` evaluate module, with bootstrap CIs of the micro F1s over the reports.
"""

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import evaluate
import numpy as np
import pandas as pd
import torch
import yaml
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader

from .evaluation import load_images
from .linear_probe import extract_features
from .labeler import CHEXPERT_CLASSES
from .metrics import (
    CHEXPERT_LABEL_VALUES,
    bootstrap_ci,
    classification_intervals,
    evaluate_module_path,
    label_relevance,
    retrieval_intervals,
)
from .retrieval import EmbeddingIndex
from .zero_shot import ZeroShotClassifier

RETRIEVAL_KS = (1, 5, 10, 50)


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively: a CUDA GPU that says so, or a CPU with AVX512-BF16 or AMX (elsewhere,
    e.g. AVX2-only CPUs, bf16 autocast is emulated and slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(bf16: Literal["auto", "yes", "no"], device: torch.device) -> torch.dtype | None:
    """`torch.bfloat16` for `bf16="yes"`, or for `"auto"` where [`bf16_supported`]; `None` (fp32) otherwise."""
    if bf16 not in ("auto", "yes", "no"):
        raise ValueError(f"`bf16` must be 'auto', 'yes' or 'no', got {bf16!r}")
    if bf16 == "yes" or (bf16 == "auto" and bf16_supported(device)):
        return torch.bfloat16
    return None


def fold_batch_norms(model: torch.nn.Module) -> int:
    """Folds every BatchNorm into the convolution before it, in place, for inference: transformers' ResNet layers
    (a `convolution` then a `normalization`, as in its embedder, bottlenecks and shortcuts) become one convolution
    with a bias and an identity. In fp32 the outputs are unchanged up to rounding; the network runs one pass less
    over each activation, which memory-bound CPUs feel (see `benchmarks/bench_zero_shot.py`).

    The model must be in eval mode and is for inference from then on (the folded statistics no longer update).
    Returns the number of folded pairs (0 for towers without BatchNorm, such as Swin or ViT).
    """
    if model.training:
        raise ValueError("fold_batch_norms folds the running statistics of an eval-mode model: call model.eval()")
    folded = 0
    for module in model.modules():
        convolution, normalization = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(convolution, torch.nn.Conv2d) and isinstance(normalization, torch.nn.BatchNorm2d):
            module.convolution = fuse_conv_bn_eval(convolution, normalization)
            module.normalization = torch.nn.Identity()
            folded += 1
    return folded


class _Preprocess:
    """DataLoader collate function: decodes a batch of images and runs the image processor (in the worker)."""

    def __init__(self, processor):
        self.image_processor = getattr(processor, "image_processor", processor)

    def __call__(self, images: list) -> dict:
        return self.image_processor(images=list(load_images(images, self.image_processor)), return_tensors="pt")


def image_loader(processor, images: Sequence, batch_size: int = 32, num_workers: int = 2) -> DataLoader:
    """Batches of `{"pixel_values"}` of `images` (paths, `{"path", "bytes"}` dicts or PIL images), in order, decoded
    in `num_workers` worker processes (0: in the calling process)."""
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    return DataLoader(
        list(images), batch_size=batch_size, num_workers=num_workers, collate_fn=_Preprocess(processor),
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )


def embed_images_in_workers(
    model, processor, images: Sequence, batch_size: int = 32, num_workers: int = 2,
    autocast: torch.dtype | None = None, channels_last: bool = False,
) -> torch.Tensor:
    """`(N, projection_dim)` L2-normalised image embeddings, images decoded in DataLoader workers (`channels_last`:
    see [`extract_features`])."""
    loader = image_loader(processor, images, batch_size, num_workers)
    return torch.from_numpy(extract_features(model, loader, "projection", autocast, channels_last))


def read_prompt_file(path: str | os.PathLike) -> dict:
    """The `{class: prompts}` mapping of a JSON or YAML prompt file, unchecked."""
    path = Path(path)
    text = path.read_text()
    prompts = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(prompts, dict):
        raise ValueError(f"prompt file {path} must map class names to prompts, got {type(prompts).__name__}")
    return prompts


def load_prompt_file(path: str | os.PathLike, class_names: Sequence[str], mode: str = "multiclass") -> dict:
    """A user's prompt set from JSON or YAML: `{class: [prompt, ...]}` (multi-class) or
    `{class: {"positive": [...], "negative": [...]}}` (multi-label), with exactly the task's classes, in their order."""
    prompts = read_prompt_file(path)
    if sorted(prompts) != sorted(class_names):
        raise ValueError(f"prompt file {path} has classes {sorted(prompts)}, the task has {sorted(class_names)}")
    for name, value in prompts.items():
        expected_dict = mode == "multilabel"
        if expected_dict != isinstance(value, dict):
            shape = "{positive: [...], negative: [...]}" if expected_dict else "a list of prompts"
            raise ValueError(f"prompt file {path}: class {name!r} must have {shape} for a {mode} task")
    return {name: prompts[name] for name in class_names}


@functools.lru_cache(maxsize=None)
def _evaluate_module(name: str, config_name: str | None = None):
    return evaluate.load(evaluate_module_path(name), config_name)


def _labels_array(labels) -> np.ndarray:
    return np.asarray(labels, dtype=np.float32 if np.asarray(labels).ndim == 2 else np.int64)


@torch.no_grad()
def zero_shot_protocol(
    model, processor, image_embeddings: torch.Tensor, labels, class_names: Sequence[str], class_prompts: dict,
    *, groups=None, ensemble: str = "mean_embedding", n_resamples: int = 1000, seed: int = 0,
) -> dict:
    """Zero-shot classification of embedded images.

    Returns:
        `{"metrics": the classification module's output, "intervals": {metric: ConfidenceInterval}, "scores":
        (N, C) class probabilities}`; multi-label labels (`(N, C)` rows) score each class against its negated
        prompts.
    """
    if list(class_prompts) != list(class_names):
        raise ValueError(f"prompt classes {list(class_prompts)} differ from the task's {list(class_names)}")
    labels = _labels_array(labels)
    mode = "multilabel" if labels.ndim == 2 else "multiclass"
    classifier = ZeroShotClassifier(model, processor, class_prompts, ensemble=ensemble, mode=mode)
    scores = classifier.classify_embeddings(image_embeddings).probs.float().cpu().numpy()
    metrics = _evaluate_module("classification", mode).compute(
        prediction_scores=scores.tolist(), references=labels.astype(np.int32).tolist(), class_names=list(class_names)
    )
    intervals = classification_intervals(scores, labels, class_names, groups=groups, n_resamples=n_resamples, seed=seed)
    return {"metrics": metrics, "intervals": intervals, "scores": scores}


def class_rows(labels, num_classes: int) -> np.ndarray:
    """`(N, C)` 0/1 rows of class ids `(N,)` (multi-hot rows pass through)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return (labels > 0.5).astype(np.int32)
    return (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.int32)


def _ranking_without_self(embeddings: torch.Tensor, k: int) -> np.ndarray:
    """`(N, k)` image->image ranking of a gallery of the queries themselves, each query's own item removed."""
    index = EmbeddingIndex(embeddings, ids=[str(i) for i in range(len(embeddings))])
    _, indices = index.search(embeddings, min(k + 1, len(embeddings)))
    indices = indices.cpu().numpy()
    keep = indices != np.arange(len(indices))[:, None]
    keep[keep.all(axis=1), -1] = False  # self not retrieved (ties with a duplicate): drop the last instead
    return indices[keep].reshape(len(indices), indices.shape[1] - 1)


def _score_ranking(
    indices: np.ndarray, query_rows, gallery_rows, groups, ks, n_resamples: int, seed: int, exclude_self: bool = False
) -> dict | None:
    """Metrics and intervals of one direction; `None` when no query has a relevant gallery item."""
    relevant = label_relevance(query_rows, gallery_rows)
    if exclude_self:
        np.fill_diagonal(relevant, False)
    if not relevant.any():
        return None
    usable = [k for k in ks if k <= indices.shape[1]]
    metrics = _evaluate_module("retrieval", "multilabel").compute(
        predictions=indices.tolist(), references=query_rows.tolist(), gallery_labels=gallery_rows.tolist(), ks=usable,
        exclude_self=exclude_self,
    )
    intervals = retrieval_intervals(indices, relevant, usable, groups=groups, n_resamples=n_resamples, seed=seed)
    return {"metrics": metrics, "intervals": intervals, "indices": indices}


@torch.no_grad()
def retrieval_protocol(
    image_embeddings: torch.Tensor, labels, num_classes: int, *, text_embeddings: torch.Tensor | None = None,
    text_labels=None, groups=None, ks: Sequence[int] = RETRIEVAL_KS, n_resamples: int = 1000, seed: int = 0,
) -> dict:
    """Label-agreement retrieval in the directions the data allows.

    Args:
        image_embeddings: `(N, D)` L2-normalised image embeddings.
        labels: the images' `(N,)` class ids or `(N, C)` 0/1 rows.
        num_classes: `C`.
        text_embeddings, text_labels: an optional `(M, D)` text gallery and its `(M, C)` 0/1 rows over the same
            classes (a text relevant to none of the classes never counts as relevant, and is no text query); with
            it, image->text and text->image are scored too.
        groups: `(N,)` patient ids of the images: image queries are resampled by patient.
        ks, n_resamples, seed: cut-offs and bootstrap settings.

    Returns:
        `{"image_to_image": {...}, "image_to_text": {...}, "text_to_image": {...}}`, each `{"metrics", "intervals",
        "indices"}` (the rankings, best first); a direction in which no query has a relevant item is left out.
    """
    image_rows = class_rows(labels, num_classes)
    results = {}
    if len(image_embeddings) > 1:
        indices = _ranking_without_self(image_embeddings, max(ks))
        results["image_to_image"] = _score_ranking(
            indices, image_rows, image_rows, groups, ks, n_resamples, seed, exclude_self=True
        )
    if text_embeddings is not None:
        text_rows = class_rows(text_labels, num_classes)
        if len(text_rows) != len(text_embeddings):
            raise ValueError(f"{len(text_embeddings)} text embeddings but {len(text_rows)} text labels")
        texts = EmbeddingIndex(text_embeddings, ids=[str(i) for i in range(len(text_embeddings))])
        _, indices = texts.search(image_embeddings, min(max(ks), len(texts)))
        results["image_to_text"] = _score_ranking(
            indices.cpu().numpy(), image_rows, text_rows, groups, ks, n_resamples, seed
        )
        # text queries: the texts relevant to at least one class
        queries = np.flatnonzero(text_rows.any(axis=1))
        images = EmbeddingIndex(image_embeddings, ids=[str(i) for i in range(len(image_embeddings))])
        _, indices = images.search(text_embeddings[queries], min(max(ks), len(images)))
        results["text_to_image"] = _score_ranking(
            indices.cpu().numpy(), text_rows[queries], image_rows, None, ks, n_resamples, seed
        )
    return {direction: scored for direction, scored in results.items() if scored is not None}


def _micro_f1(reference: np.ndarray, predicted: np.ndarray, value: float) -> float:
    """Micro F1 `2 TP / (2 TP + FP + FN)` of cells equal to `value` (nan: blank), over all rows and columns."""
    said_by_reference, said_by_labeler = reference == value, predicted == value
    true_positives = (said_by_reference & said_by_labeler).sum()
    errors = (said_by_reference ^ said_by_labeler).sum()
    return float("nan") if true_positives + errors == 0 else float(2 * true_positives / (2 * true_positives + errors))


def labeler_protocol(
    labeler, reference_csv: str | os.PathLike, *, text_column: str = "Reports", micro_classes: Sequence[str] | None = None,
    min_chars: int = 4, n_resamples: int = 1000, seed: int = 0,
) -> dict:
    """Agreement of `labeler` (a [`CheXpertLabeler`]) with a reference label file in the CheXpert CSV format.

    The reference's rows are reports (or sentences) in `text_column` and one column per CheXpert class (1.0, 0.0,
    -1.0, blank). As the CheXpert labeler's own scoring does, texts shorter than `min_chars` are dropped, duplicate
    texts are scored once, and the micro average pools the findings (`micro_classes`, default every class of the
    file but `No Finding`).

    Returns:
        `{"metrics": the labeler_agreement module's output, "intervals": {"micro_f1/<value>": ConfidenceInterval}
        (bootstrap over the texts), "num_texts": N}`.
    """
    table = pd.read_csv(reference_csv)
    if text_column not in table.columns:
        raise ValueError(f"reference file {reference_csv} has no text column {text_column!r}: {list(table.columns)}")
    class_names = [name for name in CHEXPERT_CLASSES if name in table.columns]
    if not class_names:
        raise ValueError(f"reference file {reference_csv} has none of the CheXpert columns {list(CHEXPERT_CLASSES)}")
    table = table[table[text_column].fillna("").str.strip().str.len() >= min_chars]
    table = table.drop_duplicates(subset=text_column)
    reference = table[class_names].to_numpy(dtype=np.float64)
    predicted = np.array(
        [[np.nan if (v := labeler.label_report(text).get(name)) is None else v for name in class_names]
         for text in table[text_column]],
        dtype=np.float64,
    )  # fmt: skip
    pooled = list(micro_classes or [name for name in class_names if name != "No Finding"])
    metrics = _evaluate_module("labeler_agreement").compute(
        predictions=[[None if np.isnan(v) else v for v in row] for row in predicted],
        references=[[None if np.isnan(v) else v for v in row] for row in reference],
        class_names=class_names, micro_classes=pooled,
    )  # fmt: skip
    columns = [class_names.index(name) for name in pooled]
    intervals = {
        f"micro_f1/{value_name}": bootstrap_ci(
            lambda ref, pred, value=value: _micro_f1(ref[:, columns], pred[:, columns], value), reference, predicted,
            n_resamples=n_resamples, seed=seed,
        )
        for value_name, value in CHEXPERT_LABEL_VALUES.items()
    }
    return {"metrics": metrics, "intervals": intervals, "num_texts": len(table)}


__all__ = [
    "RETRIEVAL_KS",
    "autocast_dtype",
    "bf16_supported",
    "class_rows",
    "embed_images_in_workers",
    "fold_batch_norms",
    "image_loader",
    "labeler_protocol",
    "load_prompt_file",
    "read_prompt_file",
    "retrieval_protocol",
    "zero_shot_protocol",
]
