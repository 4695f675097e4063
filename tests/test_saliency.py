"""Grad-CAM saliency of image-text similarity on tiny ResNet, Swin and ViT towers, with a real X-ray."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor

pytest.importorskip("matplotlib", reason="saliency overlays need matplotlib: pip install medclip-hf[demo]")
from modeling_medclip.saliency import _heatmap_on_image, image_text_saliency, overlay_heatmap  # noqa: E402

EFFUSION = "large right pleural effusion"
NORMAL = ["no acute cardiopulmonary process", "normal chest radiograph"]


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def xray(covid_cxr_dir):
    image = PIL.Image.open(covid_cxr_dir / "images" / "000001-12.jpg")
    assert image.width != image.height  # exercises the pad-to-square geometry
    return image


def tiny_model(vision: str) -> MedCLIPModel:
    torch.manual_seed(0)
    return MedCLIPModel(tiny_config(vision=vision))


@pytest.mark.parametrize("vision", ["resnet", "swin", "vit"])
def test_heatmap_has_the_image_size_and_unit_range(vision, processor, xray):
    saliency = image_text_saliency(tiny_model(vision).eval(), processor, xray, EFFUSION)
    assert saliency.heatmap.shape == (xray.height, xray.width)
    assert saliency.heatmap.dtype == np.float32
    assert saliency.heatmap.min() >= 0.0 and saliency.heatmap.max() == pytest.approx(1.0)
    assert saliency.image.size == xray.size and saliency.image.mode == "L"
    assert -1.0 <= saliency.similarity <= 1.0


@pytest.mark.parametrize("vision", ["resnet", "swin", "vit"])
def test_heatmap_changes_with_the_text(vision, processor, xray):
    model = tiny_model(vision).eval()
    effusion = image_text_saliency(model, processor, xray, EFFUSION)
    normal = image_text_saliency(model, processor, xray, NORMAL)
    assert np.abs(effusion.heatmap - normal.heatmap).max() > 1e-2
    assert effusion.similarity != pytest.approx(normal.similarity)


def test_similarity_is_the_models_cosine_similarity(processor, xray):
    model = tiny_model("resnet").eval()
    saliency = image_text_saliency(model, processor, xray, EFFUSION)
    inputs = processor(text=[EFFUSION], images=saliency.image, return_tensors="pt", padding=True)
    with torch.no_grad():
        outputs = model(**inputs)
    assert saliency.similarity == pytest.approx(float(outputs.image_embeds[0] @ outputs.text_embeds[0]), abs=1e-5)


def test_several_prompts_are_one_ensemble(processor, xray):
    model = tiny_model("resnet").eval()
    single = image_text_saliency(model, processor, xray, EFFUSION)
    as_list = image_text_saliency(model, processor, xray, [EFFUSION])
    np.testing.assert_allclose(single.heatmap, as_list.heatmap, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_model_mode_and_gradients_are_left_as_they_were(training, processor, xray):
    model = tiny_model("swin").train(training)
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    image_text_saliency(model, processor, xray, EFFUSION)
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert [parameter.requires_grad for parameter in model.parameters()] == requires_grad


def test_frozen_model_gets_a_map(processor, xray):
    model = tiny_model("resnet").eval().requires_grad_(False)
    saliency = image_text_saliency(model, processor, xray, EFFUSION)
    assert saliency.heatmap.max() == pytest.approx(1.0)


def test_map_is_carried_back_through_padding_and_crop():
    # A 100 x 50 (width x height) image is pasted on a 100 x 100 canvas at rows 25-75, resized to 40, cropped to 40.
    processor = MedCLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40})
    top_half = torch.zeros(8, 8)
    top_half[:4] = 1.0  # canvas rows 0-50 are hot: image rows 0-25
    heatmap = _heatmap_on_image(top_half, processor, height=50, width=100).numpy()
    assert heatmap.shape == (50, 100)
    assert heatmap[:18].min() > 0.99 and heatmap[32:].max() < 0.01  # bilinear edge at row 25
    # A crop smaller than the resized canvas cuts off the border: the map is 0 there.
    cropping = MedCLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 20, "width": 20})
    heatmap = _heatmap_on_image(torch.ones(4, 4), cropping, height=100, width=100).numpy()
    assert heatmap[45:55, 45:55].min() > 0.99 and heatmap[:20].max() == 0.0


def test_overlay_keeps_the_xray_where_the_map_is_zero(processor, xray):
    saliency = image_text_saliency(tiny_model("resnet").eval(), processor, xray, EFFUSION)
    overlay = saliency.overlay()
    assert overlay.mode == "RGB" and overlay.size == xray.size
    pixels, gray = np.asarray(overlay), np.asarray(saliency.image)
    cold = saliency.heatmap == 0.0
    assert cold.any() and (saliency.heatmap > 0.5).any()
    assert np.array_equal(pixels[cold], np.repeat(gray[cold][:, None], 3, axis=1))
    hot = saliency.heatmap > 0.5
    assert not np.array_equal(pixels[hot], np.repeat(gray[hot][:, None], 3, axis=1))


def test_overlay_rejects_a_map_of_another_size(xray):
    with pytest.raises(ValueError, match="heatmap has shape"):
        overlay_heatmap(xray.convert("L"), np.zeros((3, 3), np.float32))
