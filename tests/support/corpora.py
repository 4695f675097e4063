"""Small corpora in each builder's own layout (real JPEG files, made-up labels), written into a test's tmp_path."""

import numpy as np
import pandas as pd
import PIL.Image

from modeling_medclip.labeler import CHEXPERT_CLASSES
from modeling_medclip.prompts import CHEXPERT_COMPETITION_CLASSES

REPORTS = [
    "FINDINGS: The heart is enlarged. IMPRESSION: Cardiomegaly.",
    "FINDINGS: Small bilateral pleural effusions. IMPRESSION: Effusions.",
    "FINDINGS: Lungs are clear. IMPRESSION: No acute cardiopulmonary process.",
    "FINDINGS: Patchy opacity in the right lower lobe. IMPRESSION: Pneumonia.",
    "FINDINGS: Mild pulmonary edema. IMPRESSION: Edema.",
]


def write_image(path, seed: int, size=(48, 40)) -> None:
    """A real grayscale JPEG / PNG with random content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size[::-1], dtype=np.uint8)
    PIL.Image.fromarray(pixels, mode="L").save(path)


def _one_finding_labels(count: int) -> dict[str, list[float]]:
    """CheXpert columns where row i has exactly one competition finding (cycling), blank elsewhere."""
    labels = {name: [np.nan] * count for name in CHEXPERT_CLASSES}
    for i in range(count):
        labels[CHEXPERT_COMPETITION_CLASSES[i % 5]][i] = 1.0
    return labels


def write_chexpert(root, count: int = 20):
    """`root/train.csv` and `root/train/patientXXXXX/study1/view1_frontal.jpg`, one image per patient."""
    paths = [f"{root.name}/train/patient{i:05d}/study1/view1_frontal.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        write_image(root.parent / path, i)
    pd.DataFrame({"Path": paths, "Frontal/Lateral": "Frontal", **_one_finding_labels(count)}).to_csv(
        root / "train.csv", index=False
    )
    return root


def write_mimic(root, count: int = 20):
    """The MIMIC-CXR-JPG CSVs, one frontal image and one report per study, two studies per patient."""
    subjects = [10000000 + i // 2 for i in range(count)]
    studies = [50000000 + i for i in range(count)]
    dicoms = [f"d{i}" for i in range(count)]
    pd.DataFrame({"dicom_id": dicoms, "subject_id": subjects, "study_id": studies, "ViewPosition": "PA"}).to_csv(
        root / "mimic-cxr-2.0.0-metadata.csv", index=False
    )
    pd.DataFrame({"dicom_id": dicoms, "study_id": studies, "subject_id": subjects, "split": "train"}).to_csv(
        root / "mimic-cxr-2.0.0-split.csv", index=False
    )
    pd.DataFrame({"subject_id": subjects, "study_id": studies, **_one_finding_labels(count)}).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv", index=False
    )
    for i, (subject, study, dicom) in enumerate(zip(subjects, studies, dicoms)):
        folder = root / "files" / f"p{str(subject)[:2]}" / f"p{subject}"
        write_image(folder / f"s{study}" / f"{dicom}.jpg", i)
        (folder / f"s{study}.txt").write_text(REPORTS[i % len(REPORTS)])
    return root


def write_rsna(root, count: int = 12):
    """`stage_2_train_labels.csv` and PNG images, every third patient positive."""
    ids = [f"rsna{i:03d}" for i in range(count)]
    for i, patient in enumerate(ids):
        write_image(root / "stage_2_train_images" / f"{patient}.png", i)
    positive = [i % 3 == 0 for i in range(count)]
    pd.DataFrame(
        {"patientId": ids, "x": [10.0 if p else np.nan for p in positive], "y": [10.0 if p else np.nan for p in positive],
         "width": [20.0 if p else np.nan for p in positive], "height": [20.0 if p else np.nan for p in positive],
         "Target": [int(p) for p in positive]}
    ).to_csv(root / "stage_2_train_labels.csv", index=False)  # fmt: skip
    return root


def write_image_csv(root, count: int = 12):
    """`root/labels.csv` (image, label, patient_id, text) and its images: a user's own labelled list."""
    rows = []
    for i in range(count):
        write_image(root / "images" / f"x{i}.jpg", i)
        rows.append({"image": f"images/x{i}.jpg", "label": ["Edema", "Normal"][i % 2], "patient_id": f"p{i // 2}",
                     "text": REPORTS[i % len(REPORTS)]})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"
