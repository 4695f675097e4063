"""Shared pieces of the streaming dataset builders, and the generic image folder / CSV / parquet builders.

Every builder returns a `datasets.IterableDataset` of plain examples::

    {"image": str | bytes | None,     # a file path (or embedded bytes after `to_parquet`); never decoded here
     "text": str,                     # report / note ("" when the corpus has none)
     "labels": list[float] | int,     # 14 CheXpert-order floats, or a class id
     "image_id": str, "study_id": str, "patient_id": str}

Only the *index* of a corpus (its CSV metadata) is read when a builder is called. It is cut into `num_shards`
pandas shards that are passed to `IterableDataset.from_generator(..., gen_kwargs={"shards": [...]})`, so DataLoader
workers and `datasets.distributed.split_dataset_by_node` can split the stream by shard. Images are decoded later, by
`modeling_medclip.collator.MedCLIPCollator` inside the DataLoader workers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import ClassLabel, Features, IterableDataset, List, Value, load_dataset
from sklearn.model_selection import GroupShuffleSplit

from modeling_medclip.labeler import CHEXPERT_CLASSES, labels_to_vector


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".dcm")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Returns `path` as a `Path`, or raises `FileNotFoundError` naming the missing file and what it should hold."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def find_file(root: Path, names: Sequence[str], what: str) -> Path:
    """The first of `names` (e.g. `x.csv`, `x.csv.gz`) that exists under `root`; raises naming all of them otherwise."""
    for name in names:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(f"{what} not found in {root}: expected one of {', '.join(names)}")


def read_index(path: Path, required_columns: Iterable[str], **read_csv_kwargs) -> pd.DataFrame:
    """Reads a CSV index and raises `ValueError` naming the file and every missing column."""
    frame = pd.read_csv(path, **read_csv_kwargs)
    missing = [column for column in required_columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} is missing column(s) {missing}; it has {list(frame.columns)}")
    return frame


def patient_split(
    patient_ids: Sequence[str], *, test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patient-disjoint split: returns (train_indices, test_indices) into `patient_ids`.

    Every row of a patient lands on the same side; `test_size` is the fraction of *patients* held out.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    groups = np.asarray([str(patient_id) for patient_id in patient_ids])
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train_indices, test_indices = next(splitter.split(groups, groups=groups))
    return np.sort(train_indices), np.sort(test_indices)


def chexpert_label_vector(values: Sequence, uncertain: str = "positive") -> list[float]:
    """Maps the 14 CheXpert-style label cells of a CSV row (1 / 0 / -1 / blank) to 14 floats.

    Same policy as `CheXpertLabeler.label_vector`: blank (NaN, "not mentioned") and 0 become 0.0, 1 becomes 1.0, and
    an uncertain -1 becomes 1.0 for `"positive"` (U-Ones), 0.0 for `"negative"` (U-Zeros) and NaN for `"ignore"`
    (masked by the semantic matching loss)."""
    if len(values) != len(CHEXPERT_CLASSES):
        raise ValueError(f"expected {len(CHEXPERT_CLASSES)} CheXpert label values, got {len(values)}")
    labels = {
        name: None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
        for name, value in zip(CHEXPERT_CLASSES, values)
    }
    return labels_to_vector(labels, uncertain=uncertain)


def example_features(class_names: Sequence[str] | None = None, extra: dict | None = None) -> Features:
    """Features of a builder's examples: CheXpert-14 float labels, or a `ClassLabel` when `class_names` is given.

    All string columns are `string` (not `large_string`), so streams from different builders can be interleaved.
    """
    labels = ClassLabel(names=list(class_names)) if class_names else List(Value("float32"), length=len(CHEXPERT_CLASSES))
    features = {
        "image": Value("string"),
        "text": Value("string"),
        "labels": labels,
        "image_id": Value("string"),
        "study_id": Value("string"),
        "patient_id": Value("string"),
    }
    features.update(extra or {})
    return Features(features)


def shard_frame(frame: pd.DataFrame, num_shards: int) -> list[pd.DataFrame]:
    """Cuts an index into at most `num_shards` contiguous, non-empty shards (copies, so each pickles on its own)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    num_shards = max(1, min(num_shards, len(frame)))
    bounds = [round(i * len(frame) / num_shards) for i in range(num_shards + 1)]
    return [frame.iloc[start:stop].reset_index(drop=True).copy() for start, stop in zip(bounds[:-1], bounds[1:])]


