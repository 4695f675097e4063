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

The same metrics ship as `evaluate` modules inside the package (`modeling_medclip/evaluate_metrics/<name>/`):
`evaluate.load(evaluate_module_path(name))` loads them offline, for `name` in [`EVALUATE_MODULES`].
"""

import math
import warnings
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, precision_recall_fscore_support, roc_auc_score

EVALUATE_MODULES = ("classification", "retrieval", "labeler_agreement")
_EVALUATE_MODULES_DIR = Path(__file__).resolve().parent / "evaluate_metrics"


def evaluate_module_path(name: str) -> str:
    """Path of the shipped `evaluate` module `name` (one of [`EVALUATE_MODULES`]), for `evaluate.load`."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown evaluate module {name!r}; the package ships {list(EVALUATE_MODULES)}")
    return str(_EVALUATE_MODULES_DIR / name / f"{name}.py")


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


def _classification_targets(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(N, C)` boolean targets of class ids `(N,)` or of a 0/1 label matrix `(N, C)`, checked against `scores`."""
    if scores.ndim != 2:
        raise ValueError(f"`scores` must have shape (N, C), got {scores.shape}")
    num_samples, num_classes = scores.shape
    if labels.ndim == 1:
        if labels.shape[0] != num_samples:
            raise ValueError(f"`labels` must have shape ({num_samples},), got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"`labels` must be class ids in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
            )
        return labels[:, None] == np.arange(num_classes)[None, :]
    if labels.shape == scores.shape:
        return labels > 0.5
    raise ValueError(f"`labels` must have shape ({num_samples},) or {scores.shape}, got {labels.shape}")


def _decisions(scores: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Multi-class: one-hot argmax; multi-label: `scores >= threshold`, as an `(N, C)` boolean matrix."""
    if labels.ndim == 1:
        return scores.argmax(axis=1)[:, None] == np.arange(scores.shape[1])[None, :]
    return scores >= threshold


def auc_classes(scores, labels) -> list[int]:
    """The classes (columns of `scores`) with both positives and negatives among `labels`: those with an AUC."""
    scores, labels = _as_numpy(scores), _as_numpy(labels)
    targets = _classification_targets(scores, labels)
    return [column for column in range(scores.shape[1]) if 0 < targets[:, column].sum() < len(targets)]


def roc_auc_columns(scores, labels) -> np.ndarray:
    """`(C,)` one-vs-rest ROC AUC of every class, `nan` for a class without positives or negatives.

    Equal to scikit-learn's `roc_auc_score` per column (ties count one half), computed for all columns at once as the
    Mann-Whitney statistic of the ranks (`scipy.stats.rankdata`): about 20x faster, which is what lets a bootstrap
    resample thousands of times.
    """
    scores, labels = _as_numpy(scores).astype(np.float64), _as_numpy(labels)
    targets = _classification_targets(scores, labels)
    ranks = rankdata(scores, axis=0)
    positives = targets.sum(axis=0)
    negatives = len(targets) - positives
    rank_sums = (ranks * targets).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        aucs = (rank_sums - positives * (positives + 1) / 2) / (positives * negatives)
    return np.where((positives > 0) & (negatives > 0), aucs, np.nan)


def macro_auc(scores, labels, columns: Sequence[int] | None = None) -> float:
    """Mean one-vs-rest ROC AUC over `columns` (default: every class), `nan` where one of them lacks positives or
    negatives (so that a bootstrap resample missing a class is skipped rather than averaged over fewer classes)."""
    aucs = roc_auc_columns(scores, labels)
    return float(np.mean(aucs if columns is None else aucs[list(columns)]))


def accuracy(scores, labels, threshold: float = 0.5) -> float:
    """Multi-class: fraction of argmax predictions equal to the label; multi-label: fraction of correct
    `scores >= threshold` decisions over all `N x C` entries (scikit-learn's `1 - hamming_loss`)."""
    scores, labels = _as_numpy(scores).astype(np.float64), _as_numpy(labels)
    targets = _classification_targets(scores, labels)
    decisions = _decisions(scores, labels, threshold)
    if labels.ndim == 1:
        return float((decisions == targets).all(axis=1).mean())
    return float((decisions == targets).mean())


def macro_f1(scores, labels, threshold: float = 0.5) -> float:
    """Unweighted mean over the classes of the F1 `2 TP / (2 TP + FP + FN)` of the decisions (argmax, or
    `scores >= threshold` when multi-label); a class never predicted nor present counts as 0. Equal to
    scikit-learn's `f1_score(average="macro", zero_division=0)`, counted with numpy for the bootstrap's speed."""
    scores, labels = _as_numpy(scores).astype(np.float64), _as_numpy(labels)
    targets = _classification_targets(scores, labels)
    decisions = _decisions(scores, labels, threshold)
    true_positives = (decisions & targets).sum(axis=0)
    errors = (decisions ^ targets).sum(axis=0)
    denominators = 2 * true_positives + errors
    f1 = np.divide(2 * true_positives, denominators, out=np.zeros(len(denominators)), where=denominators > 0)
    return float(f1.mean())


def classification_metrics(
    scores, labels, class_names: Sequence[str] | None = None, threshold: float = 0.5
) -> dict:
    """Accuracy, macro-F1 and per-class / macro ROC AUC of class scores (zero-shot, linear probe, fine-tune).

    Args:
        scores: `(N, C)` class probabilities (or any scores; `threshold` applies to multi-label scores only).
        labels: `(N,)` integer class ids (multi-class) or `(N, C)` 0/1 matrix (multi-label).
        class_names: names of the `C` classes for `per_class_auc` (default `"0"`, `"1"`, ...).
        threshold: multi-label decision threshold for accuracy and F1.

    Returns:
        `accuracy` and `macro_f1`, computed by scikit-learn (the same values as [`accuracy`] and [`macro_f1`], the fast
        versions a bootstrap resamples); `per_class_auc`: `{class: one-vs-rest AUC}`,
        `nan` for a class without positives or without negatives; `macro_auc`: the mean over the classes whose AUC is
        defined (`nan` when none is).
    """
    scores, labels = _as_numpy(scores).astype(np.float64), _as_numpy(labels)
    targets = _classification_targets(scores, labels)
    names = [str(i) for i in range(scores.shape[1])] if class_names is None else list(class_names)
    if len(names) != scores.shape[1]:
        raise ValueError(f"`class_names` has {len(names)} names for {scores.shape[1]} classes")
    defined = auc_classes(scores, labels)
    per_class = {
        name: float(roc_auc_score(targets[:, column], scores[:, column])) if column in defined else float("nan")
        for column, name in enumerate(names)
    }
    decisions = _decisions(scores, labels, threshold)
    valid = [auc for auc in per_class.values() if not np.isnan(auc)]
    return {
        "accuracy": float(accuracy_score(labels, decisions.argmax(axis=1)) if labels.ndim == 1
                          else 1.0 - hamming_loss(targets, decisions)),
        "macro_f1": float(f1_score(targets, decisions, average="macro", zero_division=0)),
        "macro_auc": float(np.mean(valid)) if valid else float("nan"),
        "per_class_auc": per_class,
    }


def zero_shot_metrics(probs, labels, class_names: Sequence[str] | None = None) -> dict:
    """[`classification_metrics`] of zero-shot class probabilities (multi-label threshold 0.5)."""
    return classification_metrics(probs, labels, class_names)


# The CheXpert labeler's CSV convention: 1.0 positive, 0.0 negative, -1.0 uncertain, blank (nan) not mentioned.
CHEXPERT_LABEL_VALUES = {"positive": 1.0, "negative": 0.0, "uncertain": -1.0}


def _label_matrix(values, name: str) -> np.ndarray:
    matrix = np.array(_as_numpy(values), dtype=np.float64)  # None (a blank cell) becomes nan
    if matrix.ndim != 2:
        raise ValueError(f"`{name}` must be an (N, C) matrix of CheXpert labels, got shape {matrix.shape}")
    unknown = ~np.isnan(matrix) & ~np.isin(matrix, list(CHEXPERT_LABEL_VALUES.values()))
    if unknown.any():
        raise ValueError(
            f"`{name}` holds values other than 1.0 / 0.0 / -1.0 / blank, e.g. {matrix[unknown][0]!r}"
        )
    return matrix


def _precision_recall_f1(reference: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        reference.reshape(-1), predicted.reshape(-1), average="binary", zero_division=np.nan
    )
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1), "support": int(reference.sum())}


def labeler_agreement(
    predicted, reference, class_names: Sequence[str] | None = None, micro_classes: Sequence[str] | None = None
) -> dict:
    """Agreement of a labeler's report labels with reference labels, both in the CheXpert CSV convention.

    For each value v (positive 1.0, negative 0.0, uncertain -1.0) a cell is a true positive when both the labeler
    and the reference say v, a false positive when only the labeler does and a false negative when only the
    reference does (a blank, not mentioned, is never v).

    Args:
        predicted: `(N, C)` labeler output; blank cells as `nan` or `None`.
        reference: `(N, C)` reference labels, same layout.
        class_names: the `C` column names (default `"0"`, `"1"`, ...).
        micro_classes: the columns pooled by the micro average (default all; the CheXpert convention leaves
            `No Finding` out).

    Returns:
        `{"per_class": {class: {value: {precision, recall, f1, support}}}, "micro": {value: {...}}}`; `support` is
        the number of reference cells equal to v; precision is `nan` where the labeler never says v, recall where the
        reference never does, F1 where neither does.
    """
    predicted, reference = _label_matrix(predicted, "predicted"), _label_matrix(reference, "reference")
    if predicted.shape != reference.shape:
        raise ValueError(f"`predicted` {predicted.shape} and `reference` {reference.shape} differ in shape")
    names = [str(i) for i in range(reference.shape[1])] if class_names is None else list(class_names)
    if len(names) != reference.shape[1]:
        raise ValueError(f"`class_names` has {len(names)} names for {reference.shape[1]} columns")
    pooled = names if micro_classes is None else list(micro_classes)
    missing = sorted(set(pooled) - set(names))
    if missing:
        raise ValueError(f"`micro_classes` names columns that do not exist: {missing}")
    pooled_columns = [names.index(name) for name in pooled]
    results = {"per_class": {name: {} for name in names}, "micro": {}}
    for value_name, value in CHEXPERT_LABEL_VALUES.items():
        said_by_reference, said_by_labeler = reference == value, predicted == value
        for column, name in enumerate(names):
            results["per_class"][name][value_name] = _precision_recall_f1(
                said_by_reference[:, column], said_by_labeler[:, column]
            )
        results["micro"][value_name] = _precision_recall_f1(
            said_by_reference[:, pooled_columns], said_by_labeler[:, pooled_columns]
        )
    return results


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
    "accuracy",
    "auc_classes",
    "bootstrap_ci",
    "classification_metrics",
    "evaluate_module_path",
    "CHEXPERT_LABEL_VALUES",
    "label_relevance",
    "labeler_agreement",
    "macro_auc",
    "macro_f1",
    "mean_reciprocal_rank",
    "pair_relevance",
    "precision_at_k",
    "recall_at_k",
    "retrieval_metrics",
    "roc_auc_columns",
    "zero_shot_metrics",
]
