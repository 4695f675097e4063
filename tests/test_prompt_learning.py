"""CoOp learned prompt context: its inputs, training with frozen towers, safetensors round trip, and its use by
ZeroShotClassifier and the exported zero-shot head."""

import pytest
import torch
from conftest import tiny_config
from support.pneumonia import build_processor, sample_xrays
from transformers import pipeline

from modeling_medclip import MedCLIPModel
from modeling_medclip.prompt_learning import CONTEXT_FILE, PromptContext, train_prompt_context
from modeling_medclip.zero_shot import ZeroShotClassifier, export_zero_shot_head

CLASSES = ["normal lungs", "pneumonia"]
INIT = "chest x-ray showing"


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return build_processor(tokenizer_dir, size=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # MedCLIP's unmasked pooling: embeddings depend on padding, so equal embeddings mean identical inputs
    return MedCLIPModel(tiny_config(text_pooling="medclip", logit_scale_init_value=3.0)).eval()


@pytest.fixture(scope="module")
def xrays(shared_data):
    """Real pediatric chest X-rays, 6 normal and 6 pneumonia, with their labels (1 = pneumonia)."""
    return sample_xrays(shared_data / "pediatric-pneumonia-cxr", per_class=6)


def test_context_initialised_from_text_equals_the_hand_written_prompt(model, processor):
    context = PromptContext.initialize(model, processor.tokenizer, CLASSES, init_text=INIT)
    assert context.n_ctx == len(processor.tokenizer(INIT, add_special_tokens=False)["input_ids"])
    learned = ZeroShotClassifier(model, processor, context)
    written = ZeroShotClassifier(model, processor, {name: [f"{INIT} {name}"] for name in CLASSES})
    assert learned.class_names == CLASSES
    torch.testing.assert_close(learned.class_embeddings, written.class_embeddings, atol=1e-6, rtol=0)

    random_context = PromptContext.initialize(model, processor.tokenizer, CLASSES, n_ctx=3, seed=1)
    assert random_context.context.shape == (3, model.config.text_config.hidden_size)
    inputs = random_context.class_inputs(model, processor.tokenizer)
    names = processor.tokenizer(CLASSES, padding=True, return_tensors="pt")
    assert inputs["inputs_embeds"].shape[1] == names["input_ids"].shape[1] + 3
    torch.testing.assert_close(inputs["attention_mask"][:, 1:4], torch.ones(2, 3, dtype=torch.long))


def test_training_moves_only_the_context(model, processor, xrays):
    images, labels = xrays
    classifier = ZeroShotClassifier(model, processor, {name: [name] for name in CLASSES})
    embeddings = classifier.encode_images(images)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    context = PromptContext.initialize(model, processor.tokenizer, CLASSES, init_text=INIT)
    start = context.context.detach().clone()

    losses = train_prompt_context(model, processor.tokenizer, context, embeddings, labels, epochs=30, batch_size=4,
                                  learning_rate=0.05)
    print(f"CoOp loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < losses[0]
    assert not torch.equal(context.context, start)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ValueError, match="class indices"):
        train_prompt_context(model, processor.tokenizer, context, embeddings, labels + 5, epochs=1)


def test_context_saves_as_safetensors_and_serves_through_the_exported_head(model, processor, xrays, tmp_path):
    images, _ = xrays
    context = PromptContext.initialize(model, processor.tokenizer, CLASSES, n_ctx=4, seed=3)
    path = context.save_pretrained(tmp_path / "context")
    assert path.name == CONTEXT_FILE
    reloaded = PromptContext.from_pretrained(tmp_path / "context")
    assert reloaded.class_names == CLASSES
    torch.testing.assert_close(reloaded.context, context.context)

    classifier = ZeroShotClassifier(model, processor, reloaded)
    expected = classifier.classify(images).probs
    torch.testing.assert_close(ZeroShotClassifier(model, processor, context).classify(images).probs, expected)
    export_zero_shot_head(classifier, tmp_path / "head")
    stock = pipeline("image-classification", model=str(tmp_path / "head"), trust_remote_code=False)
    stock_probs = torch.tensor([[next(d["score"] for d in out if d["label"] == name) for name in CLASSES]
                                for out in stock(images, top_k=None)])
    torch.testing.assert_close(stock_probs, expected, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="multi-class only"):
        ZeroShotClassifier(model, processor, context, mode="multilabel")
    (tmp_path / "bad").mkdir()
    with pytest.raises(FileNotFoundError, match="no learned prompt context"):
        PromptContext.from_pretrained(tmp_path / "bad")
