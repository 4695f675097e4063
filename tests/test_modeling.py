"""ConVIRT and MedCLIP models on tiny towers: shapes, poolings, temperature, freezing, save / load, Auto classes."""

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from conftest import tiny_config, tiny_text_config, tiny_vision_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    BertModel,
    ResNetModel,
)

from modeling_medclip import (
    ConVIRTConfig,
    ConVIRTModel,
    MedCLIPConfig,
    MedCLIPForImageClassification,
    MedCLIPModel,
)
from modeling_medclip.losses import clip_loss, semantic_matching_loss


def _text_batch(batch_size=3, length=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 28000, (batch_size, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0  # one padded text
    input_ids[1, 5:] = 0
    return input_ids, attention_mask


def _model(model_type="medclip", vision="resnet", **kwargs):
    torch.manual_seed(0)
    model_class = {"medclip": MedCLIPModel, "convirt": ConVIRTModel}[model_type]
    return model_class(tiny_config(model_type, vision, **kwargs)).eval()


@pytest.mark.parametrize("vision", ["resnet", "swin", "vit"])
@pytest.mark.parametrize("model_type", ["medclip", "convirt"])
def test_forward_shapes_with_unequal_image_and_text_batches(model_type, vision):
    model = _model(model_type, vision)
    input_ids, attention_mask = _text_batch(batch_size=3)
    pixel_values = torch.randn(2, 1, 32, 32)
    output = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert output.logits_per_image.shape == (2, 3)
    assert output.logits_per_text.shape == (3, 2)
    assert output.image_embeds.shape == (2, 16) and output.text_embeds.shape == (3, 16)
    torch.testing.assert_close(output.image_embeds.norm(dim=-1), torch.ones(2))
    expected = model.get_logit_scale() * output.image_embeds @ output.text_embeds.T
    torch.testing.assert_close(output.logits_per_image, expected)
    assert output.loss is None
    image_features = model.get_image_features(pixel_values=pixel_values).pooler_output
    torch.testing.assert_close(F.normalize(image_features, dim=-1), output.image_embeds)


def test_one_and_three_channel_images_give_the_same_embeddings():
    model = _model()
    gray = torch.randn(2, 1, 32, 32)
    one = model.get_image_features(pixel_values=gray).pooler_output
    three = model.get_image_features(pixel_values=gray.repeat(1, 3, 1, 1)).pooler_output
    torch.testing.assert_close(one, three)
    with pytest.raises(ValueError, match="channels"):
        model.get_image_features(pixel_values=torch.randn(2, 2, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model.get_image_features(pixel_values=torch.randn(1, 32, 32))


@pytest.mark.parametrize("pooling", ["cls", "mean", "max"])
def test_masked_poolings_ignore_padding(pooling):
    model = _model(text_pooling=pooling)
    input_ids, attention_mask = _text_batch(batch_size=2, length=6)
    input_ids, attention_mask = input_ids[:1], torch.ones(1, 6, dtype=torch.long)
    padded_ids = torch.cat([input_ids, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([attention_mask, torch.zeros(1, 10, dtype=torch.long)], dim=1)
    plain = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    padded = model.get_text_features(input_ids=padded_ids, attention_mask=padded_mask).pooler_output
    torch.testing.assert_close(plain, padded, atol=1e-5, rtol=1e-5)


def test_poolings_match_reference_computations():
    input_ids, attention_mask = _text_batch()
    for pooling in ("cls", "mean", "max", "medclip"):
        model = _model(text_pooling=pooling)
        states = model.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        tokens = states.last_hidden_state
        mask = attention_mask.unsqueeze(-1).bool()
        if pooling == "cls":
            reference = tokens[:, 0]
        elif pooling == "mean":
            reference = torch.stack([tokens[i][mask[i, :, 0]].mean(0) for i in range(len(tokens))])
        elif pooling == "max":
            reference = torch.stack([tokens[i][mask[i, :, 0]].max(0).values for i in range(len(tokens))])
        else:  # the released MedCLIP code: stack layers 1, 2, last; mean over ALL tokens, then over layers
            hidden = states.hidden_states
            stacked = torch.stack([hidden[1], hidden[2], hidden[-1]])  # (3, B, L, D)
            reference = stacked.permute(1, 0, 2, 3).mean(2).mean(1)
        projected = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        torch.testing.assert_close(projected, model.text_projection(reference), atol=1e-5, rtol=1e-5)


def test_medclip_defaults_reproduce_the_paper():
    config = MedCLIPConfig()
    assert config.vision_config.model_type == "swin" and config.vision_config.embed_dim == 96
    assert list(config.vision_config.depths) == [2, 2, 6, 2]
    assert config.text_config.model_type == "bert" and config.text_config.hidden_size == 768
    assert config.text_config.vocab_size == 28996
    assert (config.projection_dim, config.projection_head, config.projection_bias) == (512, "linear", False)
    assert config.text_pooling == "medclip" and config.loss_type == "semantic"
    assert math.exp(config.logit_scale_init_value) == pytest.approx(1 / 0.07)
    assert config.learnable_logit_scale and config.max_logit_scale == 100


def test_convirt_defaults_reproduce_the_paper():
    config = ConVIRTConfig()
    assert config.vision_config.model_type == "resnet" and config.vision_config.hidden_sizes[-1] == 2048
    assert list(config.vision_config.depths) == [3, 4, 6, 3]
    assert (config.projection_head, config.projection_dim, config.text_pooling) == ("mlp", 512, "max")
    assert math.exp(config.logit_scale_init_value) == pytest.approx(10.0)  # tau = 0.1
    assert not config.learnable_logit_scale
    assert (config.loss_type, config.convirt_lambda, config.num_frozen_text_layers) == ("convirt", 0.75, 6)


def test_convirt_head_is_nonlinear_and_medclip_head_is_one_bias_free_linear():
    convirt, medclip = _model("convirt"), _model("medclip")
    layers = [type(m).__name__ for m in convirt.visual_projection]
    assert layers == ["Linear", "ReLU", "Linear"]
    assert isinstance(medclip.visual_projection, torch.nn.Linear) and medclip.visual_projection.bias is None
    assert medclip.visual_projection.in_features == 16  # the tiny ResNet's last stage: the pooled-output adapter


def test_logit_scale_is_clamped_without_mutating_the_parameter():
    model = _model()
    assert model.get_logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.get_logit_scale().item() == pytest.approx(100.0, rel=1e-5)
    input_ids, attention_mask = _text_batch()
    model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(3, 1, 32, 32))
    assert model.logit_scale.item() == 10.0


def test_convirt_temperature_is_fixed_at_0_1():
    model = _model("convirt")
    assert not model.logit_scale.requires_grad
    assert model.get_logit_scale().item() == pytest.approx(10.0, rel=1e-5)


@pytest.mark.parametrize("model_type", ["medclip", "convirt"])
def test_gradients_reach_both_towers_and_the_logit_scale(model_type):
    model = _model(model_type).train()
    input_ids, attention_mask = _text_batch()
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(3, 1, 32, 32),
        image_labels=torch.eye(3, 14),
        text_labels=torch.eye(3, 14),
        return_loss=True,
    )
    output.loss.backward()
    assert model.vision_model.embedder.embedder.convolution.weight.grad.abs().sum() > 0
    assert model.text_model.encoder.layer[-1].output.dense.weight.grad.abs().sum() > 0
    if model_type == "medclip":
        assert model.logit_scale.grad is not None and model.logit_scale.grad != 0
    else:  # ConVIRT: fixed temperature, frozen embeddings and first layer
        assert model.logit_scale.grad is None
        assert model.text_model.embeddings.word_embeddings.weight.grad is None
        assert model.text_model.encoder.layer[0].output.dense.weight.grad is None


def test_forward_loss_is_the_configured_loss():
    model = _model()  # semantic
    input_ids, attention_mask = _text_batch()
    image_labels, text_labels = torch.rand(2, 14), torch.rand(3, 14)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(2, 1, 32, 32),
        image_labels=image_labels,
        text_labels=text_labels,
        return_loss=True,
    )
    expected = semantic_matching_loss(output.logits_per_image, output.logits_per_text, image_labels, text_labels)
    torch.testing.assert_close(output.loss, expected)
    # without label vectors, a batch of as many images as texts is a paired batch: its InfoNCE, as in CLIPModel
    paired = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(3, 1, 32, 32),
                   return_loss=True)  # fmt: skip
    torch.testing.assert_close(paired.loss, clip_loss(paired.logits_per_image, paired.logits_per_text))
    with pytest.raises(ValueError, match="2 images and 3 texts.*image_labels"):
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 1, 32, 32), return_loss=True)


