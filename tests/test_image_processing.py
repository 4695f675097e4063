"""Tests for `MedCLIPImageProcessor` on real chest X-rays from `shared/data/covid-cxr`."""

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor, PreTrainedConfig
from support import bad_inputs

from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor, to_grayscale_uint8


MEAN = 0.5862785803043838
STD = 0.27950088968644304
ONE_GRAY_LEVEL = 1 / 255 / STD  # one 8-bit step after normalization


def reference_medclip_preprocessing(path: Path) -> np.ndarray:
    """The original MedCLIP preprocessing, written independently with plain PIL + NumPy: `(1, 224, 224)` float32."""
    image = PIL.Image.open(path)
    width, height = image.size
    side = max(224, width, height)
    canvas = PIL.Image.new("L", (side, side), 0)
    canvas.paste(image, (int((side - width) / 2), int((side - height) / 2)))
    canvas = canvas.resize((224, 224), resample=PIL.Image.BICUBIC)
    left, top = (canvas.width - 224) // 2, (canvas.height - 224) // 2
    canvas = canvas.crop((left, top, left + 224, top + 224))
    pixels = np.asarray(canvas).astype(np.float32) * np.float32(1 / 255)
    return ((pixels - np.float32(MEAN)) / np.float32(STD))[None]


@pytest.fixture(scope="module")
def image_paths(covid_cxr_dir) -> list[Path]:
    """A few real X-rays, including every one with a side under 224 pixels (padded, not upsampled)."""
    paths = sorted((covid_cxr_dir / "images").glob("*.jpg"))
    small = [path for path in paths if min(PIL.Image.open(path).size) < 224]
    assert small, "expected a few small images in covid-cxr"
    return paths[:5] + small[:2]


@pytest.fixture(scope="module")
def processor() -> MedCLIPImageProcessor:
    return MedCLIPImageProcessor()


@pytest.fixture(scope="module")
def gray(image_paths) -> np.ndarray:
    """One real X-ray as a `(H, W)` uint8 array."""
    return np.asarray(PIL.Image.open(image_paths[0]).convert("L"))


