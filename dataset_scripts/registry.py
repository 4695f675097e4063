"""The one registry of corpus builders, by the names both CLIs and `to_parquet --builder` use.

A [`Builder`] is called like the function it wraps (`BUILDERS["mimic_cxr"](root, split="train")`) and also says what
the training side needs to know about its corpus: where the shared data folder keeps it, whether it has images and
report text, and how its images get the 14 CheXpert label vectors of the semantic loss ([`image_label_vector`]).
Adding a corpus is adding a builder module and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from datasets import IterableDataset

from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler

from .chexpert import build_chexpert
from .covid_cxr import COVID_CXR_CLASSES, build_covid_cxr
from .generic import build_image_folder
from .iu_xray import build_iu_xray
from .mimic_cxr import build_mimic_cxr
from .nih_cxr14 import build_nih_cxr14
from .pediatric_pneumonia import build_pediatric_pneumonia
from .rsna import RSNA_CLASSES, build_rsna_pneumonia


LabelFunction = Callable[[dict, CheXpertLabeler, str], "list[float] | None"]


def class_label_vector(class_name: str) -> list[float] | None:
    """The CheXpert vector of a class name: a CheXpert observation itself, "normal" -> No Finding, any pneumonia
    (COVID-19 included) -> Pneumonia; `None` when the name maps to none of them."""
    name = class_name.strip().lower()
    vector = [0.0] * len(CHEXPERT_CLASSES)
    lowered = [observation.lower() for observation in CHEXPERT_CLASSES]
    if name in lowered:
        vector[lowered.index(name)] = 1.0
    elif name in ("normal", "no finding", "no_finding"):
        vector[CHEXPERT_CLASSES.index("No Finding")] = 1.0
    elif "pneumonia" in name or "covid" in name:
        vector[CHEXPERT_CLASSES.index("Pneumonia")] = 1.0
    else:
        return None
    return vector


def own_or_report_labels(example: dict, labeler: CheXpertLabeler, uncertain: str) -> list[float] | None:
    """The example's own 14 CheXpert labels when it has them, else the labeler's labels of its report."""
    labels = example.get("labels")
    if isinstance(labels, (list, tuple)) and len(labels) == len(CHEXPERT_CLASSES):
        return [float(value) for value in labels]
    text = example.get("text") or ""
    return labeler.label_vector(text, uncertain=uncertain) if text.strip() else None


def covid_cxr_labels(example: dict, labeler: CheXpertLabeler, uncertain: str) -> list[float]:
    """The labeler's labels of the clinical note, corrected by the image's class: COVID-19 and other pneumonia set
    Pneumonia and clear No Finding; No Finding keeps only No Finding and Support Devices."""
    vector = labeler.label_vector(example.get("text") or "", uncertain=uncertain)
    kept = (CHEXPERT_CLASSES.index("No Finding"), CHEXPERT_CLASSES.index("Support Devices"))
    if COVID_CXR_CLASSES[example["labels"]] == "No Finding":
        vector = [value if i in kept else 0.0 for i, value in enumerate(vector)]
        vector[kept[0]] = 1.0
    else:
        vector[CHEXPERT_CLASSES.index("Pneumonia")], vector[kept[0]] = 1.0, 0.0
    return vector


def rsna_labels(example: dict, labeler: CheXpertLabeler, uncertain: str) -> list[float]:
    """Pneumonia for a positive RSNA image, No Finding for a negative one."""
    return class_label_vector(RSNA_CLASSES[example["labels"]])


@dataclass(frozen=True)
class Builder:
    """A corpus builder and what it offers.

    Args:
        build: the builder function (`root` first, keyword options after).
        description: one line for `--help`.
        image_labels: how its images get CheXpert label vectors (shown in `--help`).
        label_vector: `(example, labeler, uncertain) -> 14 floats or None`.
        shared_folder: its folder under `shared_data_dir()`, for sources given by name alone.
        has_images, has_text: whether its examples carry images / report text.
        train_kwargs: builder options of a training source (e.g. only images with a note).
        class_names: per example, the class names of an integer `labels` (for `label_vector` by class name).
    """

    build: Callable[..., IterableDataset]
    description: str
    image_labels: str
    label_vector: LabelFunction = own_or_report_labels
    shared_folder: str | None = None
    has_images: bool = True
    has_text: bool = False
    train_kwargs: dict = field(default_factory=dict)

    def __call__(self, root, **kwargs) -> IterableDataset:
        return self.build(root, **kwargs)


BUILDERS: dict[str, Builder] = {
    "mimic_cxr": Builder(
        build_mimic_cxr, "MIMIC-CXR-JPG images with their reports (official train split)",
        "its own CheXpert file (mimic-cxr-2.0.0-chexpert.csv)", has_text=True,
    ),
    "chexpert": Builder(build_chexpert, "CheXpert (full or -small), train.csv", "its own CheXpert columns"),
    "nih_cxr14": Builder(
        build_nih_cxr14, "NIH ChestX-ray14 in NIH's layout", "its own NIH labels mapped to CheXpert",
        shared_folder="nih-cxr14-1000",
    ),
    "pediatric_pneumonia": Builder(
        build_pediatric_pneumonia, "pediatric normal / bacterial / viral pneumonia X-rays",
        "its class (pneumonia -> Pneumonia, normal -> No Finding)", shared_folder="pediatric-pneumonia-cxr",
    ),
    "covid_cxr": Builder(
        build_covid_cxr, "COVID-19 image collection with clinical notes (images with a note)",
        "the labeler on the note, corrected by the image's class", label_vector=covid_cxr_labels,
        shared_folder="covid-cxr", has_text=True, train_kwargs={"require_text": True},
    ),
    "iu_xray": Builder(
        build_iu_xray, "IU X-ray (Open-i) reports; text only unless images_dir is given",
        "the labeler on the report", shared_folder="iu-xray-reports", has_images=False, has_text=True,
    ),
    "rsna": Builder(
        build_rsna_pneumonia, "RSNA Pneumonia Detection Challenge", "its class (Pneumonia / No Finding)",
        label_vector=rsna_labels,
    ),
    "image_folder": Builder(
        build_image_folder, "root/<class_name>/<image> folders", "the class folder name, when it names a "
        "CheXpert observation, normal or a pneumonia",
    ),
}  # fmt: skip
"""Every corpus builder, by name. Each takes the corpus folder as its first argument."""


def get_builder(name: str) -> Builder:
    """The registered builder `name`; raises `ValueError` listing the known names otherwise."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset builder {name!r}; known builders: {', '.join(sorted(BUILDERS))}")
    return BUILDERS[name]


def builders_help() -> str:
    """One line per builder (name, what it reads, where its image label vectors come from), for `--help`."""
    return "; ".join(
        f"{name}: {builder.description}" + (f", image labels from {builder.image_labels}" if builder.has_images else "")
        for name, builder in BUILDERS.items()
    )
