"""MIMIC-CXR-JPG (Johnson et al. 2019, PhysioNet) with the free-text reports of MIMIC-CXR.

Expected layout (as downloaded from PhysioNet; the CSVs may be gzipped)::

    root/
        mimic-cxr-2.0.0-metadata.csv[.gz]   # dicom_id, subject_id, study_id, ViewPosition, ...
        mimic-cxr-2.0.0-chexpert.csv[.gz]   # subject_id, study_id, the 14 CheXpert columns (1 / 0 / -1 / blank)
        mimic-cxr-2.0.0-split.csv[.gz]      # dicom_id, study_id, subject_id, split (train / validate / test)
        files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports_dir/                            # defaults to root; the unzipped mimic-cxr-reports.zip
        files/p10/p10000032/s50414267.txt

`text` is the FINDINGS and IMPRESSION sections of the study's report (the whole report when it has neither);
a study whose report file is missing gets `text=""` and a warning (the collator skips empty texts).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence

import pandas as pd
from datasets import IterableDataset

from modeling_medclip.labeler import CHEXPERT_CLASSES

from .generic import chexpert_label_vector, example_features, find_file, read_index, require_file, stream_from_index


logger = logging.getLogger(__name__)

METADATA_FILES = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")
CHEXPERT_FILES = ("mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-chexpert.csv.gz")
SPLIT_FILES = ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-split.csv.gz")
FRONTAL_VIEWS = ("PA", "AP")
SPLITS = ("train", "validate", "test")
_SECTION_HEADER = re.compile(r"^\s*([A-Z][A-Z /&]+):", re.MULTILINE)


def extract_sections(report: str, sections: Sequence[str] = ("findings", "impression")) -> str:
    """The named sections of a MIMIC-CXR report (headers such as `FINDINGS:`), joined with a space and whitespace
    collapsed; the whole report when none of them is present."""
    headers = list(_SECTION_HEADER.finditer(report))
    wanted = {section.lower() for section in sections}
    parts = []
    for header, following in zip(headers, headers[1:] + [None]):
        if header.group(1).strip().lower() in wanted:
            parts.append(report[header.end() : following.start() if following else len(report)])
    return " ".join(" ".join(parts if parts else [report]).split())


def _study_folder(subject_id: int, study_id: int) -> str:
    subject = str(subject_id)
    return os.path.join("files", f"p{subject[:2]}", f"p{subject}", f"s{study_id}")


def _generate_examples(
    shards: list[pd.DataFrame], root: str, reports_dir: str, sections: tuple[str, ...], uncertain: str
) -> Iterator[dict]:
    for shard in shards:
        for row in shard.itertuples(index=False):
            folder = _study_folder(row.subject_id, row.study_id)
            report_path = os.path.join(reports_dir, folder + ".txt")
            try:
                with open(report_path, encoding="utf-8") as file:
                    text = extract_sections(file.read(), sections)
            except FileNotFoundError:
                logger.warning("MIMIC-CXR report not found: %s", report_path)
                text = ""
            yield {
                "image": os.path.join(root, folder, f"{row.dicom_id}.jpg"),
                "text": text,
                "labels": chexpert_label_vector([getattr(row, f"label_{i}") for i in range(len(CHEXPERT_CLASSES))], uncertain),
                "image_id": row.dicom_id,
                "study_id": str(row.study_id),
                "patient_id": str(row.subject_id),
            }


def build_mimic_cxr(
    root: str | os.PathLike,
    *,
    split: str | None = "train",
    reports_dir: str | os.PathLike | None = None,
    frontal_only: bool = True,
    uncertain: str = "positive",
    sections: Sequence[str] = ("findings", "impression"),
    num_shards: int = 64,
) -> IterableDataset:
    """Streams MIMIC-CXR-JPG images with their report text and CheXpert labels.

    Args:
        root: the MIMIC-CXR-JPG folder (see the module docstring).
        split: `"train"`, `"validate"`, `"test"` (official split CSV) or `None` for all images.
        reports_dir: folder holding `files/.../s<study_id>.txt` (default: `root`).
        frontal_only: keep only `ViewPosition` PA and AP images.
        uncertain: policy for uncertain (-1) labels: `"positive"`, `"negative"` or `"ignore"` (see
            `generic.chexpert_label_vector`). Studies absent from the CheXpert CSV get all-zero labels.
        sections: report sections that make up `text`.
        num_shards: shards of the stream.
    """
    root = require_file(root, "MIMIC-CXR-JPG folder")
    reports_dir = require_file(reports_dir if reports_dir is not None else root, "MIMIC-CXR reports folder")
    index = read_index(
        find_file(root, METADATA_FILES, "MIMIC-CXR-JPG metadata CSV"),
        ("dicom_id", "subject_id", "study_id", "ViewPosition"),
        usecols=lambda column: column in ("dicom_id", "subject_id", "study_id", "ViewPosition"),
    )
    if frontal_only:
        index = index[index["ViewPosition"].isin(FRONTAL_VIEWS)]
    if split is not None:
        if split not in SPLITS:
            raise ValueError(f"split must be None or one of {SPLITS}, got {split!r}")
        splits = read_index(find_file(root, SPLIT_FILES, "MIMIC-CXR-JPG split CSV"), ("dicom_id", "split"))
        index = index[index["dicom_id"].isin(splits.loc[splits["split"] == split, "dicom_id"])]
    labels = read_index(find_file(root, CHEXPERT_FILES, "MIMIC-CXR-JPG CheXpert label CSV"), ("study_id", *CHEXPERT_CLASSES))
    labels = labels.loc[:, ["study_id", *CHEXPERT_CLASSES]]
    labels.columns = ["study_id", *(f"label_{i}" for i in range(len(CHEXPERT_CLASSES)))]
    index = index.merge(labels, on="study_id", how="left")
    return stream_from_index(
        index.drop(columns="ViewPosition"),
        _generate_examples,
        example_features(),
        num_shards,
        root=str(root),
        reports_dir=str(reports_dir),
        sections=tuple(sections),
        uncertain=uncertain,
    )
