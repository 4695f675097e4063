"""Retrieval and zero-shot classification metrics.

Retrieval metrics take a ranking `indices` of shape `(num_queries, k)` (gallery indices, best first, e.g. from
[`EmbeddingIndex.search`]) and a boolean relevance matrix `relevant` of shape `(num_queries, gallery_size)`. Two
relevance protocols build that matrix:

- [`label_relevance`] (ConVIRT): a retrieved item is relevant when it shares the query's class.
- [`pair_relevance`]: a retrieved item is relevant when it is the query's own pair (several images may share one
  report, so a query may have several relevant items).

[`zero_shot_metrics`] scores class probabilities against labels (accuracy and macro ROC AUC, via scikit-learn).

[`bootstrap_ci`] puts a percentile bootstrap confidence interval on any of them, resampling whole groups (e.g.
patients) when the samples are not independent.
"""

import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().float().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def label_relevance(query_labels, gallery_labels) -> np.ndarray:
    """`(Q, N)` relevance by label agreement.

    Args:
        query_labels: `(Q,)` class ids / names, or `(Q, C)` multi-hot label vectors.
        gallery_labels: `(N,)` or `(N, C)`, like `query_labels`.

    Returns:
        `relevant[q, n]`: single labels: the two labels are equal; multi-hot labels: they share a positive class.
    """
    query, gallery = _as_numpy(query_labels), _as_numpy(gallery_labels)
    if query.ndim != gallery.ndim or query.ndim not in (1, 2):
        raise ValueError(
            f"`query_labels` {query.shape} and `gallery_labels` {gallery.shape} must both be 1-D class labels or "
            "both 2-D multi-hot vectors"
        )
    if query.ndim == 1:
        return query[:, None] == gallery[None, :]
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"multi-hot labels disagree on the number of classes: {query.shape} vs {gallery.shape}")
    return (query > 0).astype(np.int64) @ (gallery > 0).astype(np.int64).T > 0


def pair_relevance(query_pair_ids: Sequence, gallery_pair_ids: Sequence[Hashable]) -> np.ndarray:
    """`(Q, N)` relevance of exact-pair retrieval.

    Args:
        query_pair_ids: per query, its pair id, or a collection (`set`, `list`, `tuple`) of the pair ids that count
            as correct (an image whose study has two reports).
        gallery_pair_ids: the pair id of every gallery item; several items may share one id (several images of
            one report).

    Returns:
        `relevant[q, n]`: gallery item `n`'s pair id is (one of) query `q`'s.
    """
    query_sets = [
        set(ids) if isinstance(ids, Iterable) and not isinstance(ids, (str, bytes)) else {ids}
        for ids in query_pair_ids
    ]
    gallery = list(gallery_pair_ids)
    return np.array([[item in ids for item in gallery] for ids in query_sets], dtype=bool).reshape(
        len(query_sets), len(gallery)
    )


def _hits(indices, relevant) -> tuple[np.ndarray, np.ndarray]:
    """`(Q, k)` boolean hits of a ranking and `(Q,)` number of relevant gallery items per query."""
    indices, relevant = _as_numpy(indices), _as_numpy(relevant).astype(bool)
    if indices.ndim != 2 or relevant.ndim != 2 or indices.shape[0] != relevant.shape[0]:
        raise ValueError(
            f"`indices` must be (Q, k) and `relevant` (Q, N) with the same Q, got {indices.shape} and "
            f"{relevant.shape}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= relevant.shape[1]):
        raise ValueError(f"`indices` must lie in [0, {relevant.shape[1]}), the gallery size of `relevant`")
    return np.take_along_axis(relevant, indices.astype(np.int64), axis=1), relevant.sum(axis=1)


def _check_k(k: int, indices) -> None:
    if not 1 <= k <= _as_numpy(indices).shape[1]:
        raise ValueError(f"`k` must be in [1, {_as_numpy(indices).shape[1]}] (the ranking's length), got {k}")


def precision_at_k(indices, relevant, k: int) -> float:
    """Mean over queries of (relevant items among the top `k`) / `k`."""
    _check_k(k, indices)
    hits, _ = _hits(indices, relevant)
    return float(hits[:, :k].sum(axis=1).mean() / k)


def recall_at_k(indices, relevant, k: int) -> float:
    """Mean over queries with at least one relevant item of (relevant items among the top `k`) / (relevant items).

    For exact-pair retrieval with one relevant item per query this is the usual `R@k` (hit rate).
    """
    _check_k(k, indices)
    hits, num_relevant = _hits(indices, relevant)
    has_relevant = num_relevant > 0
    if not has_relevant.any():
        raise ValueError("no query has a relevant gallery item: recall is undefined")
    return float((hits[has_relevant, :k].sum(axis=1) / num_relevant[has_relevant]).mean())


def mean_reciprocal_rank(indices, relevant) -> float:
    """Mean over queries of `1 / rank` of the first relevant item in the ranking (0 when none is retrieved).

    With a full ranking (`k = N`) this is the MRR; with a truncated ranking it is MRR@k.
    """
    hits, _ = _hits(indices, relevant)
    first = hits.argmax(axis=1)
    reciprocal = np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)
    return float(reciprocal.mean())


