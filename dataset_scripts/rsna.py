"""RSNA Pneumonia Detection Challenge (Kaggle 2018). Image-only: `text` is `""`.

Expected layout::

    root/
        stage_2_train_labels.csv          # patientId, x, y, width, height, Target (one row per box; x..height
                                          # blank for Target 0)
        stage_2_train_images/<patientId>.dcm   # DICOM as distributed, or .png / .jpg / .jpeg conversions

One example per image: `labels` is the class id over `RSNA_CLASSES` (1 if any box), `boxes` the opacity boxes as
`[x, y, width, height]` in pixels of the original 1024 x 1024 image. DICOM is decoded by the collator (pydicom).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pandas as pd
from datasets import IterableDataset, List, Value

from .generic import example_features, read_index, require_file, stream_from_index


RSNA_CLASSES = ("Normal", "Pneumonia")
IMAGE_SUFFIXES = (".dcm", ".png", ".jpg", ".jpeg")


def _generate_examples(shards: list[pd.DataFrame], images_dir: str, suffix: str) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False):
            yield {
                "image": os.path.join(images_dir, row.patientId + suffix),
                "text": "",
                "labels": int(row.Target),
                "image_id": row.patientId,
                "study_id": row.patientId,
                "patient_id": row.patientId,
                "boxes": row.boxes,
            }


def build_rsna_pneumonia(
    root: str | os.PathLike,
    *,
    labels_file: str = "stage_2_train_labels.csv",
    images_dir: str = "stage_2_train_images",
    num_shards: int = 32,
) -> IterableDataset:
    """Streams the RSNA pneumonia images with their class id and boxes.

    Args:
        root: the competition folder.
        labels_file, images_dir: names of the label CSV and the image folder inside `root`.
        num_shards: shards of the stream.
    """
    root = require_file(root, "RSNA pneumonia folder")
    index = read_index(
        require_file(root / labels_file, "RSNA pneumonia label CSV"), ("patientId", "x", "y", "width", "height", "Target")
    )
    images = require_file(root / images_dir, "RSNA pneumonia image folder")
    first = index["patientId"].iloc[0] if len(index) else ""
    suffix = next((suffix for suffix in IMAGE_SUFFIXES if (images / (first + suffix)).exists()), None)
    if suffix is None:
        raise FileNotFoundError(f"RSNA image of patientId {first!r} not found in {images} (tried {IMAGE_SUFFIXES})")
    positive = index[index["Target"] == 1]
    boxes = positive.groupby("patientId", sort=False)[["x", "y", "width", "height"]].apply(
        lambda rows: rows.astype(float).values.tolist()
    )
    index = index.groupby("patientId", sort=False, as_index=False)["Target"].max()
    index["boxes"] = [boxes.get(patient_id, []) for patient_id in index["patientId"]]
    features = example_features(RSNA_CLASSES, extra={"boxes": List(List(Value("float32"), length=4))})
    return stream_from_index(index, _generate_examples, features, num_shards, images_dir=str(images), suffix=suffix)
