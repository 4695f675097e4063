"""The evaluation task registry: every task's split (patient-disjoint, seeded, ids written), classes and prompts, and
each task evaluated with a tiny model on a fixture or the shared data."""

import dataclasses
import json

import pytest
import torch
from conftest import tiny_config
from support.corpora import write_chexpert, write_image_csv, write_mimic, write_rsna
from transformers import AutoTokenizer

from dataset_scripts.tasks import TASKS, expand_tasks, get_task
from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.evaluation import evaluate_split


@pytest.fixture(scope="module")
def model_and_processor(tokenizer_dir):
    torch.manual_seed(0)
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return MedCLIPModel(tiny_config()).eval(), MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture
def task_locations(shared_data, tmp_path):
    """A folder for every task: the shared data where it has the corpus, fixture layouts otherwise."""
    (tmp_path / "CheXpert-v1.0-small").mkdir()
    (tmp_path / "mimic").mkdir()
    (tmp_path / "rsna").mkdir()
    (tmp_path / "csv").mkdir()
    return {
        "covid-cxr": shared_data / "covid-cxr",
        "nih-cxr14": shared_data / "nih-cxr14-1000",
        "nih-cxr14-normal": shared_data / "nih-cxr14-1000",
        "pediatric-pneumonia": shared_data / "pediatric-pneumonia-cxr",
        "pediatric-pneumonia-bacterial-viral": shared_data / "pediatric-pneumonia-cxr",
        "chexpert-5x200": write_chexpert(tmp_path / "CheXpert-v1.0-small", 40),
        "mimic-5x200": write_mimic(tmp_path / "mimic", 40),
        "rsna-pneumonia": write_rsna(tmp_path / "rsna", 30),
        "csv": write_image_csv(tmp_path / "csv", 30),
    }


def test_every_task_is_covered():
    assert set(TASKS) == {"covid-cxr", "nih-cxr14", "nih-cxr14-normal", "pediatric-pneumonia",
                          "pediatric-pneumonia-bacterial-viral", "chexpert-5x200", "mimic-5x200", "rsna-pneumonia",
                          "csv"}  # fmt: skip
    assert [task.name for task, _ in expand_tasks(["nih-cxr14", "covid-cxr", "nih-cxr14-normal"])] == [
        "nih-cxr14", "nih-cxr14-normal", "covid-cxr"
    ]
    with pytest.raises(ValueError, match="known tasks"):
        get_task("chexpert")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_split_prompts_and_zero_shot(name, task_locations, model_and_processor, tmp_path):
    task, location = get_task(name), task_locations[name]
    split = task.split(location, test_size=0.3, seed=1, max_samples=60)
    train = task.split(location, test_size=0.3, seed=1, part="train")
    assert not set(split.patient_ids) & set(train.patient_ids)  # patient-disjoint
    assert set(split.patient_ids) <= task.held_out_patients(location, test_size=0.3, seed=1)
    assert split.image_ids == task.split(location, test_size=0.3, seed=1, max_samples=60).image_ids  # seeded
    assert split.image_ids != task.split(location, test_size=0.3, seed=2, max_samples=60).image_ids
    if task.mode == "multilabel":
        assert split.multilabel and all(len(label) == len(split.class_names) for label in split.labels)
    else:
        assert set(split.labels) <= set(range(len(split.class_names)))
    prompts = task.prompts_for(split.class_names, n_per_class=3, seed=0)
    assert list(prompts) == split.class_names
    path = task.write_split_ids(split, tmp_path / "ids")
    assert json.loads(path.read_text())["image_ids"] == split.image_ids

    model, processor = model_and_processor
    results = evaluate_split(model, processor, split, prompts, ks=(1, 5))
    assert results["num_images"] == len(split.images)
    assert 0.0 <= results["zero_shot_accuracy"] <= 1.0
    if split.texts and any(split.texts):
        assert "image_to_text_precision@1" in results


def test_task_classes_and_label_mappings(task_locations):
    nih = get_task("nih-cxr14").split(task_locations["nih-cxr14"])
    assert nih.class_names == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion",
                               "Pneumonia", "Pneumothorax"]  # fmt: skip
    normal = get_task("nih-cxr14-normal").split(task_locations["nih-cxr14"])
    assert normal.class_names == ["Abnormal", "No Finding"] and normal.image_ids == nih.image_ids
    assert 0.3 < sum(normal.labels) / len(normal.labels) < 0.7  # half of the shared images are No Finding
    pneumonia = get_task("pediatric-pneumonia").split(task_locations["pediatric-pneumonia"])
    subtypes = get_task("pediatric-pneumonia-bacterial-viral").split(task_locations["pediatric-pneumonia"])
    assert len(subtypes.images) == pneumonia.labels.count(0)  # only the pneumonia images, split by kind
    assert set(get_task("covid-cxr").prompts(n_per_class=2)) == {"COVID-19", "Other pneumonia", "No Finding"}
    multilabel = get_task("nih-cxr14").prompts(n_per_class=2)
    assert set(multilabel["Edema"]) == {"positive", "negative"}
    assert get_task("csv").split(task_locations["csv"], test_size=0.3).class_names == ["Edema", "Normal"]


def test_five_by_two_hundred_draws_per_class(task_locations):
    task = dataclasses.replace(get_task("chexpert-5x200"), per_class=2)
    split = task.split(task_locations["chexpert-5x200"], test_size=0.5)
    assert sorted(split.labels) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert task.split(task_locations["chexpert-5x200"], test_size=0.5).image_ids == split.image_ids


def test_a_task_without_its_data_says_how_to_give_it(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="chexpert-5x200=/path"):
        get_task("chexpert-5x200").split()
    monkeypatch.setenv("MEDCLIP_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        get_task("covid-cxr").split()
