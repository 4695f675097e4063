"""Prompt sets for zero-shot chest X-ray classification.

MedCLIP classifies an image by comparing it with a handful of short report-like sentences per class, each built as
*severity x subtype x location* (for example "small left pleural effusion at the costophrenic angle"), and averages
over them. This module holds such a vocabulary for the CheXpert, RSNA pneumonia and COVID-19 tasks, written for this
library from common radiology wording, and draws prompts from it reproducibly:

- [`generate_prompts`] gives `{class_name: [prompt, ...]}` for multi-class zero-shot classification.
- [`multilabel_prompts`] gives `{class_name: {"positive": [...], "negative": [...]}}` for multi-label zero-shot
  classification, where each class is decided by its own finding-present / finding-absent pair.

Sampling uses one `random.Random` per class seeded with `f"{seed}:{class_name}"` (string seeds are hashed with SHA-512
by `random`, so they do not depend on `PYTHONHASHSEED`): the same seed gives the same prompts in any process, and a
class gets the same prompts in every task that contains it.
"""

import itertools
import random

from .labeler import CHEXPERT_CLASSES as LABELER_CLASSES

# Every class: "severity", "subtype" and "location" word groups whose Cartesian product gives the positive prompts
# (an empty string leaves that slot out), and "absent": phrases naming the finding, negated by `NEGATION_CUES` to
# give the negative prompts. Classes whose negation is not "no <finding>" ("No Finding", "Normal") list full
# negative sentences under "negative" instead.
CLASS_VOCABULARY: dict[str, dict[str, list[str]]] = {
    "No Finding": {
        "severity": ["", "unremarkable", "normal"],
        "subtype": ["chest radiograph", "chest x-ray", "cardiomediastinal silhouette", "study of the chest"],
        "location": ["", "with clear lungs", "without acute cardiopulmonary process", "with no pleural abnormality"],
        "negative": [
            "acute cardiopulmonary abnormality",
            "abnormal chest radiograph",
            "focal airspace opacity",
            "new abnormality in the chest",
            "abnormal cardiomediastinal contour",
            "pathologic finding in the lungs",
        ],
    },
    "Enlarged Cardiomediastinum": {
        "severity": ["", "mildly", "moderately", "markedly"],
        "subtype": [
            "widened mediastinum",
            "enlarged cardiomediastinal silhouette",
            "prominent mediastinal contour",
            "increased mediastinal width",
        ],
        "location": ["", "at the superior mediastinum", "at the aortopulmonary window", "at the hilar region"],
        "absent": ["mediastinal widening", "enlargement of the cardiomediastinal silhouette"],
    },
    "Cardiomegaly": {
        "severity": ["", "mild", "moderate", "severe", "borderline"],
        "subtype": [
            "cardiomegaly",
            "enlargement of the cardiac silhouette",
            "increased cardiothoracic ratio",
            "globular heart",
            "enlarged heart size",
        ],
        "location": ["", "with left ventricular configuration", "with prominent right heart border",
                     "unchanged from the prior exam"],
        "absent": ["cardiomegaly", "enlargement of the heart", "increase in heart size"],
    },
    "Lung Lesion": {
        "severity": ["", "small", "large", "ill-defined", "well-circumscribed"],
        "subtype": ["pulmonary nodule", "lung mass", "cavitary lesion", "nodular opacity", "spiculated lesion"],
        "location": ["", "in the right upper lobe", "in the left upper lobe", "in the right lower lobe",
                     "in the left lower lobe", "in the perihilar region"],
        "absent": ["pulmonary nodule", "lung mass", "focal lung lesion"],
    },
    "Lung Opacity": {
        "severity": ["", "faint", "patchy", "dense", "hazy"],
        "subtype": ["opacity", "airspace opacity", "reticular opacity", "ground-glass opacity", "opacification"],
        "location": ["", "at the lung bases", "in the right mid lung", "in the left mid lung", "bilaterally",
                     "in the retrocardiac region"],
        "absent": ["focal opacity", "airspace opacity", "parenchymal opacification"],
    },
    "Edema": {
        "severity": ["", "mild", "moderate", "severe", "minimal", "improving"],
        "subtype": [
            "pulmonary edema",
            "interstitial edema",
            "vascular congestion",
            "alveolar edema",
            "fluid overload",
            "cephalization of the pulmonary vessels",
        ],
        "location": ["", "bilaterally", "in the perihilar region", "with kerley b lines", "at the lung bases"],
        "absent": ["pulmonary edema", "vascular congestion", "interstitial edema"],
    },
    "Consolidation": {
        "severity": ["", "focal", "patchy", "dense", "confluent", "early"],
        "subtype": [
            "consolidation",
            "airspace consolidation",
            "lobar consolidation",
            "consolidation with air bronchograms",
            "segmental consolidation",
        ],
        "location": ["", "in the right lower lobe", "in the left lower lobe", "in the right middle lobe",
                     "in the lingula", "in the right upper lobe"],
        "absent": ["consolidation", "focal consolidation", "airspace consolidation"],
    },
    "Pneumonia": {
        "severity": ["", "early", "multifocal", "extensive", "developing", "patchy"],
        "subtype": [
            "pneumonia",
            "bronchopneumonia",
            "infectious infiltrate",
            "lobar pneumonia",
            "opacity suspicious for infection",
        ],
        "location": ["", "in the right lower lobe", "in the left lower lobe", "in the right upper lobe",
                     "bilaterally", "at the lung bases"],
        "absent": ["pneumonia", "infectious process", "focal infiltrate"],
    },
    "Atelectasis": {
        "severity": ["", "mild", "minimal", "subtle", "moderate"],
        "subtype": [
            "atelectasis",
            "plate-like atelectasis",
            "discoid atelectasis",
            "subsegmental atelectasis",
            "lobar collapse",
            "compressive atelectasis",
        ],
        "location": ["", "at the left base", "at the right base", "at both lung bases", "in the retrocardiac region",
                     "in the lingula"],
        "absent": ["atelectasis", "lobar collapse", "volume loss"],
    },
    "Pneumothorax": {
        "severity": ["", "small", "tiny", "moderate", "large", "tension"],
        "subtype": ["pneumothorax", "apical pneumothorax", "pleural air collection", "hydropneumothorax"],
        "location": ["", "on the right", "on the left", "at the apex", "along the lateral chest wall"],
        "absent": ["pneumothorax", "pleural air", "visible pleural line"],
    },
    "Pleural Effusion": {
        "severity": ["", "small", "trace", "moderate", "large", "layering"],
        "subtype": [
            "pleural effusion",
            "effusion",
            "blunting of the costophrenic angle",
            "loculated pleural fluid",
            "meniscus of pleural fluid",
        ],
        "location": ["", "on the right", "on the left", "bilaterally", "at the costophrenic angle",
                     "with adjacent atelectasis"],
        "absent": ["pleural effusion", "pleural fluid", "costophrenic angle blunting"],
    },
    "Pleural Other": {
        "severity": ["", "mild", "focal", "chronic", "irregular"],
        "subtype": ["pleural thickening", "pleural plaque", "pleural scarring", "calcified pleura",
                    "fibrothorax"],
        "location": ["", "at the right apex", "at the left apex", "along the lateral chest wall",
                     "along the diaphragm"],
        "absent": ["pleural thickening", "pleural plaques", "pleural calcification"],
    },
    "Fracture": {
        "severity": ["", "acute", "healed", "old", "displaced", "nondisplaced"],
        "subtype": ["rib fracture", "fracture", "clavicle fracture", "compression deformity", "callus formation"],
        "location": ["", "of the right ribs", "of the left ribs", "of the thoracic spine", "of the clavicle"],
        "absent": ["fracture", "acute osseous abnormality", "rib fracture"],
    },
    "Support Devices": {
        "severity": ["", "well-positioned", "unchanged", "new"],
        "subtype": [
            "endotracheal tube",
            "central venous catheter",
            "nasogastric tube",
            "cardiac pacemaker",
            "chest tube",
            "sternotomy wires",
        ],
        "location": ["", "in standard position", "in expected position", "projecting over the chest",
                     "unchanged in position"],
        "absent": ["support devices", "lines or tubes", "indwelling devices"],
    },
    "Normal": {
        "severity": ["", "normal", "clear"],
        "subtype": ["lungs", "chest radiograph", "lung fields", "pulmonary parenchyma"],
        "location": ["", "without consolidation", "without focal opacity", "with no acute process"],
        "negative": [
            "lung opacity suspicious for pneumonia",
            "focal airspace disease",
            "abnormal lung fields",
            "consolidation in the lungs",
        ],
    },
    "COVID-19": {
        "severity": ["", "mild", "moderate", "severe", "extensive"],
        "subtype": [
            "bilateral ground-glass opacities",
            "multifocal peripheral opacities",
            "viral pneumonia",
            "patchy ground-glass and consolidative opacities",
            "covid-19 pneumonia",
        ],
        "location": ["", "in a peripheral distribution", "at the lower lung zones", "in both lungs",
                     "in the subpleural regions"],
        "absent": ["covid-19 pneumonia", "viral pneumonia", "ground-glass opacity"],
    },
    "Other Pneumonia": {
        "severity": ["", "focal", "dense", "unilateral", "lobar"],
        "subtype": [
            "bacterial pneumonia",
            "lobar consolidation",
            "aspiration pneumonia",
            "cavitating pneumonia",
            "round pneumonia",
        ],
        "location": ["", "in the right lower lobe", "in the left lower lobe", "in the right upper lobe",
                     "in the right middle lobe"],
        "absent": ["bacterial pneumonia", "lobar pneumonia", "focal consolidation"],
    },
    "Bacterial Pneumonia": {
        "severity": ["", "focal", "dense", "lobar", "segmental"],
        "subtype": [
            "bacterial pneumonia",
            "lobar consolidation",
            "consolidation with air bronchograms",
            "round pneumonia",
            "focal alveolar consolidation",
        ],
        "location": ["", "in the right lower lobe", "in the left lower lobe", "in the right upper lobe",
                     "in the right middle lobe"],
        "absent": ["bacterial pneumonia", "lobar consolidation", "focal consolidation"],
    },
    "Viral Pneumonia": {
        "severity": ["", "mild", "diffuse", "bilateral", "patchy"],
        "subtype": [
            "viral pneumonia",
            "interstitial opacities",
            "peribronchial thickening",
            "diffuse reticular opacities",
            "bilateral perihilar infiltrates",
        ],
        "location": ["", "in both lungs", "in the perihilar regions", "in a diffuse distribution",
                     "at the lung bases"],
        "absent": ["viral pneumonia", "interstitial opacities", "peribronchial thickening"],
    },
    "Abnormal": {
        "severity": ["", "abnormal", "acute"],
        "subtype": ["chest radiograph", "cardiopulmonary finding", "lung opacity", "pathologic finding"],
        "location": ["", "in the lungs", "in the chest", "requiring further evaluation"],
        "negative": [
            "normal chest radiograph",
            "unremarkable chest x-ray",
            "clear lungs without acute cardiopulmonary process",
            "no acute abnormality",
        ],
    },
}