def stream_from_index(
    index: pd.DataFrame,
    generate_examples: Callable[..., Iterator[dict]],
    features: Features,
    num_shards: int,
    **generate_kwargs,
) -> IterableDataset:
    """A sharded `IterableDataset` whose generator `generate_examples(shards, **generate_kwargs)` turns index rows
    into examples. Raises `ValueError` if the index is empty."""
    if len(index) == 0:
        raise ValueError("the corpus index is empty after filtering: no examples to stream")
    return IterableDataset.from_generator(
        generate_examples,
        features=features,
        gen_kwargs={"shards": shard_frame(index, num_shards), **generate_kwargs},
    )


def _generate_from_records(shards: list[pd.DataFrame]) -> Iterator[dict]:
    for shard in shards:
        yield from shard.to_dict("records")


def build_image_folder(root: str | os.PathLike, *, num_shards: int = 16) -> IterableDataset:
    """Streams `root/<class_name>/**/<image>` (any of `IMAGE_EXTENSIONS`); `labels` is the class id.

    Unlike a streamed `load_dataset("imagefolder")`, which has a single shard so only one DataLoader worker reads it,
    the file list is cut into `num_shards` shards. Class ids follow the sorted class folder names.
    """
    root = require_file(root, "image folder")
    class_names = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not class_names:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class_name>/<image>)")
    rows = []
    for class_id, class_name in enumerate(class_names):
        for path in sorted((root / class_name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                image_id = str(path.relative_to(root))
                rows.append(
                    {"image": str(path), "text": "", "labels": class_id, "image_id": image_id,
                     "study_id": image_id, "patient_id": image_id}
                )
    if not rows:
        raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {root}")
    return stream_from_index(pd.DataFrame(rows), _generate_from_records, example_features(class_names), num_shards)


def build_image_csv(
    csv_path: str | os.PathLike,
    *,
    image_column: str = "image",
    text_column: str | None = "text",
    label_columns: Sequence[str] | None = None,
    class_column: str | None = None,
    id_column: str | None = None,
    patient_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    uncertain: str = "positive",
    num_shards: int = 16,
) -> IterableDataset:
    """Streams a CSV with one row per image.

    Args:
        csv_path: the CSV; image paths in `image_column` are relative to `image_root` (default: the CSV's folder).
        text_column: column with the report / caption, or `None` for image-only data.
        label_columns: the 14 CheXpert columns in `CHEXPERT_CLASSES` order (values 1 / 0 / -1 / blank), or
        class_column: a column of class names; `labels` becomes a class id over its sorted unique values.
        id_column, patient_column: columns for `image_id` / `patient_id` (default: the image path).
    """
    csv_path = require_file(csv_path, "CSV index")
    image_root = Path(image_root) if image_root is not None else csv_path.parent
    if label_columns is not None and len(label_columns) != len(CHEXPERT_CLASSES):
        raise ValueError(f"label_columns must name {len(CHEXPERT_CLASSES)} columns, got {len(label_columns)}")
    required = [image_column, *(label_columns or [])]
    required += [column for column in (text_column, class_column, id_column, patient_column) if column]
    frame = read_index(csv_path, required, dtype={image_column: str})
    class_names = sorted(frame[class_column].astype(str).unique()) if class_column else None
    index = pd.DataFrame(
        {
            "image": [str(image_root / name) for name in frame[image_column]],
            "text": frame[text_column].fillna("").astype(str) if text_column else "",
            "image_id": frame[id_column].astype(str) if id_column else frame[image_column],
            "patient_id": frame[patient_column].astype(str) if patient_column else frame[image_column],
        }
    )
    index["study_id"] = index["image_id"]
    if class_column:
        index["labels"] = frame[class_column].astype(str).map({name: i for i, name in enumerate(class_names)})
    elif label_columns:
        index["labels"] = [chexpert_label_vector(row, uncertain) for row in frame[list(label_columns)].itertuples(index=False)]
    else:
        raise ValueError("build_image_csv needs label_columns (14 CheXpert columns) or class_column")
    return stream_from_index(index, _generate_from_records, example_features(class_names), num_shards)


def build_parquet(data_files: str | Sequence[str], *, split: str = "train") -> IterableDataset:
    """Streams parquet shards written by `dataset_scripts.to_parquet` (or pulled from a Hub dataset repo).

    Each parquet file is one shard. Shuffle such a stream with `max_buffer_input_shards=1` (see the README: with
    several input shards, datasets 5.2 waits `SLEEP_TIME_ON_THREADS_SHUTDOWN` = 5 s at the end of every pass).
    """
    return load_dataset("parquet", data_files={split: data_files}, split=split, streaming=True)
