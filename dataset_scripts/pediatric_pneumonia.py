"""Pediatric chest X-rays labelled normal / bacterial / viral pneumonia (Kermany et al. 2018), in the layout of
`shared/data/pediatric-pneumonia-cxr/`. Image-only: `text` is `""`.

Expected layout::

    root/
        metadata.csv                        # image (path relative to root), label, patient_id, ...
        train/{NORMAL,PNEUMONIA}/*.jpeg

`labels` are the 14 CheXpert observations: pneumonia (bacterial or viral) is Pneumonia, normal is No Finding.
The source class is kept in `finding`, a class id over `PEDIATRIC_PNEUMONIA_CLASSES`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pandas as pd
from datasets import ClassLabel, IterableDataset

from modeling_medclip.labeler import CHEXPERT_CLASSES

from .generic import example_features, read_index, require_file, stream_from_index


PEDIATRIC_PNEUMONIA_CLASSES = ("normal", "bacterial pneumonia", "viral pneumonia")
REQUIRED_COLUMNS = ("image", "label", "patient_id")


def pediatric_label_vector(finding: str) -> list[float]:
    """The 14 CheXpert floats of a class: Pneumonia for either pneumonia, No Finding for normal."""
    if finding not in PEDIATRIC_PNEUMONIA_CLASSES:
        raise ValueError(f"unknown pediatric pneumonia label {finding!r}; expected one of {PEDIATRIC_PNEUMONIA_CLASSES}")
    vector = [0.0] * len(CHEXPERT_CLASSES)
    vector[CHEXPERT_CLASSES.index("No Finding" if finding == "normal" else "Pneumonia")] = 1.0
    return vector


def _generate_examples(shards: list[pd.DataFrame], root: str) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False):
            yield {
                "image": os.path.join(root, row.image),
                "text": "",
                "labels": pediatric_label_vector(row.label),
                "finding": PEDIATRIC_PNEUMONIA_CLASSES.index(row.label),
                "image_id": row.image,
                "study_id": row.image,
                "patient_id": row.patient_id,
            }


def build_pediatric_pneumonia(root: str | os.PathLike, *, num_shards: int = 16) -> IterableDataset:
    """Streams the pediatric X-rays with their CheXpert label vector, class and (randomised) patient id.

    Args:
        root: the folder with `metadata.csv` and the image folders.
        num_shards: shards of the stream.
    """
    root = require_file(root, "pediatric pneumonia folder")
    index = read_index(require_file(root / "metadata.csv", "pediatric pneumonia metadata"), REQUIRED_COLUMNS,
                       dtype={"patient_id": str})  # fmt: skip
    unknown = sorted(set(index["label"]) - set(PEDIATRIC_PNEUMONIA_CLASSES))
    if unknown:
        raise ValueError(f"{root / 'metadata.csv'} has unknown label(s) {unknown}; expected {PEDIATRIC_PNEUMONIA_CLASSES}")
    if len(index) and not (root / index["image"].iloc[0]).is_file():
        raise FileNotFoundError(f"pediatric pneumonia image not found: {root / index['image'].iloc[0]}")
    features = example_features(extra={"finding": ClassLabel(names=list(PEDIATRIC_PNEUMONIA_CLASSES))})
    return stream_from_index(index.loc[:, list(REQUIRED_COLUMNS)], _generate_examples, features, num_shards,
                             root=str(root))  # fmt: skip