# Cues that turn a finding phrase into a negative prompt ("no pleural effusion", "no evidence of cardiomegaly").
NEGATION_CUES: list[str] = [
    "no",
    "no evidence of",
    "no radiographic sign of",
    "negative for",
    "without",
    "no residual",
]

CHEXPERT_COMPETITION_CLASSES = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEXPERT_CLASSES = list(LABELER_CLASSES)  # the 14 observations, in CheXpert's order

# The classes of every task, in the order of the returned dicts.
TASK_CLASSES: dict[str, list[str]] = {
    "chexpert5": CHEXPERT_COMPETITION_CLASSES,
    "chexpert14": CHEXPERT_CLASSES,
    "rsna": ["Pneumonia", "Normal"],
    "covid": ["COVID-19", "Other Pneumonia", "No Finding"],
}


def _task_classes(task: str) -> list[str]:
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown prompt task {task!r}; expected one of {sorted(TASK_CLASSES)}")
    return TASK_CLASSES[task]


def _sample(candidates: list[str], n: int, seed: int, key: str) -> list[str]:
    """`n` distinct candidates (all of them, shuffled, when there are fewer), drawn with a generator seeded by
    `seed` and `key` only."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"`n_per_class` must be a positive integer, got {n!r}")
    return random.Random(f"{seed}:{key}").sample(candidates, min(n, len(candidates)))


def class_prompt_candidates(class_name: str) -> list[str]:
    """Every positive prompt of a class: the severity x subtype x location combinations, in a fixed order."""
    if class_name not in CLASS_VOCABULARY:
        raise ValueError(f"no prompt vocabulary for class {class_name!r}; known: {sorted(CLASS_VOCABULARY)}")
    words = CLASS_VOCABULARY[class_name]
    return [
        " ".join(part for part in parts if part)
        for parts in itertools.product(words["severity"], words["subtype"], words["location"])
    ]


def negative_prompt_candidates(class_name: str) -> list[str]:
    """Every negative (finding-absent) prompt of a class, in a fixed order."""
    if class_name not in CLASS_VOCABULARY:
        raise ValueError(f"no prompt vocabulary for class {class_name!r}; known: {sorted(CLASS_VOCABULARY)}")
    words = CLASS_VOCABULARY[class_name]
    if "negative" in words:
        return list(words["negative"])
    return [f"{cue} {finding}" for cue, finding in itertools.product(NEGATION_CUES, words["absent"])]


def class_prompts(class_names, n_per_class: int = 10, seed: int = 0) -> dict[str, list[str]]:
    """Multi-class prompts of any classes of [`CLASS_VOCABULARY`]: `{class_name: [prompt, ...]}` in the given order,
    `n_per_class` distinct prompts each (all of a class's combinations when it has fewer), drawn from `seed`."""
    return {name: _sample(class_prompt_candidates(name), n_per_class, seed, name) for name in class_names}


def multilabel_class_prompts(class_names, n_per_class: int = 10, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Multi-label prompt pairs of any classes of [`CLASS_VOCABULARY`] (see [`multilabel_prompts`])."""
    return {
        name: {
            "positive": _sample(class_prompt_candidates(name), n_per_class, seed, name),
            "negative": _sample(negative_prompt_candidates(name), n_per_class, seed, f"{name}:negative"),
        }
        for name in class_names
    }


def generate_prompts(task: str, n_per_class: int = 10, seed: int = 0) -> dict[str, list[str]]:
    """Prompts for multi-class zero-shot classification.

    Args:
        task: `"chexpert5"` (the five CheXpert competition findings), `"chexpert14"` (all 14 CheXpert labels),
            `"rsna"` (pneumonia vs normal) or `"covid"` (COVID-19 vs other pneumonia vs no finding).
        n_per_class: how many distinct prompts to draw per class (all of a class's combinations when it has fewer).
        seed: the sampling seed; the same seed gives the same prompts in any process.

    Returns:
        `{class_name: [prompt, ...]}`, classes in the task's order; ready for [`ZeroShotClassifier`].

    Example:

    ```python
    >>> prompts = generate_prompts("chexpert5", n_per_class=3, seed=0)
    >>> list(prompts)
    ['Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion']
    ```"""
    return class_prompts(_task_classes(task), n_per_class, seed)


def multilabel_prompts(task: str, n_per_class: int = 10, seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """Positive / negative prompt pairs for multi-label zero-shot classification.

    Each class is decided on its own: an image is compared with prompts stating the finding ("positive") and
    prompts stating its absence ("negative"), and the class probability is the softmax over that pair.

    Args:
        task: as in [`generate_prompts`].
        n_per_class: how many distinct prompts to draw per class and side.
        seed: the sampling seed; the positives equal those of `generate_prompts(task, n_per_class, seed)`.

    Returns:
        `{class_name: {"positive": [...], "negative": [...]}}`, classes in the task's order.
    """
    return multilabel_class_prompts(_task_classes(task), n_per_class, seed)


__all__ = [
    "CHEXPERT_CLASSES",
    "CHEXPERT_COMPETITION_CLASSES",
    "CLASS_VOCABULARY",
    "NEGATION_CUES",
    "TASK_CLASSES",
    "class_prompt_candidates",
    "class_prompts",
    "generate_prompts",
    "multilabel_class_prompts",
    "multilabel_prompts",
    "negative_prompt_candidates",
]
