"""NIH ChestX-ray14 (Wang et al. 2017), in NIH's own layout. Image-only: `text` is `""`.

Expected layout (as NIH distributes it, or with every image in one `images/` folder, as in
`shared/data/nih-cxr14-1000/`)::

    root/
        Data_Entry_2017_v2020.csv      # or Data_Entry_2017.csv: Image Index, Finding Labels, Patient ID, View Position
        images_001/images/00000001_000.png
        ...
        images_012/images/...          # or: images/00000001_000.png

`labels` are the 14 CheXpert observations mapped from NIH's labels as the shared folder's README documents
(`NIH_TO_CHEXPERT`): Atelectasis, Cardiomegaly, Consolidation, Edema, Pneumonia and Pneumothorax share a name,
Effusion is Pleural Effusion, Mass and Nodule are Lung Lesion, Infiltration is Lung Opacity, Pleural_Thickening is
Pleural Other, "No Finding" is No Finding; Emphysema, Fibrosis and Hernia have no CheXpert counterpart. NIH's own
labels are kept in `nih_labels` (14 floats over `NIH_CLASSES`) and `finding_labels` (the source string).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from datasets import IterableDataset, List, Value

from modeling_medclip.labeler import CHEXPERT_CLASSES

from .generic import example_features, read_index, require_file, stream_from_index


NIH_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NIH_TO_CHEXPERT = {
    "No Finding": "No Finding",
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Effusion": "Pleural Effusion",
    "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion",
    "Infiltration": "Lung Opacity",
    "Pleural_Thickening": "Pleural Other",
}
"""NIH label -> CheXpert observation; NIH labels absent here (Emphysema, Fibrosis, Hernia) have no counterpart."""
REQUIRED_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def nih_label_vectors(finding_labels: str) -> tuple[list[float], list[float]]:
    """`(chexpert, nih)`: the 14 CheXpert floats and the 14 NIH floats of a `Finding Labels` cell such as
    `"Effusion|Mass"` or `"No Finding"`. Raises `ValueError` on a label NIH does not use."""
    names = [name.strip() for name in finding_labels.split("|") if name.strip()]
    unknown = [name for name in names if name != "No Finding" and name not in NIH_CLASSES]
    if unknown:
        raise ValueError(f"unknown NIH label(s) {unknown} in {finding_labels!r}; NIH's labels are {NIH_CLASSES}")
    chexpert = [0.0] * len(CHEXPERT_CLASSES)
    for name in names:
        if name in NIH_TO_CHEXPERT:
            chexpert[CHEXPERT_CLASSES.index(NIH_TO_CHEXPERT[name])] = 1.0
    return chexpert, [1.0 if name in names else 0.0 for name in NIH_CLASSES]


def find_images(root: Path, names: pd.Series) -> list[str]:
    """The path of every image of `names`: in `root/images/` or in NIH's `root/images_0xx/images/` folders."""
    folders = [root / "images"] if (root / "images").is_dir() else sorted(root.glob("images_*/images"))
    if not folders:
        raise FileNotFoundError(f"NIH ChestX-ray14 image folder not found in {root}: expected images/ or "
                                "images_001/images/ ...")  # fmt: skip
    located = {}
    for folder in folders:
        located.update({name: str(folder / name) for name in os.listdir(folder)})
    missing = [name for name in names if name not in located]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} NIH ChestX-ray14 image(s) listed in the metadata are not in {', '.join(map(str, folders))}, "
            f"e.g. {missing[0]}"
        )
    return [located[name] for name in names]


def _generate_examples(shards: list[pd.DataFrame]) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False):
            chexpert, nih = nih_label_vectors(row.finding_labels)
            yield {
                "image": row.image,
                "text": "",
                "labels": chexpert,
                "nih_labels": nih,
                "finding_labels": row.finding_labels,
                "image_id": row.image_id,
                "study_id": row.image_id,
                "patient_id": row.patient_id,
                "view": row.view,
            }


def build_nih_cxr14(root: str | os.PathLike, *, frontal_only: bool = True, num_shards: int = 16) -> IterableDataset:
    """Streams NIH ChestX-ray14 images with their CheXpert-mapped and their own labels.

    Args:
        root: the folder holding `Data_Entry_2017*.csv` (the newest-named one is read) and the image folders.
        frontal_only: keep only `View Position` PA and AP images (every NIH image is frontal; kept for symmetry).
        num_shards: shards of the stream.
    """
    root = require_file(root, "NIH ChestX-ray14 folder")
    entries = sorted(root.glob("Data_Entry_2017*.csv"), reverse=True)
    if not entries:
        raise FileNotFoundError(f"NIH ChestX-ray14 metadata not found in {root}: expected Data_Entry_2017*.csv")
    frame = read_index(entries[0], REQUIRED_COLUMNS, dtype={"Patient ID": str})
    if frontal_only:
        frame = frame[frame["View Position"].isin(("PA", "AP"))]
    index = pd.DataFrame(
        {
            "image": find_images(root, frame["Image Index"]),
            "finding_labels": frame["Finding Labels"].astype(str).to_numpy(),
            "image_id": frame["Image Index"].astype(str).to_numpy(),
            "patient_id": frame["Patient ID"].astype(str).to_numpy(),
            "view": frame["View Position"].astype(str).to_numpy(),
        }
    )
    features = example_features(
        extra={
            "nih_labels": List(Value("float32"), length=len(NIH_CLASSES)),
            "finding_labels": Value("string"),
            "view": Value("string"),
        }
    )
    return stream_from_index(index, _generate_examples, features, num_shards)