def test_sigmoid_loss_has_a_learnable_bias():
    model = _model(loss_type="sigmoid")
    assert model.logit_bias.item() == pytest.approx(-10.0)
    assert _model().logit_bias is None


def test_save_and_load_roundtrip_with_auto_classes(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    for auto_class in (AutoModel, AutoModelForZeroShotImageClassification, MedCLIPModel):
        loaded = auto_class.from_pretrained(tmp_path).eval()
        assert type(loaded) is MedCLIPModel
        input_ids, attention_mask = _text_batch()
        pixel_values = torch.randn(3, 1, 32, 32)
        torch.testing.assert_close(
            loaded(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits_per_image,
            model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits_per_image,
        )


def test_configs_accept_dicts_and_auto_config_for_model():
    config = AutoConfig.for_model(
        "medclip",
        vision_config={"model_type": "vit", "image_size": 32, "patch_size": 8, "hidden_size": 16,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 20},
        text_config={"model_type": "roberta", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "intermediate_size": 20},
        projection_dim=8,
        text_pooling="mean",
    )
    assert isinstance(config, MedCLIPConfig)
    assert config.vision_config.model_type == "vit" and config.text_config.model_type == "roberta"
    model = MedCLIPModel(config).eval()
    output = model(input_ids=torch.randint(3, 50, (2, 5)), pixel_values=torch.randn(4, 3, 32, 32))
    assert output.logits_per_image.shape == (4, 2)
    with pytest.raises(StrictDataclassFieldValidationError, match="text_pooling"):
        MedCLIPConfig(text_pooling="average")
    with pytest.raises(ValueError):
        ConVIRTConfig(convirt_lambda=1.5)


def test_from_vision_text_pretrained_loads_both_towers(tmp_path):
    torch.manual_seed(0)
    vision = ResNetModel(tiny_vision_config("resnet"))
    text = BertModel(tiny_text_config())
    vision.save_pretrained(tmp_path / "vision")
    text.save_pretrained(tmp_path / "text")
    model = ConVIRTModel.from_vision_text_pretrained(
        str(tmp_path / "vision"), str(tmp_path / "text"), projection_dim=8, num_frozen_text_layers=1
    )
    assert isinstance(model.config, ConVIRTConfig) and model.config.projection_dim == 8
    torch.testing.assert_close(
        model.vision_model.embedder.embedder.convolution.weight, vision.embedder.embedder.convolution.weight
    )
    torch.testing.assert_close(model.text_model.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight)
    assert model.text_model.pooler is None
    assert not model.text_model.encoder.layer[0].attention.self.query.weight.requires_grad
    assert model.text_model.encoder.layer[1].attention.self.query.weight.requires_grad


@pytest.mark.parametrize("vision", ["vit", "resnet", "swin"])
def test_gradient_checkpointing_gives_the_same_gradients(vision):
    def gradients(checkpointing):
        model = _model(vision=vision).train()
        model.config.text_config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.text_model.is_activation_checkpointing and model.vision_model.is_activation_checkpointing
            state_keys = set(model.state_dict())
            assert state_keys == set(_model(vision=vision).state_dict())
        input_ids, attention_mask = _text_batch()
        output = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)),
            image_labels=torch.eye(3, 14),
            text_labels=torch.eye(3, 14),
            return_loss=True,
        )
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        # batch-norm running statistics (ResNet) must be updated once, not again by the recomputation
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        return grads, buffers

    (plain, plain_buffers), (checkpointed, checkpointed_buffers) = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-5, rtol=1e-4)
    for name in plain_buffers:
        torch.testing.assert_close(plain_buffers[name], checkpointed_buffers[name])


