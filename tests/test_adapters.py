"""LoRA / DoRA / IA3 adapters through peft: default targets per tower, merging, the batch-norm trap, the Hub round
trip (PeftModel.from_pretrained and transformers' load_adapter), adapter cards and the stock pipelines."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from support.pneumonia import build_processor, sample_xrays
from transformers import AutoModel, pipeline

from modeling_medclip import MedCLIPForImageClassification, MedCLIPModel
from modeling_medclip.adapters import (
    adapter_model_card,
    apply_adapters,
    build_peft_config,
    default_target_modules,
    push_adapter_to_hub,
)
from modeling_medclip.zero_shot import ZeroShotClassifier

TEXTS = ["no acute cardiopulmonary process", "right lower lobe pneumonia", "clear lungs", "patchy opacities"]
# module-name endings every default route must adapt, per tower type
EXPECTED_SUFFIXES = {
    ("resnet", "lora"): ("layer.0.convolution", "layer.1.convolution", "layer.2.convolution"),
    ("resnet", "ia3"): ("layer.0.convolution", "layer.2.convolution"),
    ("swin", "lora"): ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    ("swin", "ia3"): ("k_proj", "v_proj", "fc2"),
    ("vit", "lora"): ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    ("vit", "ia3"): ("k_proj", "v_proj", "fc2"),
    ("bert", "lora"): ("query", "key", "value", "attention.output.dense", "intermediate.dense", "0.output.dense"),
    ("bert", "ia3"): ("key", "value", "0.output.dense"),
}


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return build_processor(tokenizer_dir, size=32)


@pytest.fixture(scope="module")
def xrays(shared_data):
    """Real pediatric chest X-rays, 4 normal and 4 pneumonia, with their labels (1 = pneumonia)."""
    return sample_xrays(shared_data / "pediatric-pneumonia-cxr", per_class=4)


def _base(vision="resnet", seed=0):
    torch.manual_seed(seed)
    return MedCLIPModel(tiny_config(vision=vision, logit_scale_init_value=3.0, loss_type="infonce")).eval()


def _inputs(processor, images):
    return processor(text=TEXTS, images=images, return_tensors="pt", padding=True)


def _adapted_modules(peft_model):
    return sorted({name.rsplit(".lora_", 1)[0].rsplit(".ia3_", 1)[0]
                   for name, parameter in peft_model.named_parameters()
                   if parameter.requires_grad and ("lora_" in name or "ia3_" in name)})


@pytest.mark.parametrize("vision", ["resnet", "swin", "vit"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_default_targets_cover_each_tower_and_train_few_parameters(vision, method):
    kind = "ia3" if method == "ia3" else "lora"
    for towers in [("vision",), ("text",), ("vision", "text")]:
        peft_model = apply_adapters(_base(vision), method=method, towers=towers, r=4)
        modules = _adapted_modules(peft_model)
        trainable, total = peft_model.get_nb_trainable_parameters()
        print(f"{vision} {method} {'+'.join(towers)}: {trainable} of {total} parameters trainable")
        assert 0 < trainable < 0.01 * total
        assert all(p.requires_grad == ("lora_" in n or "ia3_" in n) for n, p in peft_model.named_parameters())
        prefixes = {"vision": "base_model.model.vision_model.", "text": "base_model.model.text_model."}
        assert {tower for tower in prefixes if any(m.startswith(prefixes[tower]) for m in modules)} == set(towers)
        for tower, tower_type in (("vision", vision), ("text", "bert")):
            if tower in towers:
                tower_modules = [m for m in modules if m.startswith(prefixes[tower])]
                for suffix in EXPECTED_SUFFIXES[(tower_type, kind)]:
                    assert any(m.endswith(suffix) for m in tower_modules), (tower, suffix, tower_modules)
    if vision == "resnet":  # neither the stem nor the shortcut convolutions
        assert not any("embedder" in m or "shortcut" in m for m in modules)


def test_target_modules_override_and_bad_arguments():
    model = _base()
    peft_model = apply_adapters(model, config=build_peft_config(model, target_modules=["query"], r=2))
    assert all(name.endswith("query") for name in _adapted_modules(peft_model))
    with pytest.raises(ValueError, match="towers"):
        build_peft_config(_base(), towers=("audio",))
    with pytest.raises(ValueError, match="unknown adapter method"):
        build_peft_config(_base(), method="prefix")
    classifier = MedCLIPForImageClassification(tiny_config(num_labels=2))
    with pytest.raises(ValueError, match="no text tower"):
        build_peft_config(classifier, towers=("vision", "text"))
    assert default_target_modules(classifier, towers=("vision",)).startswith("(vision_model")
    assert build_peft_config(classifier, towers=("vision",)).modules_to_save == ["classifier"]
    heads = build_peft_config(_base(), towers=("text",), train_heads=True).modules_to_save
    assert heads == ["text_projection"]


@pytest.mark.parametrize("vision", ["resnet", "swin", "vit"])
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_and_unmerged_outputs_agree(vision, method, processor, xrays):
    # non-identity adapters, so that merging has something to merge
    init = {"init_ia3_weights": False} if method == "ia3" else {"init_lora_weights": False}
    base = _base(vision)
    peft_model = apply_adapters(copy.deepcopy(base), method=method, **init).eval()
    inputs = _inputs(processor, xrays[0][:4])
    with torch.no_grad():
        unmerged = peft_model(**inputs).logits_per_image
        original = base(**inputs).logits_per_image
        merged_model = peft_model.merge_and_unload()
        assert type(merged_model) is MedCLIPModel
        merged = merged_model(**inputs).logits_per_image
    assert (unmerged - original).abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)


def _train_contrastive(model, inputs, steps=3, lr=0.05):
    """Real optimisation steps in train mode (batch norms would normalise with, and track, batch statistics)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _batch_norm_statistics(model):
    return {name: buffer.clone() for name, buffer in model.state_dict().items() if "running_" in name}


