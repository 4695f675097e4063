"""Tests for the ConVIRT / MedCLIP training augmentations on real chest X-rays."""

import math
from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from modeling_medclip.augmentation import AUGMENTATIONS, XRayAugmentation, build_augmentation
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor


NUM_DRAWS = 400


@pytest.fixture(scope="module")
def processor() -> MedCLIPImageProcessor:
    return MedCLIPImageProcessor()


@pytest.fixture(scope="module")
def xrays(covid_cxr_dir) -> list[PIL.Image.Image]:
    paths = sorted((covid_cxr_dir / "images").glob("*.jpg"))[:3]
    return [PIL.Image.open(path).copy() for path in paths]


def test_names():
    assert AUGMENTATIONS == ("convirt", "medclip", "none")
    with pytest.raises(ValueError, match="simclr"):
        build_augmentation("simclr", MedCLIPImageProcessor())


@pytest.mark.parametrize("name", AUGMENTATIONS)
@pytest.mark.parametrize("num_channels", [1, 3])
def test_shapes_and_dtypes(name, num_channels, xrays):
    augment = build_augmentation(name, MedCLIPImageProcessor(num_channels=num_channels))
    for seed, image in enumerate(xrays):
        pixel_values = augment(image, seed=seed)
        assert pixel_values.shape == (num_channels, 224, 224)
        assert pixel_values.dtype == torch.float32
        assert torch.isfinite(pixel_values).all()
    rgba = xrays[0].convert("RGBA")
    assert augment(rgba, seed=0).shape == (num_channels, 224, 224)
    assert build_augmentation(name, MedCLIPImageProcessor(), size=128)(xrays[0], seed=0).shape == (1, 128, 128)


@pytest.mark.parametrize("name", ["convirt", "medclip"])
def test_deterministic_under_a_seed_and_varies_across_seeds(name, processor, xrays):
    augment = build_augmentation(name, processor)
    image = xrays[0]
    assert torch.equal(augment(image, seed=7), augment(image, seed=7))
    assert torch.equal(
        augment(image, generator=torch.Generator().manual_seed(3)),
        augment(image, generator=torch.Generator().manual_seed(3)),
    )
    outputs = [augment(image, seed=seed) for seed in range(4)]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert not torch.equal(outputs[i], outputs[j])
    with pytest.raises(ValueError, match="either"):
        augment(image, generator=torch.Generator(), seed=1)


def test_none_is_the_image_processor_transform(processor, xrays):
    augment = build_augmentation("none", processor)
    for image in xrays:
        expected = processor(image, return_tensors="pt")["pixel_values"][0]
        assert torch.equal(augment(image, seed=1), expected)
        assert torch.equal(augment(image, seed=2), expected)


def test_training_and_eval_share_normalization(processor, xrays):
    """With every random operation disabled, the augmentation reduces to the eval transform (up to resampling)."""
    identity = XRayAugmentation(processor, size=224, flip_probability=0.0)
    for image in xrays:
        difference = identity(image, seed=0) - processor(image, return_tensors="pt")["pixel_values"][0]
        assert difference.abs().max() < 1e-6


def sample(augment, generator_seed=0, size=512):
    generator = torch.Generator().manual_seed(generator_seed)
    return [augment.sample_parameters(size, size, generator) for _ in range(NUM_DRAWS)]


def assert_spans(values, low, high, slack):
    """All values lie in `[low, high]` and come within `slack` of both ends."""
    values = np.asarray(values, dtype=np.float64)
    assert values.min() >= low - 1e-9 and values.max() <= high + 1e-9
    assert values.min() <= low + slack and values.max() >= high - slack


def test_convirt_parameters_follow_the_paper(processor):
    draws = sample(build_augmentation("convirt", processor))
    areas, ratios = [], []
    for draw in draws:
        left, top, right, bottom = draw.crop_box
        assert 0 <= left < right <= 512 and 0 <= top < bottom <= 512
        areas.append((right - left) * (bottom - top) / 512**2)
        ratios.append((right - left) / (bottom - top))
    assert_spans(areas, 0.6 - 0.01, 1.0, slack=0.05)
    assert_spans(ratios, 3 / 4 - 0.01, 4 / 3 + 0.01, slack=0.1)
    assert 0.4 < np.mean([draw.flip for draw in draws]) < 0.6
    assert_spans([draw.angle for draw in draws], -20, 20, slack=1.0)
    assert_spans([t for draw in draws for t in draw.translate], -0.1, 0.1, slack=0.01)
    assert_spans([draw.scale for draw in draws], 0.95, 1.05, slack=0.01)
    assert_spans([draw.brightness for draw in draws], 0.6, 1.4, slack=0.05)
    assert_spans([draw.contrast for draw in draws], 0.6, 1.4, slack=0.05)
    assert_spans([draw.blur_sigma for draw in draws], 0.1, 3.0, slack=0.1)
    assert all(draw.crop_offset is None for draw in draws)


