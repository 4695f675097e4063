"""Streaming builders, the parquet converter, resumable positions and the shared collator."""

import glob
import logging
import os

import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
from datasets import load_dataset

from dataset_scripts import (
    BUILDERS,
    NIH_CLASSES,
    PEDIATRIC_PNEUMONIA_CLASSES,
    build_chexpert,
    build_covid_cxr,
    build_image_csv,
    build_image_folder,
    build_iu_xray,
    build_mimic_cxr,
    build_nih_cxr14,
    build_parquet,
    build_pediatric_pneumonia,
    build_rsna_pneumonia,
    extract_sections,
    patient_split,
)
from dataset_scripts.to_parquet import main as to_parquet_main
from dataset_scripts.to_parquet import write_parquet_shards
from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.collator import MedCLIPCollator
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor
from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler


# ---------------------------------------------------------------------------------------------------------------
# Real shared data
# ---------------------------------------------------------------------------------------------------------------


def test_covid_cxr_streams_all_images(covid_cxr_dir):
    metadata = pd.read_csv(covid_cxr_dir / "metadata.csv", keep_default_na=False)
    dataset = build_covid_cxr(covid_cxr_dir, num_shards=8)
    assert dataset.num_shards == 8
    rows = list(dataset)
    assert len(rows) == len(metadata) == 495
    assert [row["image"] for row in rows] == [str(covid_cxr_dir / name) for name in metadata["file_name"]]
    assert all(os.path.isfile(row["image"]) for row in rows)
    expected = np.where(metadata["is_covid19"] == 1, 0, np.where(metadata["is_no_finding"] == 1, 2, 1))
    assert [row["labels"] for row in rows] == expected.tolist()
    assert [row["patient_id"] for row in rows] == metadata["patient_id"].astype(str).tolist()
    assert sum(1 for row in build_covid_cxr(covid_cxr_dir, require_text=True)) == 384


def test_patient_split_is_disjoint_and_seeded(covid_cxr_dir):
    patients = pd.read_csv(covid_cxr_dir / "metadata.csv", dtype={"patient_id": str})["patient_id"]
    train, test = patient_split(patients, test_size=0.25, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(patients)))
    assert not set(patients.iloc[train]) & set(patients.iloc[test])
    assert abs(patients.iloc[test].nunique() / patients.nunique() - 0.25) < 0.02
    again, _ = patient_split(patients, test_size=0.25, seed=3)
    other, _ = patient_split(patients, test_size=0.25, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)

    train_rows = list(build_covid_cxr(covid_cxr_dir, split="train", test_size=0.25, seed=3))
    test_rows = list(build_covid_cxr(covid_cxr_dir, split="test", test_size=0.25, seed=3))
    assert len(train_rows) + len(test_rows) == 495
    assert not {row["patient_id"] for row in train_rows} & {row["patient_id"] for row in test_rows}


def test_iu_xray_text_stream_with_labeler_and_mesh_labels(iu_reports_dir):
    reports = pd.read_csv(iu_reports_dir / "reports.csv", keep_default_na=False)
    kept = reports[reports["text"].str.strip() != ""]
    dataset = build_iu_xray(iu_reports_dir, num_shards=4)
    assert dataset.num_shards == 4
    rows = list(dataset)
    assert len(rows) == len(kept) == 3851 - 25
    assert all(row["image"] is None for row in rows)
    labeler = CheXpertLabeler()
    for row in rows[:50]:
        assert row["labels"] == labeler.label_vector(row["text"])
    no_indexing = set(kept.loc[kept["problems"] == "No Indexing", "uid"].astype(str))
    assert {row["study_id"] for row in rows if row["mesh_labels"] is None} == no_indexing
    normal = next(row for row in rows if row["study_id"] == "1")
    assert normal["mesh_labels"] == [1.0] + [0.0] * 13
    assert normal["image_id"] == "1_IM-0001-4001.dcm.png"


