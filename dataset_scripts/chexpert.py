"""CheXpert (Irvin et al. 2019), full or `-small` release. Image-only: `text` is `""`.

Expected layout::

    root/                                   # e.g. CheXpert-v1.0-small/
        train.csv, valid.csv                # Path, Sex, Age, Frontal/Lateral, AP/PA, the 14 CheXpert columns
        train/patient00001/study1/view1_frontal.jpg
        valid/...

The `Path` column starts with the release folder name (`CheXpert-v1.0-small/train/...`); when that first component
is `root`'s own name it is dropped, and the path is resolved against `root`. Label cells are 1 / 0 / -1 (uncertain) / blank (not mentioned).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import PurePosixPath

import pandas as pd
from datasets import IterableDataset

from modeling_medclip.labeler import CHEXPERT_CLASSES

from .generic import chexpert_label_vector, example_features, read_index, require_file, stream_from_index


SPLITS = ("train", "valid")


def _generate_examples(shards: list[pd.DataFrame], image_root: str, uncertain: str) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False, name=None):
            path, *values = row
            parts = PurePosixPath(path).parts
            yield {
                "image": os.path.join(image_root, *parts),
                "text": "",
                "labels": chexpert_label_vector(values, uncertain),
                "image_id": "/".join(parts[-3:]),
                "study_id": "/".join(parts[-3:-1]),
                "patient_id": parts[-3],
            }


def build_chexpert(
    root: str | os.PathLike,
    *,
    split: str = "train",
    frontal_only: bool = True,
    uncertain: str = "positive",
    num_shards: int = 64,
) -> IterableDataset:
    """Streams CheXpert images with their labels.

    Args:
        root: the release folder holding `train.csv` / `valid.csv`.
        split: `"train"` or `"valid"`.
        frontal_only: keep only rows whose `Frontal/Lateral` is `Frontal`.
        uncertain: policy for uncertain (-1) labels: `"positive"` (U-Ones), `"negative"` (U-Zeros) or `"ignore"` (NaN, masked by the semantic matching loss).
        num_shards: shards of the stream.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = require_file(root, "CheXpert folder")
    csv_path = require_file(root / f"{split}.csv", f"CheXpert {split} CSV")
    index = read_index(csv_path, ("Path", "Frontal/Lateral", *CHEXPERT_CLASSES))
    if frontal_only:
        index = index[index["Frontal/Lateral"] == "Frontal"]
    if len(index) == 0:
        raise ValueError(f"{csv_path} has no {'frontal ' if frontal_only else ''}rows")
    # Paths start with the release folder (`CheXpert-v1.0-small/train/...`): make them relative to `root`.
    if PurePosixPath(index["Path"].iloc[0]).parts[0] == root.name:
        index = index.assign(Path=[str(PurePosixPath(*PurePosixPath(path).parts[1:])) for path in index["Path"]])
    if not (root / index["Path"].iloc[0]).exists():
        raise FileNotFoundError(f"CheXpert image not found: {root / index['Path'].iloc[0]} (listed in {csv_path})")
    return stream_from_index(
        index.loc[:, ["Path", *CHEXPERT_CLASSES]],
        _generate_examples,
        example_features(),
        num_shards,
        image_root=str(root),
        uncertain=uncertain,
    )
