"""Linear probe: logistic regression on frozen image features, with a fraction of the training labels.

ConVIRT's data-efficiency protocol. The image tower is frozen; [`extract_features`] embeds the images once, as

- `"pooled"` (default, ConVIRT's protocol): the vision tower's pooled output, before the projection head
  (2048-d for a ResNet-50);
- `"projection"`: the L2-normalised projected image embedding, the space zero-shot classification works in.

[`run_linear_probe`] then, for every label fraction (1%, 10%, 100% by default) and every seed of that fraction:

1. splits the training patients into a fit part and a validation part, patient-disjoint and seeded (`split_seed`,
   the same for every fraction and seed);
2. draws `fraction` of the fit part's images, stratified by class (multi-class) and seeded;
3. fits a scikit-learn pipeline (standardisation + logistic regression; one-vs-rest for multi-label) for every
   inverse regularisation strength `C` of a grid, keeps the `C` with the best validation macro ROC AUC (accuracy
   where that is undefined), and scores the test images.

Every test metric gets a patient-level bootstrap confidence interval ([`bootstrap_ci`]); with several seeds per
fraction the reported value is the mean over seeds, its interval the bootstrap interval of that mean (test-set
uncertainty), and the spread over seeds is reported beside it.
"""

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold, train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .metrics import ConfidenceInterval, accuracy, classification_intervals, classification_metrics
from .towers import match_channels, pool_vision_output

LABEL_FRACTIONS = (0.01, 0.1, 1.0)
# several seeds where few labels make one draw unrepresentative
DEFAULT_SEEDS = {0.01: 5, 0.1: 3, 1.0: 1}
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
HEADLINE_METRICS = ("macro_auc", "accuracy", "macro_f1")


@dataclass
class ProbeData:
    """Frozen features of a labelled image set.

    Args:
        features: `(N, D)` image features.
        labels: `(N,)` class ids (multi-class) or `(N, C)` 0/1 rows (multi-label).
        groups: `(N,)` patient ids (patient-disjoint validation split, patient-level bootstrap); `None` treats every
            image as its own patient.
        ids: `(N,)` image ids, written out with the splits so that a run repeats exactly.
    """

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray | None = None
    ids: Sequence[str] | None = None

    def __post_init__(self):
        self.features = np.asarray(self.features, dtype=np.float64)
        self.labels = np.asarray(self.labels)
        if self.features.ndim != 2:
            raise ValueError(f"`features` must have shape (N, D), got {self.features.shape}")
        if len(self.labels) != len(self.features):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.labels)} labels")
        if self.labels.ndim not in (1, 2):
            raise ValueError(f"`labels` must be (N,) class ids or (N, C) 0/1 rows, got shape {self.labels.shape}")
        if self.groups is None:
            self.groups = np.arange(len(self.features))
        self.groups = np.asarray(self.groups)
        if len(self.groups) != len(self.features):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.groups)} patient ids")
        if self.ids is not None and len(self.ids) != len(self.features):
            raise ValueError(f"{len(self.features)} feature rows but {len(self.ids)} image ids")

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def subset(self, indices: np.ndarray) -> "ProbeData":
        ids = None if self.ids is None else [self.ids[i] for i in indices]
        return ProbeData(self.features[indices], self.labels[indices], self.groups[indices], ids)

    def image_ids(self) -> list[str]:
        return [str(i) for i in (self.ids if self.ids is not None else range(len(self.features)))]


@dataclass
class ProbeRun:
    """One fit (linear probe or fine-tune): a label fraction, a seed, the settings chosen on the validation patients
    (e.g. `{"C": 0.1}`) and the test metrics."""

    fraction: float
    seed: int
    selected: dict
    num_train_images: int
    validation_score: float | None
    test_metrics: dict
    train_ids: list[str] = field(default_factory=list)


@dataclass
class FractionResult:
    """The test metrics of one label fraction: mean over its seeds with a patient-level bootstrap CI (the keys of
    [`classification_intervals`]: `macro_auc`, `accuracy`, `macro_f1`, `auc/<class>`), and the spread over seeds."""

    fraction: float
    metrics: dict[str, ConfidenceInterval]
    seed_std: dict[str, float]
    runs: list[ProbeRun]
    test_scores: np.ndarray  # (N_test, C) scores of the first seed, for plots

    def to_dict(self, with_ids: bool = True) -> dict:
        runs = [asdict(run) for run in self.runs]
        if not with_ids:
            runs = [{key: value for key, value in run.items() if key != "train_ids"} for run in runs]
        return {
            "fraction": self.fraction,
            "metrics": {name: ci.to_dict() for name, ci in self.metrics.items()},
            "seed_std": self.seed_std,
            "runs": runs,
        }


@torch.no_grad()
def image_features(model, pixel_values: torch.Tensor, kind: Literal["pooled", "projection"] = "pooled"):
    """`(B, D)` frozen features of a batch of images (see the module docstring for the two kinds)."""
    if kind == "projection":
        return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    if kind == "pooled":
        pixel_values = match_channels(pixel_values, model.config.vision_config.num_channels)
        return pool_vision_output(model.vision_model(pixel_values=pixel_values, return_dict=True))
    raise ValueError(f"`kind` must be 'pooled' or 'projection', got {kind!r}")