def test_builder_state_dict_resumes_exactly_the_remaining_examples(covid_cxr_dir):
    dataset = build_covid_cxr(covid_cxr_dir, num_shards=8)
    full = [row["image_id"] for row in dataset]
    seen = []
    for row in dataset:
        seen.append(row["image_id"])
        if len(seen) == 100:
            state = dataset.state_dict()
            break
    resumed = build_covid_cxr(covid_cxr_dir, num_shards=8)
    resumed.load_state_dict(state)
    assert seen + [row["image_id"] for row in resumed] == full


# ---------------------------------------------------------------------------------------------------------------
# Folder layouts written in the test
# ---------------------------------------------------------------------------------------------------------------


def _write_jpeg(path, value=128, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full(size[::-1], value, dtype=np.uint8), mode="L").save(path, quality=90)


def _mimic_fixture(root):
    metadata = pd.DataFrame(
        {
            "dicom_id": ["d1", "d2", "d3", "d4"],
            "subject_id": [10000032, 10000032, 11000001, 12000002],
            "study_id": [50000001, 50000001, 50000002, 50000003],
            "ViewPosition": ["PA", "LATERAL", "AP", "PA"],
        }
    )
    metadata.to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(
        {"dicom_id": ["d1", "d2", "d3", "d4"], "study_id": metadata["study_id"], "subject_id": metadata["subject_id"],
         "split": ["train", "train", "train", "test"]}
    ).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    labels = {name: [np.nan, np.nan, np.nan] for name in CHEXPERT_CLASSES}
    labels["Cardiomegaly"] = [1.0, -1.0, np.nan]
    labels["Edema"] = [0.0, 1.0, -1.0]
    pd.DataFrame({"subject_id": [10000032, 11000001, 12000002], "study_id": [50000001, 50000002, 50000003], **labels}).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv", index=False
    )
    report = "FINAL REPORT\n INDICATION: cough.\n\n FINDINGS: Heart is enlarged.\n\n IMPRESSION: Cardiomegaly.\n"
    (root / "files/p10/p10000032").mkdir(parents=True)
    (root / "files/p10/p10000032/s50000001.txt").write_text(report)
    return metadata


def test_mimic_cxr_layout(tmp_path, caplog):
    _mimic_fixture(tmp_path)
    with caplog.at_level(logging.WARNING):
        rows = list(build_mimic_cxr(tmp_path, split="train", uncertain="positive"))
    assert [row["image_id"] for row in rows] == ["d1", "d3"]  # d2 is lateral, d4 is in the test split
    first, second = rows
    assert first["image"] == str(tmp_path / "files/p10/p10000032/s50000001/d1.jpg")
    assert first["text"] == "Heart is enlarged. Cardiomegaly."
    assert first["study_id"] == "50000001" and first["patient_id"] == "10000032"
    cardiomegaly, edema = CHEXPERT_CLASSES.index("Cardiomegaly"), CHEXPERT_CLASSES.index("Edema")
    assert first["labels"][cardiomegaly] == 1.0 and first["labels"][edema] == 0.0
    assert second["labels"][cardiomegaly] == 1.0 and second["labels"][edema] == 1.0  # -1 -> 1 (U-Ones)
    assert second["text"] == ""  # report file missing: warned, and skipped later by the collator
    assert "s50000002.txt" in caplog.text
    negative = list(build_mimic_cxr(tmp_path, split="train", uncertain="negative"))
    assert negative[1]["labels"][cardiomegaly] == 0.0
    assert len(list(build_mimic_cxr(tmp_path, split=None, frontal_only=False))) == 4


def test_mimic_cxr_missing_file_and_column(tmp_path):
    metadata = _mimic_fixture(tmp_path)
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-chexpert.csv"):
        build_mimic_cxr(tmp_path)
    metadata.drop(columns="ViewPosition").to_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", index=False)
    with pytest.raises(ValueError, match="ViewPosition"):
        build_mimic_cxr(tmp_path)


def test_extract_sections_falls_back_to_whole_report():
    assert extract_sections("FINDINGS: a.\nIMPRESSION: b.", ("impression",)) == "b."
    assert extract_sections("No headers here.\n Just text.") == "No headers here. Just text."


