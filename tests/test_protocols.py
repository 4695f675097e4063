"""Tests of `modeling_medclip.protocols` on real pediatric pneumonia X-rays with a tiny random model, and on
embeddings whose answer is known."""

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.labeler import CheXpertLabeler
from modeling_medclip.protocols import (
    autocast_dtype,
    bf16_supported,
    embed_images_in_workers,
    fold_batch_norms,
    image_loader,
    labeler_protocol,
    load_prompt_file,
    retrieval_protocol,
    zero_shot_protocol,
)
from modeling_medclip.retrieval import embed_images

PROMPTS = {
    "normal": ["the lungs are clear", "no acute cardiopulmonary process"],
    "pneumonia": ["consolidation consistent with pneumonia", "airspace opacity"],
}


@pytest.fixture(scope="module")
def model_and_processor(tokenizer_dir):
    torch.manual_seed(0)
    model = MedCLIPModel(tiny_config()).eval()
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64)
    return model, MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def pneumonia_images(shared_data):
    root = shared_data / "pediatric-pneumonia-cxr"
    metadata = pd.read_csv(root / "metadata.csv", dtype={"patient_id": str})
    subset = metadata.groupby("label").head(12).reset_index(drop=True)
    labels = (subset["label"] != "normal").astype(int).to_numpy()
    return [str(root / name) for name in subset["image"]], labels, subset["patient_id"].to_numpy()


def test_worker_embeddings_equal_the_in_process_ones(model_and_processor, pneumonia_images):
    model, processor = model_and_processor
    paths, _, _ = pneumonia_images
    batches = list(image_loader(processor, paths, batch_size=10, num_workers=2))
    assert [len(batch["pixel_values"]) for batch in batches] == [10, 10, 10, 6]
    in_workers = embed_images_in_workers(model, processor, paths, batch_size=10, num_workers=2)
    in_process = embed_images(model, processor, [processor.image_processor.to_grayscale(p) for p in paths], 10)
    assert torch.allclose(in_workers, in_process, atol=1e-5)
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert torch.allclose(embed_images_in_workers(channels_last, processor, paths, 10, 0, channels_last=True),
                          in_process, atol=1e-5)  # fmt: skip
    if bf16_supported(torch.device("cpu")):
        bf16 = embed_images_in_workers(model, processor, paths, 10, 1, autocast=torch.bfloat16)
        assert F.cosine_similarity(bf16, in_process).min() > 0.98


def test_folding_batch_norms_keeps_the_embeddings(model_and_processor, pneumonia_images):
    model, processor = model_and_processor
    paths, _, _ = pneumonia_images
    trained = copy.deepcopy(model).train()
    with torch.no_grad():  # running statistics away from their initial 0 / 1, so that folding has work to do
        for batch in image_loader(processor, paths, batch_size=8, num_workers=0):
            trained.get_image_features(pixel_values=batch["pixel_values"] * 3.0 + 0.5)
    trained.eval()
    expected = embed_images_in_workers(trained, processor, paths, 8, 0)
    folded = copy.deepcopy(trained)
    batch_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert fold_batch_norms(folded) == batch_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(embed_images_in_workers(folded, processor, paths, 8, 0), expected, atol=1e-5)
    assert fold_batch_norms(MedCLIPModel(tiny_config(vision="swin")).eval()) == 0
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norms(copy.deepcopy(model).train())


def test_autocast_choice():
    cpu = torch.device("cpu")
    assert autocast_dtype("yes", cpu) is torch.bfloat16 and autocast_dtype("no", cpu) is None
    assert autocast_dtype("auto", cpu) is (torch.bfloat16 if bf16_supported(cpu) else None)
    with pytest.raises(ValueError, match="'auto', 'yes' or 'no'"):
        autocast_dtype("maybe", cpu)


def test_zero_shot_protocol_on_real_xrays(model_and_processor, pneumonia_images):
    model, processor = model_and_processor
    paths, labels, patients = pneumonia_images
    embeddings = embed_images_in_workers(model, processor, paths, num_workers=1)
    result = zero_shot_protocol(model, processor, embeddings, labels, ["normal", "pneumonia"], PROMPTS,
                                groups=patients, n_resamples=100)
    assert result["scores"].shape == (len(paths), 2)
    assert np.allclose(result["scores"].sum(axis=1), 1.0, atol=1e-5)
    metrics, intervals = result["metrics"], result["intervals"]
    assert intervals["macro_auc"].value == pytest.approx(metrics["macro_auc"], abs=1e-6)
    assert intervals["accuracy"].value == pytest.approx(metrics["accuracy"])
    assert set(intervals) == {"macro_auc", "accuracy", "macro_f1", "auc/normal", "auc/pneumonia"}
    for ci in intervals.values():
        assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0
    with pytest.raises(ValueError, match="prompt classes"):
        zero_shot_protocol(model, processor, embeddings, labels, ["pneumonia", "normal"], PROMPTS)


