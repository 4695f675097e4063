"""The COVID-19 image data collection (Cohen et al. 2020) in the layout of `shared/data/covid-cxr/`.

Expected layout::

    root/
        metadata.csv          # file_name, text, finding, is_covid19, is_no_finding, patient_id, view, ...
        images/<stem>.jpg     # file_name is relative to root

`labels` is a class id over `COVID_CXR_CLASSES`; the source `finding` string is kept in `finding`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from datasets import IterableDataset, Value

from .generic import example_features, patient_split, read_index, require_file, stream_from_index


COVID_CXR_CLASSES = ("COVID-19", "Other pneumonia", "No Finding")
REQUIRED_COLUMNS = ("file_name", "text", "finding", "is_covid19", "is_no_finding", "patient_id")


def _generate_examples(shards: list[pd.DataFrame], root: str) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False):
            if row.is_covid19:
                class_id = 0
            elif row.is_no_finding:
                class_id = 2
            else:
                class_id = 1
            yield {
                "image": os.path.join(root, row.file_name),
                "text": row.text,
                "labels": class_id,
                "image_id": Path(row.file_name).stem,
                "study_id": Path(row.file_name).stem,
                "patient_id": str(row.patient_id),
                "finding": row.finding,
            }


def build_covid_cxr(
    root: str | os.PathLike,
    *,
    split: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    require_text: bool = False,
    num_shards: int = 8,
) -> IterableDataset:
    """Streams the collection.

    Args:
        root: folder with `metadata.csv` and `images/`.
        split: `None` for all rows, or `"train"` / `"test"` of `patient_split(test_size, seed)`.
        require_text: keep only images with a non-empty clinical note (384 of the 495 shared images).
        num_shards: shards of the stream (DataLoader workers and processes split by shard).
    """
    root = require_file(root, "COVID-19 image collection folder")
    index = read_index(
        require_file(root / "metadata.csv", "COVID-19 collection metadata"),
        REQUIRED_COLUMNS,
        dtype={"patient_id": str},
        keep_default_na=False,
    )
    index["text"] = index["text"].astype(str)
    if split is not None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be None, 'train' or 'test', got {split!r}")
        train_indices, test_indices = patient_split(index["patient_id"], test_size=test_size, seed=seed)
        index = index.iloc[train_indices if split == "train" else test_indices]
    if require_text:
        index = index[index["text"].str.strip() != ""]
    return stream_from_index(
        index.loc[:, list(REQUIRED_COLUMNS)],
        _generate_examples,
        example_features(COVID_CXR_CLASSES, extra={"finding": Value("string")}),
        num_shards,
        root=str(root),
    )