def test_chexpert_layout(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    paths = [
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg",
        "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg",
    ]
    for path in paths:
        _write_jpeg(tmp_path / path)
    labels = {name: [np.nan] * 3 for name in CHEXPERT_CLASSES}
    labels["Atelectasis"] = [-1.0, 1.0, 0.0]
    labels["No Finding"] = [np.nan, np.nan, 1.0]
    frame = pd.DataFrame(
        {"Path": paths, "Sex": "Female", "Age": 60, "Frontal/Lateral": ["Frontal", "Lateral", "Frontal"],
         "AP/PA": ["AP", "", "PA"], **labels}
    )
    frame.to_csv(root / "train.csv", index=False)
    rows = list(build_chexpert(root, uncertain="positive"))
    assert [row["image_id"] for row in rows] == ["patient00001/study1/view1_frontal.jpg", "patient00002/study1/view1_frontal.jpg"]
    assert all(os.path.isfile(row["image"]) for row in rows)
    atelectasis = CHEXPERT_CLASSES.index("Atelectasis")
    assert rows[0]["labels"][atelectasis] == 1.0 and rows[0]["patient_id"] == "patient00001"
    assert rows[1]["labels"] == [1.0] + [0.0] * 13
    assert list(build_chexpert(root, uncertain="negative"))[0]["labels"][atelectasis] == 0.0
    assert len(list(build_chexpert(root, frontal_only=False))) == 3
    with pytest.raises(FileNotFoundError, match="valid.csv"):
        build_chexpert(root, split="valid")
    frame.drop(columns="Edema").to_csv(root / "train.csv", index=False)
    with pytest.raises(ValueError, match="Edema"):
        build_chexpert(root)


def test_rsna_layout(tmp_path):
    images = tmp_path / "stage_2_train_images"
    for patient in ("a1", "b2", "c3"):
        _write_jpeg(images / f"{patient}.png")
    pd.DataFrame(
        {"patientId": ["a1", "b2", "b2", "c3"], "x": [np.nan, 10, 300, np.nan], "y": [np.nan, 20, 400, np.nan],
         "width": [np.nan, 100, 50, np.nan], "height": [np.nan, 200, 60, np.nan], "Target": [0, 1, 1, 0]}
    ).to_csv(tmp_path / "stage_2_train_labels.csv", index=False)
    rows = list(build_rsna_pneumonia(tmp_path, num_shards=2))
    assert [(row["image_id"], row["labels"]) for row in rows] == [("a1", 0), ("b2", 1), ("c3", 0)]
    assert rows[1]["boxes"] == [[10.0, 20.0, 100.0, 200.0], [300.0, 400.0, 50.0, 60.0]] and rows[0]["boxes"] == []
    assert rows[1]["image"] == str(images / "b2.png")
    (images / "a1.png").unlink()
    with pytest.raises(FileNotFoundError, match="a1"):
        build_rsna_pneumonia(tmp_path)


def test_generic_image_folder_and_csv(tmp_path):
    for name in ("normal/x1.jpg", "normal/x2.jpg", "pneumonia/sub/y1.png"):
        _write_jpeg(tmp_path / "folder" / name)
    dataset = build_image_folder(tmp_path / "folder", num_shards=3)
    assert dataset.num_shards == 3  # a streamed `imagefolder` would have a single shard
    rows = list(dataset)
    assert [(row["image_id"], row["labels"]) for row in rows] == [
        ("normal/x1.jpg", 0), ("normal/x2.jpg", 0), ("pneumonia/sub/y1.png", 1)
    ]
    assert dataset.features["labels"].names == ["normal", "pneumonia"]

    pd.DataFrame({"file": ["folder/normal/x1.jpg", "folder/pneumonia/sub/y1.png"], "report": ["Clear.", "Opacity."],
                  "finding": ["normal", "pneumonia"]}).to_csv(tmp_path / "index.csv", index=False)
    rows = list(build_image_csv(tmp_path / "index.csv", image_column="file", text_column="report", class_column="finding"))
    assert [(row["image"], row["text"], row["labels"]) for row in rows] == [
        (str(tmp_path / "folder/normal/x1.jpg"), "Clear.", 0), (str(tmp_path / "folder/pneumonia/sub/y1.png"), "Opacity.", 1)
    ]
    with pytest.raises(ValueError, match="missing column"):
        build_image_csv(tmp_path / "index.csv", image_column="path", class_column="finding")


# ---------------------------------------------------------------------------------------------------------------
# Parquet round trip
# ---------------------------------------------------------------------------------------------------------------


def test_to_parquet_round_trip_streams_the_same_rows(covid_cxr_dir, tmp_path):
    subset = tmp_path / "covid-subset"
    subset.mkdir()
    pd.read_csv(covid_cxr_dir / "metadata.csv", keep_default_na=False).iloc[:40].to_csv(subset / "metadata.csv", index=False)
    (subset / "images").symlink_to(covid_cxr_dir / "images")
    to_parquet_main(["--builder", "covid_cxr", "--root", str(subset), "--output_dir", str(tmp_path / "out"), "--shard_size", "16"])
    files = sorted(glob.glob(str(tmp_path / "out" / "*.parquet")))
    assert [os.path.basename(f) for f in files] == [f"train-0000{i}-of-00003.parquet" for i in range(3)]

    streamed = load_dataset("parquet", data_files=files, split="train", streaming=True)
    assert streamed.num_shards == 3
    original = list(build_covid_cxr(subset))
    rows = list(streamed)
    assert len(rows) == len(original) == 40
    for row, source in zip(rows, original):
        with open(source["image"], "rb") as file:
            assert row["image"] == file.read()
        assert {k: v for k, v in row.items() if k != "image"} == {k: v for k, v in source.items() if k != "image"}
    assert list(build_parquet(files))[5]["image_id"] == original[5]["image_id"]
    assert "covid_cxr" in BUILDERS


def test_write_parquet_shards_names_a_missing_image(covid_cxr_dir, tmp_path):
    subset = tmp_path / "covid-subset"
    (subset / "images").mkdir(parents=True)
    pd.read_csv(covid_cxr_dir / "metadata.csv", keep_default_na=False).iloc[:2].to_csv(subset / "metadata.csv", index=False)
    with pytest.raises(FileNotFoundError, match="auntminnie-a"):
        write_parquet_shards(build_covid_cxr(subset), tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collator(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return MedCLIPCollator(tokenizer, build_augmentation("medclip", MedCLIPImageProcessor()), max_length=77)


def test_collator_paired_examples(covid_cxr_dir, collator):
    examples = [row for row in build_covid_cxr(covid_cxr_dir, require_text=True).take(4)]
    batch = collator(examples)
    assert batch["pixel_values"].shape == (4, 1, 224, 224) and batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] == 77  # the notes are long
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["image_labels"].tolist() == [row["labels"] for row in examples]
    assert batch["image_ids"] == batch["text_ids"] == [row["image_id"] for row in examples]
    assert batch["num_skipped_images"] == batch["num_skipped_texts"] == 0
    images_only = MedCLIPCollator(collator.tokenizer, collator.image_transform, return_texts=False)
    assert set(images_only(examples)) == {"pixel_values", "image_ids", "image_labels", "num_skipped_images", "num_skipped_texts"}


def test_collator_skips_corrupt_images_and_empty_texts(tmp_path, covid_cxr_dir, collator, caplog):
    good = sorted(glob.glob(str(covid_cxr_dir / "images" / "*.jpg")))[:4]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(good[0], "rb").read()[:2000])
    (tmp_path / "not_an_image.jpg").write_text("hello")
    examples = [
        {"image": good[0], "text": "Clear lungs.", "labels": [1.0] + [0.0] * 13, "image_id": "g0"},
        {"image": str(truncated), "text": "Effusion.", "labels": [0.0] * 10 + [1.0] + [0.0] * 3, "image_id": "t"},
        {"image": good[1], "text": "  ", "labels": [1.0] + [0.0] * 13, "image_id": "empty"},
        {"image": str(tmp_path / "not_an_image.jpg"), "text": "Edema.", "labels": [0.0] * 14, "image_id": "n"},
        {"image": open(good[2], "rb").read(), "text": "Cardiomegaly.", "labels": [0.0] * 14, "image_id": "bytes"},
    ]
    with caplog.at_level(logging.WARNING):
        batch = collator(examples)
    assert batch["image_ids"] == batch["text_ids"] == ["g0", "bytes"]  # paired: a dropped image drops its text
    assert batch["pixel_values"].shape == (2, 1, 224, 224) and batch["input_ids"].shape[0] == 2
    assert batch["num_skipped_images"] == 2 and batch["num_skipped_texts"] == 1
    assert "truncated.jpg" in caplog.text and "not_an_image.jpg" in caplog.text and "empty" in caplog.text

    decoupled = collator({"images": examples, "texts": examples, "paired": False})
    assert decoupled["image_ids"] == ["g0", "empty", "bytes"] and decoupled["text_ids"] == ["g0", "t", "n", "bytes"]
    assert decoupled["text_labels"].shape == (4, 14)


def test_collator_corrupt_file_in_dataloader_with_two_workers(tmp_path, covid_cxr_dir, collator):
    good = sorted(glob.glob(str(covid_cxr_dir / "images" / "*.jpg")))[:7]
    (tmp_path / "truncated.jpg").write_bytes(open(good[0], "rb").read()[:1500])
    files = good[:3] + [str(tmp_path / "truncated.jpg")] + good[3:]
    pd.DataFrame({"image": files, "text": ["Lungs are clear."] * 8, "finding": ["a", "b"] * 4}).to_csv(
        tmp_path / "index.csv", index=False
    )
    dataset = build_image_csv(tmp_path / "index.csv", class_column="finding", num_shards=2)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert sum(batch["num_skipped_images"] for batch in batches) == 1
    # the truncated file is alone in its worker's last batch, which therefore has no image keys at all
    assert sum(len(batch.get("pixel_values", [])) for batch in batches) == 7
    seen = [image_id for batch in batches for image_id in batch.get("image_ids", [])]
    assert sorted(seen) == sorted(good)  # image_id defaults to the image path


# ---------------------------------------------------------------------------------------------------------------
# NIH ChestX-ray14 and pediatric pneumonia
# ---------------------------------------------------------------------------------------------------------------


def _nih_fixture(root, single_folder: bool):
    names = ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    for i, name in enumerate(names):
        folder = root / "images" if single_folder else root / f"images_00{1 + i // 2}" / "images"
        _write_jpeg(folder / name)
    pd.DataFrame(
        {"Image Index": names, "Finding Labels": ["Effusion|Mass", "No Finding", "Infiltration|Hernia", "Emphysema"],
         "Follow-up #": [0, 1, 0, 0], "Patient ID": [1, 1, 2, 3], "Patient Age": 50, "Patient Gender": "M",
         "View Position": ["PA", "AP", "PA", "PA"]}
    ).to_csv(root / "Data_Entry_2017.csv", index=False)
    return names


@pytest.mark.parametrize("single_folder", [False, True])
def test_nih_cxr14_layouts_and_label_mapping(tmp_path, single_folder):
    names = _nih_fixture(tmp_path, single_folder)
    rows = list(build_nih_cxr14(tmp_path, num_shards=2))
    assert [row["image_id"] for row in rows] == names
    assert all(os.path.isfile(row["image"]) for row in rows)
    assert [row["patient_id"] for row in rows] == ["1", "1", "2", "3"]

    def positives(vector, names_):
        return {name for name, value in zip(names_, vector) if value == 1.0}

    assert positives(rows[0]["labels"], CHEXPERT_CLASSES) == {"Pleural Effusion", "Lung Lesion"}
    assert positives(rows[0]["nih_labels"], NIH_CLASSES) == {"Effusion", "Mass"}
    assert positives(rows[1]["labels"], CHEXPERT_CLASSES) == {"No Finding"} and sum(rows[1]["nih_labels"]) == 0
    assert positives(rows[2]["labels"], CHEXPERT_CLASSES) == {"Lung Opacity"}  # Hernia has no counterpart
    assert positives(rows[2]["nih_labels"], NIH_CLASSES) == {"Infiltration", "Hernia"}
    assert sum(rows[3]["labels"]) == 0 and rows[3]["finding_labels"] == "Emphysema"
    (tmp_path / ("images" if single_folder else "images_002/images") / names[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=names[-1]):
        build_nih_cxr14(tmp_path)


def test_nih_cxr14_shared_folder(shared_data):
    root = shared_data / "nih-cxr14-1000"
    metadata = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    rows = list(build_nih_cxr14(root))
    assert len(rows) == len(metadata) == 1000
    assert len({row["patient_id"] for row in rows}) == metadata["Patient ID"].nunique() == 264
    no_finding = CHEXPERT_CLASSES.index("No Finding")
    assert sum(row["labels"][no_finding] for row in rows) == (metadata["Finding Labels"] == "No Finding").sum()
    effusion = CHEXPERT_CLASSES.index("Pleural Effusion")
    assert sum(row["labels"][effusion] for row in rows) == metadata["Finding Labels"].str.contains("Effusion").sum()
    assert all(os.path.isfile(row["image"]) for row in rows[:20])


def test_pediatric_pneumonia_fixture_and_shared_folder(tmp_path, shared_data):
    for name in ("train/NORMAL/NORMAL-11-0001.jpeg", "train/PNEUMONIA/BACTERIA-12-0001.jpeg",
                 "train/PNEUMONIA/VIRUS-12-0002.jpeg"):  # fmt: skip
        _write_jpeg(tmp_path / name)
    pd.DataFrame(
        {"image": ["train/NORMAL/NORMAL-11-0001.jpeg", "train/PNEUMONIA/BACTERIA-12-0001.jpeg",
                   "train/PNEUMONIA/VIRUS-12-0002.jpeg"],
         "label": ["normal", "bacterial pneumonia", "viral pneumonia"], "patient_id": ["11", "12", "12"]}
    ).to_csv(tmp_path / "metadata.csv", index=False)
    rows = list(build_pediatric_pneumonia(tmp_path))
    pneumonia, no_finding = CHEXPERT_CLASSES.index("Pneumonia"), CHEXPERT_CLASSES.index("No Finding")
    assert [PEDIATRIC_PNEUMONIA_CLASSES[row["finding"]] for row in rows] == ["normal", "bacterial pneumonia",
                                                                               "viral pneumonia"]  # fmt: skip
    assert rows[0]["labels"][no_finding] == 1.0 and sum(rows[0]["labels"]) == 1.0
    assert all(row["labels"][pneumonia] == 1.0 and sum(row["labels"]) == 1.0 for row in rows[1:])
    assert [row["patient_id"] for row in rows] == ["11", "12", "12"]
    pd.DataFrame({"image": ["x.jpeg"], "label": ["fungal"], "patient_id": ["1"]}).to_csv(tmp_path / "metadata.csv")
    with pytest.raises(ValueError, match="fungal"):
        build_pediatric_pneumonia(tmp_path)

    root = shared_data / "pediatric-pneumonia-cxr"
    rows = list(build_pediatric_pneumonia(root))
    counts = pd.Series([PEDIATRIC_PNEUMONIA_CLASSES[row["finding"]] for row in rows]).value_counts()
    assert counts.to_dict() == {"bacterial pneumonia": 2538, "normal": 1349, "viral pneumonia": 1345}
    assert len({row["patient_id"] for row in rows}) == 2650


def test_builder_registry_names_every_builder():
    assert {"mimic_cxr", "chexpert", "iu_xray", "covid_cxr", "rsna", "image_folder", "nih_cxr14",
            "pediatric_pneumonia"} <= set(BUILDERS)  # fmt: skip
    assert BUILDERS["nih_cxr14"].build is build_nih_cxr14
    assert all(builder.image_labels and builder.description for builder in BUILDERS.values())
