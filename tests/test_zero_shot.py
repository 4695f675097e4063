"""Zero-shot classification, prompt sets, the stock zero-shot pipeline and exported zero-shot heads."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoTokenizer, BertConfig, ResNetConfig, pipeline

from modeling_medclip import (
    ConVIRTConfig,
    ConVIRTForImageClassification,
    ConVIRTModel,
    MedCLIPConfig,
    MedCLIPForImageClassification,
    MedCLIPImageProcessor,
    MedCLIPModel,
    MedCLIPProcessor,
)
from modeling_medclip.prompts import (
    CHEXPERT_CLASSES,
    TASK_CLASSES,
    class_prompt_candidates,
    generate_prompts,
    multilabel_prompts,
)
from modeling_medclip.zero_shot import ZeroShotClassifier, build_zero_shot_head, export_zero_shot_head



def tiny_towers():
    return dict(
        vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        text_config=BertConfig(
            vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        ),
        projection_dim=16,
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # MedCLIP's unmasked pooling (the case where padding matters) and a scale that gives non-flat probabilities
    config = MedCLIPConfig(**tiny_towers(), text_pooling="medclip", logit_scale_init_value=4.0)
    return MedCLIPModel(config).eval()


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def images(covid_cxr_dir):
    metadata = pd.read_csv(covid_cxr_dir / "metadata.csv")
    return [Image.open(covid_cxr_dir / name).convert("L") for name in metadata["file_name"][:4]]


PROMPTS = {
    "Edema": ["mild pulmonary edema", "interstitial edema with kerley b lines"],
    "Pleural Effusion": ["small left pleural effusion", "large layering effusion on the right", "effusion"],
    "Cardiomegaly": ["enlarged cardiac silhouette"],
}


def per_prompt_forward(model, processor, prompts, images):
    """All prompts in one padded batch through the model's own forward: `(B, P)` logits, image and text embeds."""
    inputs = processor(text=prompts, images=images, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


# ----------------------------------------------------------------------------------------------- classifier


def test_prompts_are_encoded_once(model, processor, images):
    calls = []
    handle = model.text_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        classifier = ZeroShotClassifier(model, processor, PROMPTS, batch_size=4)  # 6 prompts -> 2 text batches
        assert len(calls) == 2
        classifier.classify(images)
        classifier.classify(images[:2])
        assert len(calls) == 2
    finally:
        handle.remove()


@pytest.mark.parametrize("ensemble", ["mean_embedding", "mean_logits"])
def test_ensembles_match_hand_computation(model, processor, images, ensemble):
    names = list(PROMPTS)
    flat = [prompt for name in names for prompt in PROMPTS[name]]
    classifier = ZeroShotClassifier(model, processor, PROMPTS, ensemble=ensemble, batch_size=len(flat))
    result = classifier.classify(images)

    out = per_prompt_forward(model, processor, flat, images)
    owner = [name for name in names for _ in PROMPTS[name]]
    scale = model.get_logit_scale()
    columns = []
    for name in names:
        members = [i for i, o in enumerate(owner) if o == name]
        if ensemble == "mean_logits":  # MedCLIP: average the per-prompt logits
            columns.append(out.logits_per_image[:, members].mean(dim=1))
        else:  # CLIP: average the normalised prompt embeddings, renormalise, then one logit
            class_embed = out.text_embeds[members].mean(dim=0)
            columns.append(scale * out.image_embeds @ (class_embed / class_embed.norm()))
    expected = torch.stack(columns, dim=1).softmax(dim=1)

    assert result.probs.shape == (len(images), len(names))
    torch.testing.assert_close(result.probs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(result.probs.sum(dim=1), torch.ones(len(images)))
    ranked = result.to_list()
    assert result.predictions == ranked
    for row, probs in zip(ranked, result.probs):
        assert [entry["score"] for entry in row] == sorted(probs.tolist(), reverse=True)
        assert row[0]["label"] == names[int(probs.argmax())]


def test_ensembles_differ_with_several_prompts(model, processor, images):
    by_embedding = ZeroShotClassifier(model, processor, PROMPTS, ensemble="mean_embedding").classify(images)
    by_logits = ZeroShotClassifier(model, processor, PROMPTS, ensemble="mean_logits").classify(images)
    assert not torch.allclose(by_embedding.probs, by_logits.probs, atol=1e-4)


def test_multilabel_pairs(model, processor, images):
    prompts = {
        "Edema": {"positive": ["pulmonary edema", "vascular congestion"], "negative": ["no pulmonary edema"]},
        "Pneumothorax": {"positive": ["small apical pneumothorax"], "negative": ["no pneumothorax", "no pleural air"]},
    }
    classifier = ZeroShotClassifier(
        model, processor, prompts, mode="multilabel", ensemble="mean_logits", batch_size=16
    )
    result = classifier.classify(images)
    assert result.probs.shape == (len(images), 2) and result.logits.shape == (len(images), 2, 2)

    flat = ["pulmonary edema", "vascular congestion", "small apical pneumothorax",
            "no pulmonary edema", "no pneumothorax", "no pleural air"]  # the classifier's order: positives first
    logits = per_prompt_forward(model, processor, flat, images).logits_per_image
    edema = torch.stack([logits[:, 0:2].mean(1), logits[:, 3]], dim=1).softmax(dim=1)[:, 0]
    pneumothorax = torch.stack([logits[:, 2], logits[:, 4:6].mean(1)], dim=1).softmax(dim=1)[:, 0]
    torch.testing.assert_close(result.probs, torch.stack([edema, pneumothorax], dim=1), atol=1e-5, rtol=0)
    assert not torch.allclose(result.probs.sum(dim=1), torch.ones(len(images)))  # independent classes


def test_pixel_values_input_equals_pil_input(model, processor, images):
    classifier = ZeroShotClassifier(model, processor, PROMPTS, batch_size=3)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(classifier.classify(pixel_values).probs, classifier.classify(images).probs)


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ({}, {}, "non-empty dict"),
        ({"Edema": []}, {}, "Edema"),
        ({"Edema": "pulmonary edema"}, {}, "Edema"),
        ({"Edema": ["edema", "  "]}, {}, "empty"),
        ({"Edema": ["edema"]}, {"ensemble": "max"}, "ensemble"),
        ({"Edema": ["edema"]}, {"mode": "binary"}, "mode"),
        ({"Edema": {"positive": ["edema"]}}, {"mode": "multilabel"}, "negative"),
    ],
)
def test_bad_prompts_raise(model, processor, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZeroShotClassifier(model, processor, prompts, **kwargs)


# ------------------------------------------------------------------------------------------ stock pipelines


def test_stock_zero_shot_pipeline_matches(model, processor, images, tmp_path):
    """The stock pipeline pads its candidate texts together (`padding=True`); the classifier does the same when
    all prompts fit in one batch, so the unmasked `medclip` pooling sees identical inputs and scores agree."""
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    labels = ["edema", "a small left pleural effusion", "cardiomegaly with vascular congestion"]
    template = "chest x-ray showing {}"
    stock = pipeline("zero-shot-image-classification", model=str(tmp_path))
    outputs = stock(images, candidate_labels=labels, hypothesis_template=template)
    stock_probs = torch.tensor([[next(d["score"] for d in out if d["label"] == lab) for lab in labels]
                                for out in outputs])

    prompts = {label: [template.format(label)] for label in labels}
    ours = ZeroShotClassifier(model, processor, prompts, batch_size=8).classify(images).probs
    torch.testing.assert_close(ours, stock_probs, atol=1e-5, rtol=0)

    # one prompt per text batch pads differently, which changes unmasked-pooled embeddings: the agreement above
    # depends on tokenizing exactly like the pipeline
    unpadded = ZeroShotClassifier(model, processor, prompts, batch_size=1).classify(images).probs
    assert (unpadded - stock_probs).abs().max() > 1e-4


@pytest.mark.parametrize(
    "ensemble, mode",
    [("mean_embedding", "multiclass"), ("mean_logits", "multiclass"), ("mean_embedding", "multilabel")],
)
def test_exported_head_serves_same_scores(model, processor, images, tmp_path, ensemble, mode):
    prompts = generate_prompts("covid", n_per_class=3) if mode == "multiclass" else multilabel_prompts(
        "chexpert5", n_per_class=2)
    classifier = ZeroShotClassifier(model, processor, prompts, ensemble=ensemble, mode=mode)
    expected = classifier.classify(images).probs
    export_zero_shot_head(classifier, tmp_path)

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert any(key.startswith("vision_model.") for key in keys) and "classifier.weight" in keys
    assert not any(key.startswith(("text_model.", "text_projection.")) for key in keys)

    # trust_remote_code=False: the package's registered classes are used, and transformers' guess of a
    # remote video processor from the image processor's auto_map is declined without an interactive prompt
    stock = pipeline("image-classification", model=str(tmp_path), trust_remote_code=False)
    assert isinstance(stock.model, MedCLIPForImageClassification)
    outputs = stock(images, top_k=None)
    names = classifier.class_names
    stock_probs = torch.tensor([[next(d["score"] for d in out if d["label"] == name) for name in names]
                                for out in outputs])
    torch.testing.assert_close(stock_probs, expected, atol=1e-5, rtol=0)


def test_export_picks_the_convirt_class(processor, images):
    torch.manual_seed(0)
    model = ConVIRTModel(ConVIRTConfig(**tiny_towers(), projection_head="mlp", num_frozen_text_layers=0)).eval()
    classifier = ZeroShotClassifier(model, processor, PROMPTS)
    head = build_zero_shot_head(classifier)
    assert isinstance(head, ConVIRTForImageClassification)
    assert head.config.id2label == dict(enumerate(PROMPTS)) and head.config.label2id["Cardiomegaly"] == 2
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(head(pixel_values).logits.softmax(-1), classifier.classify(images).probs)


# ------------------------------------------------------------------------------------------------- prompts


def _prompts_in_fresh_process(hash_seed: str) -> dict:
    code = (
        "import json\n"
        "from modeling_medclip.prompts import generate_prompts, multilabel_prompts\n"
        "print(json.dumps([generate_prompts('chexpert14', 5, 3), multilabel_prompts('covid', 4, 3)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout)


def test_prompts_reproducible_across_processes():
    here = json.loads(json.dumps([generate_prompts("chexpert14", 5, 3), multilabel_prompts("covid", 4, 3)]))
    assert _prompts_in_fresh_process("1") == here
    assert _prompts_in_fresh_process("12345") == here


def test_prompts_depend_on_seed_and_cover_every_class():
    for task, classes in TASK_CLASSES.items():
        prompts = generate_prompts(task, n_per_class=10, seed=0)
        assert list(prompts) == classes
        for name, sentences in prompts.items():
            assert len(sentences) == 10 and len(set(sentences)) == 10
            assert set(sentences) <= set(class_prompt_candidates(name))
        assert generate_prompts(task, n_per_class=10, seed=1) != prompts
    assert list(generate_prompts("chexpert14")) == CHEXPERT_CLASSES
    assert {"No Finding", "Support Devices"} <= set(CHEXPERT_CLASSES) and len(CHEXPERT_CLASSES) == 14
    # a class draws the same prompts in every task that contains it
    assert generate_prompts("chexpert5", 4, 7)["Edema"] == generate_prompts("chexpert14", 4, 7)["Edema"]
    # asking for more prompts than a class has returns all of them once
    everything = generate_prompts("rsna", n_per_class=10_000)["Normal"]
    assert sorted(everything) == sorted(class_prompt_candidates("Normal"))


def test_multilabel_prompts():
    pairs = multilabel_prompts("chexpert5", n_per_class=6, seed=2)
    assert pairs.keys() == generate_prompts("chexpert5").keys()
    for name, sides in pairs.items():
        assert sides["positive"] == generate_prompts("chexpert5", 6, 2)[name]
        assert len(sides["negative"]) == 6 and not set(sides["negative"]) & set(sides["positive"])
    assert all(sentence.startswith(("no ", "negative for", "without")) for sentence in pairs["Edema"]["negative"])


@pytest.mark.parametrize("call", [lambda: generate_prompts("mimic"), lambda: generate_prompts("rsna", 0)])
def test_prompt_generation_rejects_bad_arguments(call):
    with pytest.raises(ValueError):
        call()