def test_sdpa_attention_is_passed_to_the_text_tower_and_matches_eager(tmp_path):
    _model().save_pretrained(tmp_path)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        # ResNet has no attention: the implementation is chosen for the text tower only
        model = MedCLIPModel.from_pretrained(tmp_path, attn_implementation={"text_config": implementation}).eval()
        assert model.text_model.config._attn_implementation == implementation
        input_ids, attention_mask = _text_batch()
        outputs[implementation] = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], atol=1e-5, rtol=1e-4)


def test_forward_compiles_without_graph_breaks():
    model = _model(vision="vit", text_pooling="mean")
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    input_ids, attention_mask = _text_batch()
    pixel_values = torch.randn(3, 1, 32, 32)
    expected = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits_per_image
    actual = compiled(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits_per_image
    torch.testing.assert_close(actual, expected)


class TestImageClassification:
    def _classifier(self, **kwargs):
        torch.manual_seed(0)
        return MedCLIPForImageClassification(tiny_config(**kwargs)).eval()

    def test_single_label(self):
        model = self._classifier(num_labels=3)
        labels = torch.tensor([0, 2])
        output = model(pixel_values=torch.randn(2, 1, 32, 32), labels=labels)
        assert output.logits.shape == (2, 3)
        torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, labels))

    def test_multi_label(self):
        model = self._classifier(num_labels=4, problem_type="multi_label_classification")
        labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
        output = model(pixel_values=torch.randn(2, 1, 32, 32), labels=labels)
        torch.testing.assert_close(output.loss, F.binary_cross_entropy_with_logits(output.logits, labels))

    def test_binary(self):
        model = self._classifier(num_labels=1)
        labels = torch.tensor([1, 0])
        output = model(pixel_values=torch.randn(2, 1, 32, 32), labels=labels)
        assert output.logits.shape == (2, 1)
        torch.testing.assert_close(
            output.loss, F.binary_cross_entropy_with_logits(output.logits[:, 0], labels.float())
        )

    def test_wrong_label_shape_is_a_clear_error(self):
        model = self._classifier(num_labels=3, problem_type="multi_label_classification")
        with pytest.raises(ValueError, match="labels"):
            model(pixel_values=torch.randn(2, 1, 32, 32), labels=torch.ones(2, 5))

    @pytest.mark.parametrize("features", ["pooled", "normalized_embeds"])
    def test_loads_the_vision_tower_of_a_pretrained_dual_encoder(self, tmp_path, features):
        dual = _model()
        dual.save_pretrained(tmp_path)
        classifier = AutoModelForImageClassification.from_pretrained(
            tmp_path, num_labels=2, classifier_features=features
        ).eval()
        assert isinstance(classifier, MedCLIPForImageClassification)
        pixel_values = torch.randn(2, 1, 32, 32)
        expected = dual.get_image_features(pixel_values=pixel_values).pooler_output
        if features == "normalized_embeds":
            torch.testing.assert_close(classifier.get_image_features(pixel_values), F.normalize(expected, dim=-1))
        else:
            pooled = dual.vision_model(pixel_values=pixel_values.expand(-1, 3, -1, -1)).pooler_output.flatten(1)
            torch.testing.assert_close(classifier.get_image_features(pixel_values), pooled)