def retrieval_metrics(indices, relevant, ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
    """`{"precision@k": ..., "recall@k": ..., "mrr": ...}` for every `k` in `ks` no longer than the ranking."""
    length = _as_numpy(indices).shape[1]
    results = {}
    for k in ks:
        if k <= length:
            results[f"precision@{k}"] = precision_at_k(indices, relevant, k)
            results[f"recall@{k}"] = recall_at_k(indices, relevant, k)
    results["mrr"] = mean_reciprocal_rank(indices, relevant)
    return results


def zero_shot_metrics(probs, labels, class_names: Sequence[str] | None = None) -> dict:
    """Accuracy and macro ROC AUC of class probabilities.

    Args:
        probs: `(N, C)` probabilities (or any scores).
        labels: `(N,)` integer class ids (multi-class) or `(N, C)` 0/1 matrix (multi-label).
        class_names: names of the `C` classes for `per_class_auc` (default `"0"`, `"1"`, ...).

    Returns:
        `accuracy`: multi-class: fraction of argmax predictions equal to the label; multi-label: fraction of
        correct `probs >= 0.5` decisions over all entries. `macro_auc`: mean one-vs-rest ROC AUC over the classes
        that have both positives and negatives (`nan` when none has). `per_class_auc`: `{class: auc or nan}`.
    """
    probs, labels = _as_numpy(probs).astype(np.float64), _as_numpy(labels)
    if probs.ndim != 2:
        raise ValueError(f"`probs` must have shape (N, C), got {probs.shape}")
    num_samples, num_classes = probs.shape
    if labels.ndim == 1:
        if labels.shape[0] != num_samples:
            raise ValueError(f"`labels` must have shape ({num_samples},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"`labels` must be class ids in [0, {num_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]")
        accuracy = float((probs.argmax(axis=1) == labels).mean())
        targets = labels[:, None] == np.arange(num_classes)[None, :]
    elif labels.shape == probs.shape:
        targets = labels > 0.5
        accuracy = float(((probs >= 0.5) == targets).mean())
    else:
        raise ValueError(f"`labels` must have shape ({num_samples},) or {probs.shape}, got {labels.shape}")
    names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
    if len(names) != num_classes:
        raise ValueError(f"`class_names` has {len(names)} names for {num_classes} classes")
    per_class = {}
    for column, name in enumerate(names):
        positives = targets[:, column]
        per_class[name] = (
            float(roc_auc_score(positives, probs[:, column])) if 0 < positives.sum() < num_samples else float("nan")
        )
    valid = [auc for auc in per_class.values() if not np.isnan(auc)]
    return {
        "accuracy": accuracy,
        "macro_auc": float(np.mean(valid)) if valid else float("nan"),
        "per_class_auc": per_class,
    }


@dataclass(frozen=True)
class ConfidenceInterval:
    """A metric's value on the full data and its percentile bootstrap interval.

    Attributes:
        value: the metric on the full (not resampled) data.
        low, high: the `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of the resampled metric.
        confidence: the interval's nominal coverage, e.g. `0.95`.
        n_resamples: resamples on which the metric was defined (those the interval is computed from).
        n_skipped: resamples skipped because the metric was undefined on them (e.g. one class only for ROC AUC).
    """

    value: float
    low: float
    high: float
    confidence: float = 0.95
    n_resamples: int = 0
    n_skipped: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _group_members(groups, num_samples: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample indices sorted by group, and each group's start offset and size in that order."""
    groups = _as_numpy(groups)
    if groups.shape[:1] != (num_samples,):
        raise ValueError(f"`groups` must have one id per sample ({num_samples},), got shape {groups.shape}")
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    starts = np.cumsum(counts) - counts
    return order, starts, counts


def _resample_indices(rng: np.random.Generator, order, starts, counts) -> np.ndarray:
    """Indices of one bootstrap resample: as many groups as there are, drawn with replacement, each whole."""
    chosen = rng.integers(0, len(counts), size=len(counts))
    lengths = counts[chosen]
    offsets_within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return order[np.repeat(starts[chosen], lengths) + offsets_within]


def _defined_value(metric: Callable[..., float], arrays: Sequence[np.ndarray]) -> float | None:
    """`metric(*arrays)` as a float, or `None` where it is undefined (raises `ValueError` or returns nan)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            value = float(metric(*arrays))
        except ValueError:
            return None
    return None if math.isnan(value) else value


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays,
    groups=None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap confidence interval of `metric(*arrays)`.

    Every resample draws samples (or, with `groups`, whole groups such as patients, so that all images of a
    patient stay together) with replacement, as many as there are, and indexes every array along its first axis
    the same way. Resamples on which the metric is undefined (it raises `ValueError` or returns nan, as ROC AUC
    does when a resample holds one class only) are skipped and counted in `n_skipped`.

    Args:
        metric: `metric(*resampled_arrays) -> float`, e.g. `lambda y, p: roc_auc_score(y, p)`.
        *arrays: arrays (numpy, torch or sequences) with the same first dimension `N`, e.g. labels and scores.
        groups: optional `(N,)` group id per sample (patient ids); resampling then draws whole groups.
        n_resamples: number of bootstrap resamples drawn.
        confidence: nominal coverage of the interval, in `(0, 1)`.
        seed: seed of the resampling, so that an interval repeats exactly.

    Returns:
        [`ConfidenceInterval`] with the metric on the full data and the interval's bounds.

    Raises:
        ValueError: no arrays, arrays of different lengths, a bad `confidence` / `n_resamples`, a metric undefined
            on the full data, or fewer than half of the resamples on which the metric is defined (the interval
            would then describe a biased minority of them).
    """
    if not arrays:
        raise ValueError("`bootstrap_ci` needs at least one array to resample")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be at least 1, got {n_resamples}")
    arrays = [_as_numpy(array) for array in arrays]
    num_samples = len(arrays[0])
    if num_samples == 0 or any(len(array) != num_samples for array in arrays):
        raise ValueError(f"`arrays` must be non-empty with one common length, got lengths {[len(a) for a in arrays]}")
    value = _defined_value(metric, arrays)
    if value is None:
        raise ValueError("the metric is undefined on the full data (it raised ValueError or returned nan)")
    if groups is None:
        order, starts, counts = np.arange(num_samples), np.arange(num_samples), np.ones(num_samples, dtype=np.int64)
    else:
        order, starts, counts = _group_members(groups, num_samples)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        indices = _resample_indices(rng, order, starts, counts)
        resampled = _defined_value(metric, [array[indices] for array in arrays])
        if resampled is not None:
            values.append(resampled)
    skipped = n_resamples - len(values)
    if len(values) < n_resamples / 2:
        raise ValueError(
            f"the metric is undefined on {skipped} of {n_resamples} bootstrap resamples (e.g. a class with too few "
            f"{'groups' if groups is not None else 'samples'}): too few remain for a confidence interval"
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return ConfidenceInterval(
        value=value, low=float(low), high=float(high), confidence=confidence, n_resamples=len(values),
        n_skipped=skipped,
    )


__all__ = [
    "ConfidenceInterval",
    "bootstrap_ci",
    "label_relevance",
    "mean_reciprocal_rank",
    "pair_relevance",
    "precision_at_k",
    "recall_at_k",
    "retrieval_metrics",
    "zero_shot_metrics",
]
