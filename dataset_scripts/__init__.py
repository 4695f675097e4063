"""Streaming builders for the public chest X-ray corpora, their registry, training data sources, evaluation tasks,
decoupled / paired batching and a parquet converter.

Every builder returns a sharded `datasets.IterableDataset` of plain examples (see `generic.py`); `BUILDERS`
(`registry.py`) names them for both CLIs and `to_parquet`; `sources.py` turns `NAME=PATH` / `hub:org/name` into
training streams; `tasks.py` is the evaluation task registry.
"""

from .chexpert import build_chexpert
from .covid_cxr import COVID_CXR_CLASSES, build_covid_cxr
from .generic import build_image_csv, build_image_folder, build_parquet, chexpert_label_vector, patient_split
from .iu_xray import build_iu_xray
from .mimic_cxr import build_mimic_cxr, extract_sections
from .nih_cxr14 import NIH_CLASSES, NIH_TO_CHEXPERT, build_nih_cxr14
from .pairing import DecoupledBatches, PairedBatches, report_sentences, sample_sentence
from .paths import shared_data_dir
from .pediatric_pneumonia import PEDIATRIC_PNEUMONIA_CLASSES, build_pediatric_pneumonia
from .registry import BUILDERS, Builder, get_builder
from .rsna import RSNA_CLASSES, build_rsna_pneumonia

__all__ = [
    "BUILDERS",
    "COVID_CXR_CLASSES",
    "NIH_CLASSES",
    "NIH_TO_CHEXPERT",
    "PEDIATRIC_PNEUMONIA_CLASSES",
    "RSNA_CLASSES",
    "Builder",
    "DecoupledBatches",
    "PairedBatches",
    "build_chexpert",
    "build_covid_cxr",
    "build_image_csv",
    "build_image_folder",
    "build_iu_xray",
    "build_mimic_cxr",
    "build_nih_cxr14",
    "build_parquet",
    "build_pediatric_pneumonia",
    "build_rsna_pneumonia",
    "chexpert_label_vector",
    "extract_sections",
    "get_builder",
    "patient_split",
    "report_sentences",
    "sample_sentence",
    "shared_data_dir",
]