def test_medclip_parameters_follow_the_paper(processor):
    draws = sample(build_augmentation("medclip", processor))
    assert all(draw.crop_box is None and draw.blur_sigma is None for draw in draws)
    assert 0.4 < np.mean([draw.flip for draw in draws]) < 0.6
    assert_spans([draw.angle for draw in draws], -10, 10, slack=0.5)
    assert_spans([t for draw in draws for t in draw.translate], -0.0625, 0.0625, slack=0.005)
    assert_spans([draw.scale for draw in draws], 0.8, 1.1, slack=0.02)
    assert_spans([draw.brightness for draw in draws], 0.8, 1.2, slack=0.03)
    assert_spans([draw.contrast for draw in draws], 0.8, 1.2, slack=0.03)
    assert_spans([offset for draw in draws for offset in draw.crop_offset], 0, 256 - 224, slack=0)


def test_flip_happens_about_half_the_time_on_an_image():
    """Observed on the output: a 16x16 image with a bright left half comes out flipped for ~50% of the seeds."""
    pixels = np.zeros((16, 16), dtype=np.uint8)
    pixels[:, :8] = 255
    processor = MedCLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16, do_normalize=False)
    augment = XRayAugmentation(processor, size=16, flip_probability=0.5)
    flipped = [augment(PIL.Image.fromarray(pixels), seed=seed)[0, 0, 0].item() == 0.0 for seed in range(NUM_DRAWS)]
    assert 0.4 < np.mean(flipped) < 0.6


def center_of_mass(image: PIL.Image.Image) -> tuple[float, float]:
    pixels = np.asarray(image, dtype=np.float64)
    rows, columns = np.indices(pixels.shape)
    return (columns * pixels).sum() / pixels.sum(), (rows * pixels).sum() / pixels.sum()


def test_affine_translate_rotate_and_scale_act_as_parameterized(processor):
    augment = XRayAugmentation(processor, size=64)
    base = augment.sample_parameters(64, 64, torch.Generator().manual_seed(0))
    base = replace(base, flip=False, angle=0.0, translate=(0.0, 0.0), scale=1.0)
    square = np.zeros((64, 64), dtype=np.uint8)
    square[28:36, 28:36] = 255
    bar = np.zeros((64, 64), dtype=np.uint8)
    bar[30:34, 12:52] = 255

    shifted = augment.apply(PIL.Image.fromarray(square), replace(base, translate=(0.125, -0.0625)))
    x, y = center_of_mass(shifted)
    assert abs(x - (31.5 + 8)) < 0.5 and abs(y - (31.5 - 4)) < 0.5

    rotated = np.asarray(augment.apply(PIL.Image.fromarray(bar), replace(base, angle=90.0)))
    assert rotated[12:52, 30:34].mean() > 200 and rotated[30:34, 12:20].mean() < 20

    zoomed = np.asarray(augment.apply(PIL.Image.fromarray(square), replace(base, scale=2.0)))
    assert math.isclose((zoomed > 127).sum(), 4 * 64, rel_tol=0.15)


def test_brightness_and_contrast_act_as_parameterized(processor, xrays):
    augment = XRayAugmentation(processor, size=224, brightness=0.4, contrast=0.4)
    image = PIL.Image.fromarray(np.asarray(xrays[0].convert("L").resize((224, 224))) // 2)  # no saturation
    base = augment.sample_parameters(224, 224, torch.Generator().manual_seed(0))
    base = replace(base, flip=False, angle=0.0, translate=(0.0, 0.0), scale=1.0, brightness=1.0, contrast=1.0)
    pixels = np.asarray(image, dtype=np.float64)
    brighter = np.asarray(augment.apply(image, replace(base, brightness=1.4)), dtype=np.float64)
    assert math.isclose(brighter.mean(), 1.4 * pixels.mean(), rel_tol=0.01)
    flatter = np.asarray(augment.apply(image, replace(base, contrast=0.6)), dtype=np.float64)
    assert math.isclose(flatter.std(), 0.6 * pixels.std(), rel_tol=0.02)


def test_blur_reduces_high_frequencies(processor, xrays):
    augment = XRayAugmentation(processor, size=224, blur_sigma=(0.1, 3.0))
    image = xrays[0].convert("L").resize((224, 224))
    base = augment.sample_parameters(224, 224, torch.Generator().manual_seed(0))
    base = replace(base, flip=False, angle=0.0, translate=(0.0, 0.0), scale=1.0)

    def roughness(sigma):
        pixels = np.asarray(augment.apply(image, replace(base, blur_sigma=sigma)), dtype=np.float64)
        return np.abs(np.diff(pixels, axis=1)).mean()

    assert roughness(3.0) < roughness(1.0) < roughness(0.1)


class _XRayDataset(Dataset):
    def __init__(self, images, augment):
        self.images, self.augment = images, augment

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.augment(self.images[0])  # torch's default generator: seeded per worker by the DataLoader


def test_dataloader_worker_seeding_is_reproducible(processor, xrays):
    dataset = _XRayDataset(xrays, build_augmentation("convirt", processor))

    def load(seed):
        loader = DataLoader(dataset, batch_size=4, num_workers=2, generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))

    first, again, other = load(0), load(0), load(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])  # across samples
