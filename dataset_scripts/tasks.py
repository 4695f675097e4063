"""Evaluation tasks by name: a corpus, its patient-disjoint seeded split, classes, label mapping and prompt set.

    from dataset_scripts.tasks import get_task

    task = get_task("pediatric-pneumonia")
    split = task.split(test_size=0.2, seed=0)            # an EvaluationSplit of the held-out patients
    prompts = task.prompts(n_per_class=10, seed=0)        # {class_name: [prompt, ...]} (multi-label: pos / neg)
    task.write_split_ids(split, "outputs/run/eval_splits")  # the patient and image ids it used

A task reads its corpus with a builder of [`BUILDERS`] (from the folder given, else the builder's folder under
`shared_data_dir()`), splits the corpus's patients with `patient_split(test_size, seed)` (the same split for every
task on that corpus, so training can leave out exactly the held-out patients: [`held_out_patients`]), keeps the
examples its label mapping gives a label, and, for the `*-5x200` tasks, draws up to 200 held-out images per class
(seeded), as MedCLIP and GLoRIA evaluate. Some tasks bring companion rows evaluated alongside them
(`nih-cxr14` -> `nih-cxr14-normal`, `pediatric-pneumonia` -> `pediatric-pneumonia-bacterial-viral`).

`csv=PATH` is a user's own CSV: columns `image` (path relative to the CSV), `label` (class name) and optionally
`patient_id` and `text`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from modeling_medclip.evaluation import EvaluationSplit
from modeling_medclip.labeler import CHEXPERT_CLASSES
from modeling_medclip.prompts import (
    CHEXPERT_COMPETITION_CLASSES,
    CLASS_VOCABULARY,
    class_prompts,
    multilabel_class_prompts,
)

from .covid_cxr import COVID_CXR_CLASSES
from .generic import build_image_csv, patient_split
from .nih_cxr14 import NIH_CLASSES
from .paths import shared_data_dir
from .pediatric_pneumonia import PEDIATRIC_PNEUMONIA_CLASSES
from .registry import BUILDERS
from .rsna import RSNA_CLASSES


# NIH findings that are CheXpert observations one to one (NIH name -> CheXpert name).
NIH_SHARED_FINDINGS = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Effusion": "Pleural Effusion",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
}


def _covid_class(example: dict) -> int:
    return int(example["labels"])


def _nih_shared_findings(example: dict) -> list[float]:
    return [example["nih_labels"][NIH_CLASSES.index(name)] for name in NIH_SHARED_FINDINGS]


def _nih_normal(example: dict) -> int:
    return 1 if example["finding_labels"] == "No Finding" else 0  # ("Abnormal", "No Finding")


def _pediatric_pneumonia(example: dict) -> int:
    return 1 if PEDIATRIC_PNEUMONIA_CLASSES[example["finding"]] == "normal" else 0  # ("Pneumonia", "Normal")


def _pediatric_bacterial_viral(example: dict) -> int | None:
    finding = PEDIATRIC_PNEUMONIA_CLASSES[example["finding"]]
    return None if finding == "normal" else ("bacterial pneumonia", "viral pneumonia").index(finding)


def _one_of_five(example: dict) -> int | None:
    """The index of the single positive CheXpert competition finding, or `None` (none or several)."""
    positives = [i for i, name in enumerate(CHEXPERT_COMPETITION_CLASSES)
                 if example["labels"][CHEXPERT_CLASSES.index(name)] == 1.0]  # fmt: skip
    return positives[0] if len(positives) == 1 else None


def _rsna_class(example: dict) -> int:
    return ("Normal", "Pneumonia").index(RSNA_CLASSES[example["labels"]])


def _class_id(example: dict) -> int:
    return int(example["labels"])


def _read_csv_task(location: str | os.PathLike, **kwargs):
    columns = pd.read_csv(location, nrows=0).columns
    return build_image_csv(
        location, class_column="label", text_column="text" if "text" in columns else None,
        patient_column="patient_id" if "patient_id" in columns else None, num_shards=1, **kwargs,
    )  # fmt: skip


@dataclass(frozen=True)
class EvalTask:
    """An evaluation task (see the module docstring).

    Args:
        name: the task's name (`--eval_tasks NAME`).
        corpus: the [`BUILDERS`] name of its corpus (matched against training sources to hold patients out).
        class_names: the classes in label order; `()` for the classes of the data (`csv`).
        label: `example -> class id` (multi-class) or `-> multi-hot list` (multi-label), `None` to leave it out.
        mode: `"multiclass"` or `"multilabel"`.
        prompt_classes: the [`CLASS_VOCABULARY`] class of each class (default: the class names).
        per_class: draw at most this many held-out images per class (seeded).
        companions: names of tasks evaluated with this one (same corpus and split).
        builder_kwargs: options of the corpus builder.
        build: the corpus reader (default: `BUILDERS[corpus]`).
        description: one line for `--help` and the model card.
    """

    name: str
    corpus: str
    class_names: tuple[str, ...]
    label: Callable[[dict], int | list[float] | None]
    mode: Literal["multiclass", "multilabel"] = "multiclass"
    prompt_classes: tuple[str, ...] | None = None
    per_class: int | None = None
    companions: tuple[str, ...] = ()
    builder_kwargs: dict = field(default_factory=dict)
    build: Callable | None = None
    description: str = ""

    def default_location(self) -> Path:
        folder = BUILDERS[self.corpus].shared_folder if self.corpus in BUILDERS else None
        if folder is None:
            raise ValueError(f"evaluation task {self.name!r} needs its data: pass it as {self.name}=/path/to/data")
        return shared_data_dir() / folder

    def _examples(self, location) -> list[dict]:
        build = self.build or BUILDERS[self.corpus]
        return list(build(location, **self.builder_kwargs))

    def split(
        self, location: str | os.PathLike | None = None, *, test_size: float = 0.2, seed: int = 0,
        part: Literal["train", "test"] = "test", max_samples: int | None = None,
    ) -> EvaluationSplit:
        """The task's examples among the `part` patients of `patient_split(test_size, seed)` of its corpus.

        `max_samples` keeps a seeded random subset (after the per-class draw of the `*-5x200` tasks).
        """  # fmt: skip
        location = Path(location) if location is not None else self.default_location()
        examples = self._examples(location)
        train, test = patient_split([example["patient_id"] for example in examples], test_size=test_size, seed=seed)
        chosen = [(examples[i], self.label(examples[i])) for i in (test if part == "test" else train)]
        chosen = [(example, label) for example, label in chosen if label is not None]
        rng = np.random.default_rng(seed)
        if self.per_class is not None:
            by_class: dict[int, list] = {}
            for pair in chosen:
                by_class.setdefault(pair[1], []).append(pair)
            chosen = [pair for label in sorted(by_class) for pair in _draw(by_class[label], self.per_class, rng)]
        if max_samples is not None and len(chosen) > max_samples:
            chosen = _draw(chosen, max_samples, rng)
        if not chosen:
            raise ValueError(f"evaluation task {self.name!r}: no labelled {part} example in {location}")
        return EvaluationSplit(
            images=[example["image"] for example, _ in chosen],
            labels=[label for _, label in chosen],
            class_names=list(self.class_names or self._data_class_names(location)),
            texts=[example.get("text") or "" for example, _ in chosen],
            patient_ids=[str(example["patient_id"]) for example, _ in chosen],
            image_ids=[str(example["image_id"]) for example, _ in chosen],
        )

    def _data_class_names(self, location) -> list[str]:
        build = self.build or BUILDERS[self.corpus]
        return list(build(location, **self.builder_kwargs).features["labels"].names)

    def held_out_patients(self, location=None, *, test_size: float = 0.2, seed: int = 0) -> set[str]:
        """Every patient of the corpus's held-out side (labelled for this task or not): what training leaves out."""
        location = Path(location) if location is not None else self.default_location()
        patients = [str(example["patient_id"]) for example in self._examples(location)]
        _, test = patient_split(patients, test_size=test_size, seed=seed)
        return {patients[i] for i in test}

    def prompts(self, n_per_class: int = 10, seed: int = 0) -> dict:
        """The built-in prompt set, keyed by the class names: `{class: [prompt, ...]}`, or for multi-label tasks
        `{class: {"positive": [...], "negative": [...]}}`. A class without vocabulary (`csv`) is its own prompt."""
        return self.prompts_for(self.class_names, n_per_class, seed)

    def prompts_for(self, class_names: Sequence[str], n_per_class: int = 10, seed: int = 0) -> dict:
        vocabulary = list(self.prompt_classes or class_names)
        if self.mode == "multilabel":
            sets = multilabel_class_prompts(vocabulary, n_per_class, seed)
        else:
            known = {name.lower(): name for name in CLASS_VOCABULARY}
            sets = {
                name: class_prompts([known[name.lower()]], n_per_class, seed)[known[name.lower()]]
                if name.lower() in known else [name]
                for name in vocabulary
            }  # fmt: skip
        return dict(zip(class_names, sets.values()))

    def write_split_ids(self, split: EvaluationSplit, folder: str | os.PathLike) -> Path:
        """Writes `<folder>/<task>.json`: the patient and image ids the split used, so that a run repeats."""
        path = Path(folder) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {"task": self.name, "patient_ids": sorted(set(split.patient_ids)), "image_ids": split.image_ids},
                indent=1,
            )
            + "\n"
        )
        return path