def test_frozen_batch_norms_stay_in_eval_and_the_adapter_reloads_exactly(processor, xrays, tmp_path):
    base = _base("resnet")
    inputs = _inputs(processor, xrays[0][:4])
    statistics = _batch_norm_statistics(base)

    # the trap: plain get_peft_model trains in train mode and moves the frozen base's running statistics
    plain = get_peft_model(copy.deepcopy(base), build_peft_config(base, towers=("vision",), r=4))
    _train_contrastive(plain, inputs)
    moved = _batch_norm_statistics(plain.base_model.model)
    assert any(not torch.equal(moved[name], statistics[name]) for name in statistics)

    peft_model = apply_adapters(copy.deepcopy(base), towers=("vision",), r=4)
    peft_model.train()
    assert not any(m.training for m in peft_model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    _train_contrastive(peft_model, inputs)
    kept = _batch_norm_statistics(peft_model.base_model.model)
    assert all(torch.equal(kept[name], statistics[name]) for name in statistics)
    with torch.no_grad():
        adapted = peft_model(**inputs).logits_per_image
        assert (adapted - base(**inputs).logits_per_image).abs().max() > 1e-3

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits_per_image, adapted, atol=1e-6, rtol=0)


def _zero_shot_auc(model, processor, images, labels):
    prompts = {"Normal": ["clear lungs", "no acute cardiopulmonary process"],
               "Pneumonia": ["right lower lobe pneumonia", "patchy opacities"]}
    probs = ZeroShotClassifier(model, processor, prompts).classify(images).probs[:, 1]
    positives, negatives = probs[labels == 1], probs[labels == 0]
    return (positives[:, None] > negatives[None, :]).float().mean().item()


