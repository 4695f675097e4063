"""Streaming builders for the public chest X-ray corpora, decoupled / paired batching and a parquet converter.

Every builder returns a sharded `datasets.IterableDataset` of plain examples (see `generic.py` and README.md).
"""

from .chexpert import build_chexpert
from .covid_cxr import COVID_CXR_CLASSES, build_covid_cxr, patient_split
from .generic import build_image_csv, build_image_folder, build_parquet, chexpert_label_vector
from .iu_xray import build_iu_xray
from .mimic_cxr import build_mimic_cxr, extract_sections
from .pairing import DecoupledBatches, PairedBatches, report_sentences, sample_sentence
from .rsna import RSNA_CLASSES, build_rsna_pneumonia


BUILDERS = {
    "mimic_cxr": build_mimic_cxr,
    "chexpert": build_chexpert,
    "iu_xray": build_iu_xray,
    "covid_cxr": build_covid_cxr,
    "rsna": build_rsna_pneumonia,
    "image_folder": build_image_folder,
}
"""Builders that take a corpus folder as their first argument, by the name `to_parquet --builder` uses."""

__all__ = [
    "BUILDERS",
    "COVID_CXR_CLASSES",
    "RSNA_CLASSES",
    "DecoupledBatches",
    "PairedBatches",
    "build_chexpert",
    "build_covid_cxr",
    "build_image_csv",
    "build_image_folder",
    "build_iu_xray",
    "build_mimic_cxr",
    "build_parquet",
    "build_rsna_pneumonia",
    "chexpert_label_vector",
    "extract_sections",
    "patient_split",
    "report_sentences",
    "sample_sentence",
]
