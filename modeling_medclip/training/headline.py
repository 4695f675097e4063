"""The headline numbers of a run's evaluation tasks, with 95% patient-bootstrap confidence intervals, and ROC curves.

Zero-shot, from each task's prompt set (`TaskEvaluation.prompts`), on its held-out patients:

- two classes: the ROC AUC of the first class against the second (`pediatric-pneumonia`: pneumonia vs normal, its
  companion bacterial vs viral; `nih-cxr14-normal`: abnormal vs no finding);
- more classes (`covid-cxr`): the macro one-vs-rest AUC;
- multi-label (`nih-cxr14`): the AUC of every finding with at least `MIN_POSITIVES` held-out positive images, and
  their macro AUC.

Retrieval: image -> text precision@10 against the report sentences of the run's text sources (a seeded subset of at
most `MAX_GALLERY` distinct sentences), a sentence being relevant when its label vector shares a positive CheXpert
class with the image's class (or findings); for tasks whose images have at least two different sets of CheXpert
observations (not, e.g., bacterial vs viral pneumonia: both are Pneumonia).

Every number comes with the percentile interval of [`bootstrap_ci`] (whole patients resampled, seeded). Metric names:
`eval_<task>/auc` (or `/macro_auc`, `/auc/<finding>`, `/text_precision@k`), each with `..._ci_low` and `..._ci_high`.
"""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..labeler import CHEXPERT_CLASSES
from ..metrics import bootstrap_ci
from ..plots import plot_roc_curves
from ..retrieval import embed_texts
from ..zero_shot import ZeroShotClassifier

MIN_POSITIVES = 10
MAX_GALLERY = 4000
RETRIEVAL_KS = (10,)
# Task class names that are not CheXpert observations, and the observation a relevant sentence has.
CLASS_OBSERVATIONS = {
    "Normal": "No Finding",
    "COVID-19": "Pneumonia",
    "Other Pneumonia": "Pneumonia",
    "Bacterial pneumonia": "Pneumonia",
    "Viral pneumonia": "Pneumonia",
}


@torch.no_grad()
def zero_shot_scores(model, processor, evaluation, image_embeddings: torch.Tensor) -> np.ndarray:
    """`(N, C)` zero-shot probabilities of a task's held-out images (multi-label: per class, positive vs negative)."""
    mode = "multilabel" if evaluation.split.multilabel else "multiclass"
    classifier = ZeroShotClassifier(model, processor, evaluation.prompts, mode=mode)
    return classifier.classify_embeddings(image_embeddings).probs.float().cpu().numpy()


def _interval(metric: Callable, arrays: Sequence, patients, n_resamples: int, seed: int, name: str) -> dict:
    """`{name: value, name_ci_low, name_ci_high}`; `{}` where the metric is undefined on the split (a class without
    positives or negatives) or on most of its resamples (a split of a few patients)."""
    try:
        if n_resamples <= 0:
            return {name: float(metric(*arrays))}
        interval = bootstrap_ci(metric, *arrays, groups=patients, n_resamples=n_resamples, seed=seed)
    except ValueError:
        return {}
    return {name: interval.value, f"{name}_ci_low": interval.low, f"{name}_ci_high": interval.high}


def _macro_auc(columns: Sequence[int]) -> Callable:
    def metric(labels, scores):
        return float(np.mean([roc_auc_score(labels[:, c], scores[:, c]) for c in columns]))

    return metric


def zero_shot_headline(evaluation, scores: np.ndarray, n_resamples: int, seed: int) -> dict[str, float]:
    """The task's headline zero-shot AUC(s) with their intervals (see the module docstring)."""
    split, patients = evaluation.split, np.asarray(evaluation.split.patient_ids)
    labels = np.asarray(split.labels)
    if split.multilabel:
        counts = labels.sum(axis=0)
        columns = [c for c in range(labels.shape[1]) if MIN_POSITIVES <= counts[c] <= len(labels) - MIN_POSITIVES]
        metrics = {}
        for c in columns:
            metrics.update(_interval(_macro_auc([c]), (labels, scores), patients, n_resamples, seed,
                                     f"auc/{split.class_names[c]}"))  # fmt: skip
        if columns:
            metrics.update(_interval(_macro_auc(columns), (labels, scores), patients, n_resamples, seed, "macro_auc"))
        return metrics
    one_hot = np.eye(len(split.class_names))[labels]
    if len(split.class_names) == 2:
        return _interval(_macro_auc([0]), (one_hot, scores), patients, n_resamples, seed, "auc")
    return _interval(_macro_auc(range(len(split.class_names))), (one_hot, scores), patients, n_resamples, seed,
                     "macro_auc")  # fmt: skip