def extract_features(
    model, batches: Iterable, kind: Literal["pooled", "projection"] = "pooled", autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Features of every image of `batches` (pixel value tensors, or dicts with `pixel_values`, e.g. a DataLoader
    over the collator), as one `(N, D)` float32 array. The model runs as it is (call `model.eval()` first), under
    `torch.autocast(autocast_dtype)` when one is given; with `channels_last` the images are passed channels-last
    (for a model moved to `memory_format=torch.channels_last`: oneDNN's fast convolution layout on CPUs)."""
    parameter = next(model.parameters())
    num_channels = model.config.vision_config.num_channels
    chunks = []
    for batch in batches:
        pixel_values = batch["pixel_values"] if isinstance(batch, Mapping) else batch
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
        if channels_last:
            pixel_values = match_channels(pixel_values, num_channels).contiguous(memory_format=torch.channels_last)
        with torch.autocast(parameter.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            chunks.append(image_features(model, pixel_values, kind).float().cpu())
    if not chunks:
        raise ValueError("`batches` yielded no images")
    return torch.cat(chunks).numpy()


def patient_split(labels, groups, validation_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patient-disjoint `(fit, validation)` image indices of images with `labels` (`(N,)` class ids or `(N, C)` 0/1
    rows) and patient ids `groups`, seeded; stratified by class when multi-class."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if not 0.0 < validation_size < 1.0:
        raise ValueError(f"`validation_size` must lie in (0, 1), got {validation_size}")
    num_patients = len(np.unique(groups))
    if num_patients < 2:
        raise ValueError(f"a validation split needs at least 2 patients, got {num_patients}")
    indices = np.arange(len(labels))
    if labels.ndim == 2:
        splitter = GroupShuffleSplit(n_splits=1, test_size=validation_size, random_state=seed)
        fit, validation = next(splitter.split(indices, groups=groups))
    else:
        n_splits = min(max(2, round(1.0 / validation_size)), num_patients)
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # a class with fewer patients than folds is only a warning
            warnings.simplefilter("ignore", UserWarning)
            fit, validation = next(splitter.split(indices, labels, groups=groups))
    return np.sort(fit), np.sort(validation)


def label_fraction(labels, fraction: float, seed: int) -> np.ndarray:
    """Indices of `fraction` of the images with `labels`, stratified by class (multi-class `(N,)` class ids; at least
    one image per class) and seeded; multi-label `(N, C)` rows are sampled uniformly. `fraction == 1` keeps every
    image."""
    labels = np.asarray(labels)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fractions must lie in (0, 1], got {fraction}")
    indices = np.arange(len(labels))
    if fraction == 1.0:
        return indices
    if labels.ndim == 2:
        size = max(1, round(fraction * len(indices)))
        return np.sort(np.random.default_rng(seed).choice(indices, size=size, replace=False))
    classes = np.unique(labels)
    size = max(len(classes), round(fraction * len(indices)))
    if size >= len(indices):
        return indices
    rng = np.random.default_rng(seed)
    first = np.array([rng.choice(np.flatnonzero(labels == label)) for label in classes])  # one image of every class
    rest = np.setdiff1d(indices, first)
    if size == len(first):
        return np.sort(first)
    extra = size - len(first)
    _, counts = np.unique(labels[rest], return_counts=True)
    stratify = labels[rest] if counts.min() >= 2 and extra >= len(counts) else None  # else a plain seeded draw
    more, _ = train_test_split(rest, train_size=extra, stratify=stratify, random_state=seed)
    return np.sort(np.concatenate([first, more]))


def _probe(C: float, multilabel: bool, seed: int):
    logistic = LogisticRegression(C=C, max_iter=2000, random_state=seed)
    return make_pipeline(StandardScaler(), OneVsRestClassifier(logistic) if multilabel else logistic)


def _scores(probe, features: np.ndarray, num_classes: int) -> np.ndarray:
    """`(N, num_classes)` probabilities; a class absent from a multi-class fit scores 0."""
    probs = probe.predict_proba(features)
    if probs.shape[1] == num_classes:
        return probs
    full = np.zeros((len(features), num_classes))
    full[:, probe.classes_.astype(int)] = probs
    return full


def validation_score(scores: np.ndarray, labels: np.ndarray) -> float:
    """What model selection maximises on the validation patients: macro ROC AUC (accuracy where it is undefined)."""
    score = classification_metrics(scores, labels)["macro_auc"]
    return accuracy(scores, labels) if np.isnan(score) else score


def fit_probe(
    train: ProbeData, validation: ProbeData, num_classes: int, Cs: Sequence[float] = DEFAULT_CS, seed: int = 0
):
    """The probe with the best validation score over `Cs`, refitted nowhere else: `(probe, C, validation score)`."""
    best = None
    for C in Cs:
        probe = _probe(C, train.multilabel, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # a multi-label class absent from a small fraction
            probe.fit(train.features, train.labels)
        score = validation_score(_scores(probe, validation.features, num_classes), validation.labels)
        if best is None or score > best[2]:
            best = (probe, float(C), float(score))
    return best


def summarise_fraction(
    fraction: float, runs: list[ProbeRun], seed_scores: list[np.ndarray], test_labels, test_groups,
    class_names: Sequence[str] | None, n_resamples: int, ci_seed: int,
) -> FractionResult:
    """A fraction's [`FractionResult`] from its runs and their `(N_test, C)` test scores (one array per seed)."""
    metrics = classification_intervals(
        np.stack(seed_scores, axis=1), test_labels, class_names, groups=test_groups, n_resamples=n_resamples,
        seed=ci_seed,
    )
    seed_std = {name: float(np.std([run.test_metrics[name] for run in runs])) for name in HEADLINE_METRICS}
    return FractionResult(fraction, metrics, seed_std, runs, seed_scores[0])


@dataclass
class LabelEfficiencyResult:
    """Every fraction's result, and the image ids of the fit / validation / test parts (a run repeats exactly)."""

    fractions: list[FractionResult]
    split_ids: dict[str, list[str]]

    def to_dict(self, with_ids: bool = True) -> dict:
        """JSON-ready; without the image ids (the split and every run's drawn labels) when `with_ids` is false."""
        fractions = [result.to_dict(with_ids) for result in self.fractions]
        return {"fractions": fractions, "split_ids": self.split_ids} if with_ids else {"fractions": fractions}

    def label_draws(self) -> dict[str, list[str]]:
        """`{"<fraction>/seed<seed>": image ids}` of every run's training labels."""
        return {f"{run.fraction}/seed{run.seed}": run.train_ids for result in self.fractions for run in result.runs}


def run_linear_probe(
    train: ProbeData,
    test: ProbeData,
    fractions: Sequence[float] = LABEL_FRACTIONS,
    seeds: Mapping[float, int] | None = None,
    validation_size: float = 0.2,
    split_seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    class_names: Sequence[str] | None = None,
    n_resamples: int = 1000,
    ci_seed: int = 0,
) -> LabelEfficiencyResult:
    """Linear probe at every label fraction (see the module docstring).

    Args:
        train: features of the training patients (split here into fit / validation).
        test: features of the test patients, scored with patient-level bootstrap CIs.
        fractions: label fractions of the fit part, each in `(0, 1]`.
        seeds: number of seeds per fraction (default [`DEFAULT_SEEDS`], 1 for fractions not in it); seed `s` of a
            fraction draws its labels with seed `s`.
        validation_size: fraction of the training patients held out to choose `C`.
        split_seed: seed of the fit / validation patient split.
        Cs: the inverse regularisation strengths tried.
        class_names: names of the classes, keys of the per-class AUCs.
        n_resamples, ci_seed: bootstrap resamples and seed of the confidence intervals.

    Returns:
        [`LabelEfficiencyResult`]: one [`FractionResult`] per fraction, in the order given, and the split ids.
    """
    if train.multilabel != test.multilabel:
        raise ValueError("`train` and `test` must both be multi-class or both multi-label")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"train features are {train.features.shape[1]}-d, test features {test.features.shape[1]}-d")
    num_classes = train.labels.shape[1] if train.multilabel else int(max(train.labels.max(), test.labels.max())) + 1
    seeds = {**DEFAULT_SEEDS, **(seeds or {})}
    fit_indices, validation_indices = patient_split(train.labels, train.groups, validation_size, split_seed)
    fit_part, validation = train.subset(fit_indices), train.subset(validation_indices)
    results = []
    for fraction in fractions:
        runs, seed_scores = [], []
        for seed in range(seeds.get(fraction, 1)):
            subset = fit_part.subset(label_fraction(fit_part.labels, fraction, seed))
            probe, C, validation_score = fit_probe(subset, validation, num_classes, Cs, seed)
            scores = _scores(probe, test.features, num_classes)
            metrics = classification_metrics(scores, test.labels, class_names)
            runs.append(ProbeRun(
                fraction, seed, {"C": C}, len(subset.features), validation_score, metrics, subset.image_ids()
            ))
            seed_scores.append(scores)
        results.append(summarise_fraction(
            fraction, runs, seed_scores, test.labels, test.groups, class_names, n_resamples, ci_seed
        ))
    split_ids = {"fit": fit_part.image_ids(), "validation": validation.image_ids(), "test": test.image_ids()}
    return LabelEfficiencyResult(results, split_ids)


__all__ = [
    "DEFAULT_CS",
    "DEFAULT_SEEDS",
    "LABEL_FRACTIONS",
    "FractionResult",
    "LabelEfficiencyResult",
    "ProbeData",
    "ProbeRun",
    "extract_features",
    "fit_probe",
    "image_features",
    "label_fraction",
    "patient_split",
    "run_linear_probe",
    "summarise_fraction",
]