def test_adapter_push_to_hub_and_load_back_both_ways(hub_server, processor, xrays, tmp_path):
    base = _base("resnet")
    base.push_to_hub("user/medclip-tiny")
    processor.push_to_hub("user/medclip-tiny")
    images, labels = xrays
    inputs = _inputs(processor, images[:4])

    peft_model = apply_adapters(copy.deepcopy(base), towers=("vision", "text"), r=4, train_heads=True)
    peft_model.peft_config["default"].base_model_name_or_path = "user/medclip-tiny"
    _train_contrastive(peft_model, inputs)
    with torch.no_grad():
        adapted = peft_model(**inputs).logits_per_image
    auc = _zero_shot_auc(peft_model, processor, images, labels)
    card = adapter_model_card("user/medclip-tiny", {"pediatric-pneumonia-cxr (8 images)": {"roc_auc": auc}},
                              description="Three AdamW steps of LoRA on both towers and both heads.")
    push_adapter_to_hub(peft_model, "user/medclip-tiny-lora", card)

    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    base.save_pretrained(tmp_path / "base")
    assert adapter_bytes < 0.2 * (tmp_path / "base" / "model.safetensors").stat().st_size

    fresh = AutoModel.from_pretrained("user/medclip-tiny").eval()
    reloaded = PeftModel.from_pretrained(fresh, "user/medclip-tiny-lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits_per_image, adapted, atol=1e-6, rtol=0)

    with_adapter = AutoModel.from_pretrained("user/medclip-tiny")
    with_adapter.load_adapter("user/medclip-tiny-lora")
    with torch.no_grad():
        torch.testing.assert_close(with_adapter.eval()(**inputs).logits_per_image, adapted, atol=1e-6, rtol=0)

    hub_card = ModelCard.load("user/medclip-tiny-lora")
    assert hub_card.data.base_model == "user/medclip-tiny"
    assert hub_card.data.eval_results[0].metric_type == "roc_auc"
    assert hub_card.data.eval_results[0].metric_value == pytest.approx(auc)
    assert reloaded.peft_config["default"].base_model_name_or_path == "user/medclip-tiny"


def test_merged_dual_encoder_serves_the_stock_zero_shot_pipeline(processor, xrays, tmp_path):
    base = _base("resnet")
    images = xrays[0]
    peft_model = _train_contrastive(apply_adapters(base, r=4), _inputs(processor, images[:4]))
    labels = ["clear lungs", "right lower lobe pneumonia"]
    prompts = {label: [label] for label in labels}
    expected = ZeroShotClassifier(peft_model, processor, prompts).classify(images).probs

    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    stock = pipeline("zero-shot-image-classification", model=str(tmp_path / "merged"))
    outputs = stock(images, candidate_labels=labels, hypothesis_template="{}")
    stock_probs = torch.tensor([[next(d["score"] for d in out if d["label"] == label) for label in labels]
                                for out in outputs])
    torch.testing.assert_close(stock_probs, expected, atol=1e-5, rtol=0)


def test_merged_classifier_serves_the_stock_image_classification_pipeline(processor, xrays, tmp_path):
    images, labels = xrays
    config = tiny_config(num_labels=2, id2label={0: "normal", 1: "pneumonia"}, label2id={"normal": 0, "pneumonia": 1})
    torch.manual_seed(0)
    classifier = MedCLIPForImageClassification(config).eval()
    peft_model = apply_adapters(classifier, towers=("vision",), r=4)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        peft_model(pixel_values=pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        expected = F.softmax(peft_model.eval()(pixel_values=pixel_values).logits, dim=-1)

    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    processor.image_processor.save_pretrained(tmp_path / "merged")
    stock = pipeline("image-classification", model=str(tmp_path / "merged"), trust_remote_code=False)
    outputs = stock(images, top_k=None)
    stock_probs = torch.tensor([[next(d["score"] for d in out if d["label"] == name) for name in ("normal", "pneumonia")]
                                for out in outputs])
    torch.testing.assert_close(stock_probs, expected, atol=1e-5, rtol=0)
