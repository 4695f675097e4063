"""Training data sources: `NAME=PATH` / `NAME` / `hub:org/name`, label vectors per corpus, held-out patients, mixing."""

import itertools
from collections import Counter

import pandas as pd
import pytest
from huggingface_hub import HfApi

from dataset_scripts.covid_cxr import COVID_CXR_CLASSES, build_covid_cxr
from dataset_scripts.registry import class_label_vector, covid_cxr_labels
from dataset_scripts.sources import (
    as_generator_stream,
    image_stream,
    parse_source,
    parse_sources,
    text_stream,
)
from dataset_scripts.to_parquet import write_parquet_shards
from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler

PNEUMONIA, NO_FINDING = CHEXPERT_CLASSES.index("Pneumonia"), CHEXPERT_CLASSES.index("No Finding")


def test_source_specs(shared_data, tmp_path, monkeypatch):
    assert parse_source(f"covid_cxr={shared_data / 'covid-cxr'}").location == str(shared_data / "covid-cxr")
    monkeypatch.setenv("MEDCLIP_SHARED_DATA", str(shared_data))
    assert parse_source("nih_cxr14").location == str(shared_data / "nih-cxr14-1000")  # its shared folder
    hub = parse_source("hub:org/name")
    assert hub.is_hub and hub.builder is None and str(hub) == "hub:org/name"
    with pytest.raises(ValueError, match="known builders"):
        parse_source("mimic=/data")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_source(f"chexpert={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="give the corpus folder"):
        parse_source("chexpert")
    with pytest.raises(ValueError, match="2 weights for 1 sources"):
        parse_sources(["covid_cxr"], [0.5, 0.5])
    monkeypatch.setenv("MEDCLIP_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):  # the variable is honoured
        parse_source("covid_cxr")


def test_covid_label_vectors_are_the_note_corrected_by_the_class(covid_cxr_dir):
    labeler = CheXpertLabeler()
    examples = list(build_covid_cxr(covid_cxr_dir, require_text=True))
    streamed = list(image_stream([parse_source(f"covid_cxr={covid_cxr_dir}")]))
    assert len(streamed) == len(examples) == 384  # training images are those with a note
    seen = set()
    for example, row in zip(examples, streamed):
        note = labeler.label_vector(example["text"])
        assert row["labels"] == covid_cxr_labels(example, labeler, "positive")
        name = COVID_CXR_CLASSES[example["labels"]]
        seen.add(name)
        if name == "No Finding":
            assert row["labels"][NO_FINDING] == 1.0 and row["labels"][PNEUMONIA] == 0.0
        else:
            assert row["labels"][PNEUMONIA] == 1.0 and row["labels"][NO_FINDING] == 0.0
            others = [i for i in range(len(CHEXPERT_CLASSES)) if i not in (PNEUMONIA, NO_FINDING)]
            assert [row["labels"][i] for i in others] == [note[i] for i in others]
        assert row["image"]["path"] == example["image"] and row["text"] == example["text"]
    assert seen == set(COVID_CXR_CLASSES)


def test_class_names_map_to_chexpert_vectors(tmp_path):
    assert class_label_vector("Normal")[NO_FINDING] == 1.0
    assert class_label_vector("viral pneumonia")[PNEUMONIA] == 1.0
    assert class_label_vector("edema")[CHEXPERT_CLASSES.index("Edema")] == 1.0
    assert class_label_vector("tuberculosis") is None
    import numpy as np
    import PIL.Image

    for name in ("normal/a.png", "pneumonia/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        PIL.Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / name)
    rows = list(image_stream([parse_source(f"image_folder={tmp_path}")]))
    assert [row["labels"][NO_FINDING] for row in rows] == [1.0, 0.0]
    assert [row["labels"][PNEUMONIA] for row in rows] == [0.0, 1.0]
    (tmp_path / "tuberculosis").mkdir()
    PIL.Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "tuberculosis" / "c.png")
    with pytest.raises(ValueError, match="no CheXpert label vector"):
        list(image_stream([parse_source(f"image_folder={tmp_path}")]))


def test_held_out_patients_are_left_out_or_kept_alone(covid_cxr_dir):
    source = parse_source(f"covid_cxr={covid_cxr_dir}")
    patients = {row["patient_id"] for row in build_covid_cxr(covid_cxr_dir, require_text=True)}
    held_out = set(sorted(patients)[:10])
    training = list(image_stream([source], held_out={source: held_out}))
    assert not {row["patient_id"] for row in training} & held_out and training
    validation = list(image_stream([source], held_out={source: held_out}, only_held_out=True))
    assert {row["patient_id"] for row in validation} == held_out
    assert len(training) + len(validation) == 384
    assert image_stream([source], only_held_out=True) is None
    sentences = list(text_stream([source], held_out={source: held_out}))
    assert sentences and not {row["patient_id"] for row in sentences} & held_out


def test_two_image_sources_mixed_by_weight(shared_data):
    sources = parse_sources([f"nih_cxr14={shared_data / 'nih-cxr14-1000'}",
                             f"covid_cxr={shared_data / 'covid-cxr'}"], [0.8, 0.2])  # fmt: skip
    mixed = image_stream(sources, [0.8, 0.2], seed=0)
    first = [row["source"] for row in itertools.islice(mixed, 500)]
    share = Counter(first)[str(sources[0])] / len(first)
    assert 0.72 < share < 0.88  # 80% of the draws from the first source
    epoch = list(mixed)
    counts = Counter(row["source"] for row in epoch)
    # all_exhausted: every image of both sources is seen in an epoch, the smaller source repeats
    assert len({row["image_id"] for row in epoch if row["source"] == str(sources[0])}) == 1000
    assert len({row["image_id"] for row in epoch if row["source"] == str(sources[1])}) == 384
    assert counts[str(sources[1])] >= 384
    concatenated = list(image_stream(sources))
    assert len(concatenated) == 1000 + 384


def test_hub_dataset_source_streams_the_parquet_shards(hub_server, covid_cxr_dir, tmp_path):
    subset = tmp_path / "covid-subset"
    subset.mkdir()
    pd.read_csv(covid_cxr_dir / "metadata.csv", keep_default_na=False).iloc[:30].to_csv(
        subset / "metadata.csv", index=False
    )
    (subset / "images").symlink_to(covid_cxr_dir / "images")
    write_parquet_shards(build_covid_cxr(subset), tmp_path / "parquet" / "data", shard_size=10)
    HfApi().create_repo("user/covid-parquet", repo_type="dataset")
    HfApi().upload_folder(folder_path=tmp_path / "parquet", repo_id="user/covid-parquet", repo_type="dataset")

    source = parse_source("hub:user/covid-parquet")
    rows = list(image_stream([source]))
    expected = [row for row in build_covid_cxr(subset) if row["text"].strip()]
    assert [row["image_id"] for row in rows] == [row["image_id"] for row in build_covid_cxr(subset)]
    with open(expected[0]["image"], "rb") as file:
        first = next(row for row in rows if row["image_id"] == expected[0]["image_id"])
        assert first["image"]["bytes"] == file.read()
    # the labeler on the note, since the Hub copy's class ids carry no CheXpert labels
    labeler = CheXpertLabeler()
    assert first["labels"] == labeler.label_vector(expected[0]["text"])


def test_generator_stream_keeps_examples_and_shards(covid_cxr_dir, tmp_path):
    from dataset_scripts import build_parquet

    files = write_parquet_shards(build_covid_cxr(covid_cxr_dir).take(25), tmp_path / "out", shard_size=10)
    parquet = build_parquet([str(path) for path in files])
    wrapped = as_generator_stream(parquet)
    assert wrapped.num_shards == parquet.num_shards == 3
    assert [row["image_id"] for row in wrapped] == [row["image_id"] for row in parquet]
