"""Indiana University chest X-ray reports (Open-i), in the CSV layout of `shared/data/iu-xray-reports/`.

Expected layout::

    root/
        reports.csv     # uid, text, problems, frontal_images, mesh_no_finding, ..., mesh_support_devices
    images_dir/         # optional: the Kaggle `images_normalized/` folder (1_IM-0001-4001.dcm.png, ...)

Without `images_dir` the stream is text-only (`image` is `None`), e.g. the text stream of MedCLIP's decoupled
batches. `labels` come from our `CheXpertLabeler` run on `text`; the MeSH-derived labels of the human coders are in
`mesh_labels` (`None` for the reports coded `No Indexing`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import pandas as pd
from datasets import IterableDataset, List, Value

from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler

from .generic import example_features, read_index, require_file, stream_from_index


MESH_COLUMNS = tuple("mesh_" + name.lower().replace(" ", "_") for name in CHEXPERT_CLASSES)


def _mesh_vector(values: tuple) -> list[float] | None:
    if any(value is None or (isinstance(value, float) and math.isnan(value)) for value in values):
        return None
    return [float(value) for value in values]


def _generate_examples(shards: list[pd.DataFrame], images_dir: str | None, uncertain: str) -> Iterator[dict]:
    labeler = CheXpertLabeler()
    for shard in shards:
        for row in shard.to_dict("records"):
            frontal = row["frontal_images"].split(";")[0] if isinstance(row["frontal_images"], str) else ""
            yield {
                "image": os.path.join(images_dir, frontal) if images_dir and frontal else None,
                "text": row["text"],
                "labels": labeler.label_vector(row["text"], uncertain=uncertain) if row["text"].strip() else None,
                "mesh_labels": _mesh_vector(tuple(row[column] for column in MESH_COLUMNS)),
                "image_id": frontal,
                "study_id": str(row["uid"]),
                "patient_id": str(row["uid"]),
            }


def build_iu_xray(
    root: str | os.PathLike,
    *,
    images_dir: str | os.PathLike | None = None,
    drop_empty_text: bool = True,
    require_image: bool = False,
    uncertain: str = "positive",
    num_shards: int = 16,
) -> IterableDataset:
    """Streams the IU X-ray reports (one example per report; `study_id` = `patient_id` = `uid`).

    Args:
        root: folder with `reports.csv`.
        images_dir: folder of the Kaggle PNGs; `image` is then the report's first frontal image.
        drop_empty_text: drop the 25 reports with neither findings nor impression.
        require_image: drop the reports without a frontal image name.
        uncertain: labeler policy for uncertain mentions: `"positive"`, `"negative"` or `"ignore"`.
        num_shards: shards of the stream.
    """
    root = require_file(root, "IU X-ray reports folder")
    if images_dir is not None:
        images_dir = require_file(images_dir, "IU X-ray images folder")
    index = read_index(
        require_file(root / "reports.csv", "IU X-ray reports CSV"),
        ("uid", "text", "frontal_images", *MESH_COLUMNS),
        keep_default_na=False,
        na_values={column: [""] for column in MESH_COLUMNS},
    )
    index["text"] = index["text"].astype(str)
    if drop_empty_text:
        index = index[index["text"].str.strip() != ""]
    if require_image:
        index = index[index["frontal_images"].astype(str).str.strip() != ""]
    features = example_features(extra={"mesh_labels": List(Value("float32"), length=len(CHEXPERT_CLASSES))})
    return stream_from_index(
        index.loc[:, ["uid", "text", "frontal_images", *MESH_COLUMNS]],
        _generate_examples,
        features,
        num_shards,
        images_dir=str(images_dir) if images_dir is not None else None,
        uncertain=uncertain,
    )