def observation_vectors(evaluation) -> np.ndarray:
    """`(N, 14)` 0/1 CheXpert observations of the held-out images, from their task labels (all zero where a class
    names no observation, e.g. "Abnormal")."""
    split = evaluation.split
    names = [CLASS_OBSERVATIONS.get(name, name) for name in split.class_names]
    columns = [CHEXPERT_CLASSES.index(name) if name in CHEXPERT_CLASSES else None for name in names]
    labels = np.asarray(split.labels)
    multi_hot = labels if split.multilabel else np.eye(len(names))[labels]
    vectors = np.zeros((len(labels), len(CHEXPERT_CLASSES)))
    for task_column, column in enumerate(columns):
        if column is not None:
            vectors[:, column] = np.maximum(vectors[:, column], multi_hot[:, task_column])
    return vectors


class SentenceGallery:
    """Report sentences and their 14 CheXpert label vectors: the text side of the retrieval rows."""

    def __init__(self, sentences: Sequence[str], labels, seed: int = 0, max_size: int = MAX_GALLERY):
        distinct = dict(zip(sentences, (tuple(vector) for vector in labels)))
        texts = list(distinct)
        if len(texts) > max_size:
            keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_size, replace=False))
            texts = [texts[i] for i in keep]
        self.texts = texts
        self.labels = np.asarray([distinct[text] for text in texts], dtype=np.float32) > 0

    @classmethod
    def from_stream(cls, stream, seed: int = 0, max_size: int = MAX_GALLERY) -> "SentenceGallery":
        """From a stream of `{"text", "labels"}` sentences (e.g. `dataset_scripts.sources.text_stream`)."""
        examples = list(stream)
        return cls([e["text"] for e in examples], [e["labels"] for e in examples], seed, max_size)


@torch.no_grad()
def retrieval_headline(
    model, processor, evaluation, image_embeddings: torch.Tensor, gallery: SentenceGallery, n_resamples: int, seed: int
) -> dict[str, float]:
    """Image -> sentence precision@k by label agreement, over the held-out images with a CheXpert observation."""
    observations = observation_vectors(evaluation) > 0
    queries = np.flatnonzero(observations.any(axis=1))
    if len(np.unique(observations[queries], axis=0)) < 2:
        return {}  # one relevant set for every query: P@k would measure the gallery's label mix, not the model
    text_embeddings = embed_texts(model, processor, gallery.texts).to(image_embeddings.device)
    similarity = image_embeddings[queries].float() @ text_embeddings.float().T
    top = similarity.topk(max(RETRIEVAL_KS), dim=1).indices.cpu().numpy()
    relevant = (observations[queries][:, None, :] & gallery.labels[top]).any(axis=2)  # (Q, k_max)
    patients = np.asarray(evaluation.split.patient_ids)[queries]
    metrics = {}
    for k in RETRIEVAL_KS:
        precision = relevant[:, :k].mean(axis=1)
        metrics.update(_interval(np.mean, (precision,), patients, n_resamples, seed, f"text_precision@{k}"))
    return metrics


def save_roc_curves(scores: dict[str, dict[str, np.ndarray]], validation, folder: str | Path) -> list[Path]:
    """`<folder>/roc_<task>.png` for every task: one curve per entry of `scores` (`{"before": {task: (N, C)},
    "after": ...}`)."""
    paths = []
    for evaluation in validation.tasks:
        name = evaluation.task.name
        runs = {run: task_scores[name] for run, task_scores in scores.items() if name in task_scores}
        if runs:
            paths.append(plot_roc_curves(runs, evaluation.split.labels, evaluation.split.class_names,
                                         Path(folder) / f"roc_{name}.png", title=f"{name}: held-out patients"))  # fmt: skip
    return paths


def format_headline_table(columns: dict[str, dict[str, float]]) -> str:
    """A Markdown table of the headline metrics (rows) of each run (columns): `value [low, high]`."""
    names = list(columns)
    rows = [key for key in columns[names[-1]] if _is_headline(key)]
    lines = ["| held-out metric (95% CI) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for row in rows:
        cells = []
        for name in names:
            values = columns[name]
            if row not in values:
                cells.append("n/a")
            elif f"{row}_ci_low" in values:
                cells.append(f"{values[row]:.3f} [{values[f'{row}_ci_low']:.3f}, {values[f'{row}_ci_high']:.3f}]")
            else:
                cells.append(f"{values[row]:.3f}")
        lines.append(f"| {row.removeprefix('eval_')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_headline(key: str) -> bool:
    metric = key.split("/", 1)[-1]
    return key.startswith("eval_") and not key.endswith(("_ci_low", "_ci_high")) and (
        metric in ("auc", "macro_auc") or metric.startswith(("auc/", "text_precision@"))
    )  # fmt: skip