def _draw(items: list, n: int, rng: np.random.Generator) -> list:
    if len(items) <= n:
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=n, replace=False))]


TASKS: dict[str, EvalTask] = {
    task.name: task
    for task in (
        EvalTask(
            "covid-cxr", "covid_cxr", COVID_CXR_CLASSES, _covid_class,
            prompt_classes=("COVID-19", "Other Pneumonia", "No Finding"),
            description="COVID-19 vs other pneumonia vs no finding (3-class)",
        ),
        EvalTask(
            "nih-cxr14", "nih_cxr14", tuple(NIH_SHARED_FINDINGS.values()), _nih_shared_findings, mode="multilabel",
            companions=("nih-cxr14-normal",),
            description="multi-label over the 7 NIH findings that are CheXpert observations",
        ),
        EvalTask(
            "nih-cxr14-normal", "nih_cxr14", ("Abnormal", "No Finding"), _nih_normal,
            description="NIH ChestX-ray14: normal (No Finding) vs abnormal",
        ),
        EvalTask(
            "pediatric-pneumonia", "pediatric_pneumonia", ("Pneumonia", "Normal"), _pediatric_pneumonia,
            companions=("pediatric-pneumonia-bacterial-viral",), description="pediatric pneumonia vs normal",
        ),
        EvalTask(
            "pediatric-pneumonia-bacterial-viral", "pediatric_pneumonia", ("Bacterial pneumonia", "Viral pneumonia"),
            _pediatric_bacterial_viral, prompt_classes=("Bacterial Pneumonia", "Viral Pneumonia"),
            description="pediatric pneumonia images: bacterial vs viral",
        ),
        EvalTask(
            "chexpert-5x200", "chexpert", tuple(CHEXPERT_COMPETITION_CLASSES), _one_of_five, per_class=200,
            builder_kwargs={"uncertain": "ignore"},
            description="CheXpert: 200 held-out images per class with exactly one of the 5 competition findings",
        ),
        EvalTask(
            "mimic-5x200", "mimic_cxr", tuple(CHEXPERT_COMPETITION_CLASSES), _one_of_five, per_class=200,
            builder_kwargs={"split": None, "uncertain": "ignore"},
            description="MIMIC-CXR: 200 held-out images per class with exactly one of the 5 competition findings",
        ),
        EvalTask(
            "rsna-pneumonia", "rsna", ("Normal", "Pneumonia"), _rsna_class,
            description="RSNA pneumonia vs normal",
        ),
        EvalTask(
            "csv", "image_csv", (), _class_id, build=_read_csv_task,
            description="your own CSV: image, label (class name), optional patient_id and text",
        ),
    )
}  # fmt: skip
"""Every evaluation task, by name."""


def get_task(name: str) -> EvalTask:
    """The task `name`; raises `ValueError` listing the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown evaluation task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def parse_task(spec: str) -> tuple[EvalTask, str | None]:
    """`"NAME"` or `"NAME=PATH"` -> (task, location or `None` for its shared folder)."""
    name, _, location = spec.partition("=")
    return get_task(name), location or None


def expand_tasks(specs: Sequence[str]) -> list[tuple[EvalTask, str | None]]:
    """The tasks of `specs` followed by their companions (each once), in order."""
    tasks, seen = [], set()
    for spec in specs:
        task, location = parse_task(spec)
        for member in (task, *(get_task(name) for name in task.companions)):
            if member.name not in seen:
                seen.add(member.name)
                tasks.append((member, location))
    return tasks


def tasks_help() -> str:
    return "; ".join(f"{task.name}: {task.description}" for task in TASKS.values())