def process(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def test_defaults_match_original_medclip_preprocessing(processor, image_paths):
    pixel_values = process(processor, image_paths)
    assert pixel_values.shape == (len(image_paths), 1, 224, 224)
    assert pixel_values.dtype == torch.float32
    expected = np.stack([reference_medclip_preprocessing(path) for path in image_paths])
    assert np.abs(pixel_values.numpy() - expected).max() < 1e-6


def test_pil_numpy_torch_and_path_inputs_agree(processor, image_paths, gray):
    expected = process(processor, image_paths[0])
    inputs = [
        PIL.Image.fromarray(gray),
        gray,
        gray[:, :, None],
        np.repeat(gray[:, :, None], 3, axis=2),
        torch.from_numpy(gray.copy())[None],
        torch.from_numpy(gray.astype(np.float32) / 255),
        str(image_paths[0]),
    ]
    for image in inputs:
        assert torch.equal(process(processor, image), expected), type(image)


def test_rgb_and_rgba_inputs(processor, gray):
    expected = process(processor, gray)
    rgb = PIL.Image.merge("RGB", [PIL.Image.fromarray(gray)] * 3)
    assert torch.equal(process(processor, rgb), expected)

    # RGBA is composited on black: a transparent left half becomes black.
    alpha = np.full_like(gray, 255)
    alpha[:, : gray.shape[1] // 2] = 0
    rgba = PIL.Image.merge("RGBA", [PIL.Image.fromarray(gray)] * 3 + [PIL.Image.fromarray(alpha)])
    half_black = gray.copy()
    half_black[:, : gray.shape[1] // 2] = 0
    assert torch.equal(process(processor, rgba), process(processor, half_black))
    assert not torch.equal(process(processor, rgba), expected)

    palette = PIL.Image.fromarray(gray).convert("P")
    assert process(processor, palette).shape == (1, 1, 224, 224)


def test_16_bit_png_matches_8_bit(processor, image_paths, gray, tmp_path):
    expected = process(processor, image_paths[0])

    full_range = tmp_path / "full_range_16bit.png"
    PIL.Image.fromarray(gray.astype(np.uint16) * 257).save(full_range)
    assert PIL.Image.open(full_range).mode.startswith("I")
    assert torch.equal(process(processor, full_range), expected)

    # 12-bit data stored in 16 bits are scaled by 4095, not by 65535 (nor clipped at 255 like PIL's convert("L")).
    twelve_bit = tmp_path / "twelve_bit.png"
    PIL.Image.fromarray(gray.astype(np.uint16) * 16).save(twelve_bit)
    decoded = to_grayscale_uint8(twelve_bit).astype(int)
    assert np.abs(decoded - gray).max() == 1
    # The bicubic resize can turn a one-level input difference into two levels.
    assert (process(processor, twelve_bit) - expected).abs().max() <= 2 * ONE_GRAY_LEVEL + 1e-5

    stretched = process(processor, twelve_bit, high_bit_depth_scaling="min_max")
    assert torch.allclose(stretched, process(processor, gray.astype(np.int32), high_bit_depth_scaling="min_max"))


def test_high_bit_depth_arrays(processor, gray):
    expected = process(processor, gray)
    assert torch.equal(process(processor, gray.astype(np.uint16) * 257), expected)
    assert torch.equal(process(processor, torch.from_numpy(gray.astype(np.int32))), expected)
    # Negative values (e.g. CT-like signed data) are min-max stretched.
    signed = gray.astype(np.int16) - 1000
    assert torch.equal(process(processor, signed), process(processor, gray, high_bit_depth_scaling="min_max"))


def test_num_channels_3_repeats_the_grayscale_image(image_paths):
    one = process(MedCLIPImageProcessor(), image_paths[:2])
    three = process(MedCLIPImageProcessor(num_channels=3), image_paths[:2])
    assert three.shape == (2, 3, 224, 224)
    assert torch.equal(three, one.expand(-1, 3, -1, -1))


def test_configurable_pipeline(gray):
    processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size=48, do_normalize=False)
    pixel_values = process(processor, gray)
    assert pixel_values.shape == (1, 1, 48, 48)
    assert 0.0 <= pixel_values.min() and pixel_values.max() <= 1.0
    unpadded = process(MedCLIPImageProcessor(do_pad_square=False, do_center_crop=False), gray)
    height, width = gray.shape
    short, long = sorted((height, width))
    expected = (224, int(224 * long / short))
    assert unpadded.shape[-2:] == (expected if height < width else expected[::-1])


def test_save_and_load_roundtrip(image_paths, tmp_path):
    processor = MedCLIPImageProcessor(num_channels=3, crop_size=200, high_bit_depth_scaling="min_max")
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    reloaded = MedCLIPImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert reloaded.num_channels == 3 and reloaded.high_bit_depth_scaling == "min_max"
    assert torch.equal(process(reloaded, image_paths[:2]), process(processor, image_paths[:2]))


def test_auto_image_processor_registration(image_paths, tmp_path):
    class ThrowawayMedCLIPConfig(PreTrainedConfig):
        model_type = "throwaway-medclip-image-processing-test"

    AutoImageProcessor.register(ThrowawayMedCLIPConfig, image_processor_classes={"pil": MedCLIPImageProcessor})
    MedCLIPImageProcessor(crop_size=192).save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is MedCLIPImageProcessor
    assert process(loaded, image_paths[0]).shape == (1, 1, 192, 192)


@pytest.mark.parametrize(
    "bad_input, message",
    [
        ([], "empty list"),
        (np.zeros((2, 64, 64, 1), dtype=np.uint8), "4 dimensions"),
        (np.zeros((64,), dtype=np.uint8), "1 dimensions"),
        (np.zeros((64, 64), dtype=np.complex64), "dtype complex64"),
        (np.zeros((64, 64), dtype=bool), "dtype bool"),
        (torch.zeros(64, 64, dtype=torch.bool), "dtype torch.bool"),
        (np.full((64, 64), np.nan, dtype=np.float32), "NaN"),
        (np.zeros((64, 64, 7), dtype=np.uint8), "channel axis"),
        (12, "Unsupported image type int"),
    ],
)
def test_bad_inputs_raise_value_error(processor, bad_input, message):
    with pytest.raises(ValueError, match=message):
        processor(bad_input)


def test_bad_files_raise_value_error_naming_the_path(processor, image_paths, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(image_paths[0].read_bytes()[:2000])
    missing = tmp_path / "missing.jpg"
    for path in (corrupt, truncated, missing):
        with pytest.raises(ValueError, match=path.name):
            processor(str(path))
    with pytest.raises(ValueError, match="truncated.jpg"):
        processor([image_paths[0], truncated])


# ---------------------------------------------------------------------------------------------------- DICOM


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits_stored: int, **elements) -> Path:
    """A minimal uncompressed secondary-capture DICOM file (skips the test without pydicom)."""
    pytest.importorskip("pydicom")
    return bad_inputs.write_dicom(path, pixels, photometric, bits_stored, **elements)


def test_dicom_rescale_and_window(processor, image_paths, gray, tmp_path):
    # Modality values 8 * gray via slope/intercept; the window [0, 2040] maps them linearly onto the display range.
    stored = gray.astype(np.uint16) * 16 + 100
    path = write_dicom(
        tmp_path / "mono2.dcm",
        stored,
        "MONOCHROME2",
        16,
        RescaleSlope=0.5,
        RescaleIntercept=-50,
        WindowCenter=1020.5,
        WindowWidth=2041,
    )
    assert torch.equal(process(processor, path), process(processor, image_paths[0]))

    # A narrower window saturates: everything above the window is white.
    narrow = write_dicom(
        tmp_path / "narrow.dcm", stored, "MONOCHROME2", 16, RescaleSlope=0.5, RescaleIntercept=-50,
        WindowCenter=500, WindowWidth=200,
    )
    decoded = to_grayscale_uint8(narrow)
    assert (decoded[8 * gray.astype(np.int64) > 600] == 255).all()
    assert (decoded[8 * gray.astype(np.int64) < 400] == 0).all()


def test_dicom_monochrome1_is_inverted(processor, gray, tmp_path):
    mono2 = write_dicom(tmp_path / "mono2.dcm", gray.astype(np.uint16) * 16, "MONOCHROME2", 12)
    mono1 = write_dicom(tmp_path / "mono1.dcm", 4095 - gray.astype(np.uint16) * 16, "MONOCHROME1", 12)
    assert torch.allclose(process(processor, mono1), process(processor, mono2), atol=1e-5)
    stretched = process(processor, gray, high_bit_depth_scaling="min_max")
    assert torch.allclose(process(processor, mono2), stretched, atol=1e-5)


def test_dicom_voi_lut_sequence_and_magic_detection(processor, image_paths, gray, tmp_path):
    pydicom = pytest.importorskip("pydicom")

    lut = pydicom.Dataset()
    # A 16-bit LUT mapping stored value 16 * g to 257 * g (pydicom 3.0.2 mis-indexes 8-bit LUTs with > 256 entries).
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = (np.arange(4096, dtype="<u2") // 16 * 257).tobytes()
    path = write_dicom(
        tmp_path / "voi_lut_without_suffix", gray.astype(np.uint16) * 16, "MONOCHROME2", 12,
        VOILUTSequence=[lut], WindowCenter=100, WindowWidth=50,  # the LUT takes precedence over the window
    )
    assert torch.equal(process(processor, path), process(processor, image_paths[0]))


def test_dicom_without_pydicom_raises_install_hint(processor, gray, tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "image.dcm", gray.astype(np.uint16), "MONOCHROME2", 8)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(ImportError, match=r"pip install medclip-hf\[dicom\]"):
        processor(path)


def test_corrupt_dicom_raises_value_error(processor, tmp_path):
    path = tmp_path / "broken.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    with pytest.raises(ValueError, match="broken.dcm"):
        processor(path)


def test_dicom_color_and_multi_frame(processor, image_paths, gray, tmp_path):
    expected = process(processor, image_paths[0])
    rgb = write_dicom(tmp_path / "rgb.dcm", np.repeat(gray[:, :, None], 3, axis=2), "RGB", 8)
    assert torch.equal(process(processor, rgb), expected)
    frames = np.stack([gray, 255 - gray]).astype(np.uint16) * 257
    multi_frame = write_dicom(tmp_path / "frames.dcm", frames, "MONOCHROME2", 16)
    assert torch.allclose(process(processor, multi_frame), process(processor, gray, high_bit_depth_scaling="min_max"))