def test_retrieval_protocol_with_known_answers():
    # images of class 0 point along e0, class 1 along e1; texts likewise; one text is relevant to no class
    image_labels = np.array([0, 0, 0, 1, 1, 1])
    images = F.normalize(torch.eye(3)[image_labels] + 0.01 * torch.arange(6.0)[:, None], dim=-1)
    text_rows = np.array([[1, 0], [0, 1], [0, 0]])
    texts = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), dim=-1)
    result = retrieval_protocol(images, image_labels, 2, text_embeddings=texts, text_labels=text_rows,
                                groups=np.array([0, 0, 1, 2, 2, 3]), ks=(1, 2, 5), n_resamples=50)
    image_to_image = result["image_to_image"]["metrics"]
    # the 2 other images of the own class rank first: P@1 = P@2 = 1, P@5 = 2/5, R@2 = 1
    assert image_to_image == pytest.approx({"precision@1": 1.0, "recall@1": 0.5, "precision@2": 1.0,
                                            "recall@2": 1.0, "precision@5": 0.4, "recall@5": 1.0, "mrr": 1.0})
    assert not (result["image_to_image"]["indices"] == np.arange(6)[:, None]).any()  # never itself
    # image->text: gallery of 3 texts, the own-class text first
    assert result["image_to_text"]["metrics"]["precision@1"] == 1.0
    assert result["image_to_text"]["metrics"]["recall@2"] == 1.0
    # text->image: only the two labelled texts query; each finds its 3 images first
    text_to_image = result["text_to_image"]
    assert text_to_image["indices"].shape == (2, 5)
    assert text_to_image["metrics"]["precision@2"] == 1.0 and text_to_image["metrics"]["recall@5"] == 1.0
    assert text_to_image["intervals"]["mrr"].value == 1.0


def test_prompt_files(tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    assert load_prompt_file(tmp_path / "prompts.json", ["normal", "pneumonia"]) == PROMPTS
    (tmp_path / "prompts.yaml").write_text(
        "Edema:\n  positive: [pulmonary edema]\n  negative: [no pulmonary edema]\n"
    )
    assert load_prompt_file(tmp_path / "prompts.yaml", ["Edema"], mode="multilabel") == {
        "Edema": {"positive": ["pulmonary edema"], "negative": ["no pulmonary edema"]}
    }
    with pytest.raises(ValueError, match="the task has"):
        load_prompt_file(tmp_path / "prompts.json", ["normal", "viral"])
    with pytest.raises(ValueError, match="positive"):
        load_prompt_file(tmp_path / "prompts.json", ["normal", "pneumonia"], mode="multilabel")


def test_labeler_protocol_by_hand(tmp_path):
    # the labeler says: Cardiomegaly 1 / Pleural Effusion 0 / Edema -1; the reference agrees on the first two, says
    # Edema 1 on the third; "ok" is too short and the duplicate row is scored once
    reference = pd.DataFrame({
        "Reports": ["There is cardiomegaly.", "No pleural effusion.", "Possible edema.", "ok", "No pleural effusion."],
        "No Finding": [None, 1.0, None, 1.0, 1.0],
        "Cardiomegaly": [1.0, None, None, None, None],
        "Edema": [None, None, 1.0, None, None],
        "Pleural Effusion": [None, 0.0, None, None, 0.0],
    })  # fmt: skip
    reference.to_csv(tmp_path / "reference.csv", index=False)
    result = labeler_protocol(CheXpertLabeler(), tmp_path / "reference.csv", n_resamples=100)
    assert result["num_texts"] == 3
    micro = result["metrics"]["micro"]
    # positive: TP 1 (cardiomegaly), FN 1 (edema) -> P 1, R 1/2; negative: TP 1; uncertain: FP 1 only
    assert micro["positive"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert micro["negative"]["f1"] == 1.0
    assert micro["uncertain"]["precision"] == 0.0 and micro["uncertain"]["support"] == 0
    assert result["intervals"]["micro_f1/positive"].value == pytest.approx(2 / 3)
    assert set(result["metrics"]["per_class"]) == {"No Finding", "Cardiomegaly", "Edema", "Pleural Effusion"}


def test_labeler_protocol_on_the_chexpert_labelers_iu_labels(shared_data, tmp_path):
    reference = pd.read_csv(shared_data / "chexpert-labeler-iu" / "reports-dev.csv").head(150)
    reference.to_csv(tmp_path / "reports.csv", index=False)
    result = labeler_protocol(CheXpertLabeler(), tmp_path / "reports.csv", n_resamples=100)
    assert 100 < result["num_texts"] <= 150
    for value in ("positive", "negative", "uncertain"):
        ci = result["intervals"][f"micro_f1/{value}"]
        assert ci.value == pytest.approx(result["metrics"]["micro"][value]["f1"])
        assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0
    with pytest.raises(ValueError, match="no text column 'Report'"):
        labeler_protocol(CheXpertLabeler(), tmp_path / "reports.csv", text_column="Report")
