# Copyright 2026 The medclip-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image processor for chest X-rays (ConVIRT / MedCLIP).

The default settings reproduce the preprocessing of the original MedCLIP code
(`MedCLIPFeatureExtractor`): convert to 8-bit grayscale, paste the image centered on a black square canvas of side
`max(height, width, 224)`, bicubic resize to 224x224, center crop 224x224, rescale by 1/255 and normalize with the
MedCLIP chest X-ray statistics. Unlike the original, it also decodes 16-bit images, arrays of any integer/float dtype
and DICOM files into the 8-bit range first (see [`to_grayscale_uint8`]).

This module only depends on transformers, PIL, numpy, torch and (lazily) pydicom, so that it can be copied as-is into
a saved model folder and loaded as remote code.
"""

import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType


MEDCLIP_IMAGE_MEAN = 0.5862785803043838
MEDCLIP_IMAGE_STD = 0.27950088968644304

MAX_IMAGE_PIXELS = 50_000_000
"""The default pixel limit (width x height) of decoded images: about 7,000 x 7,000, several times the largest X-ray
detectors. A file (or PIL image) with more pixels is refused with a `ValueError` naming it before anything is
decoded, except a JPEG, which is decoded at the largest DCT reduction (1/2, 1/4 or 1/8) that fits under the limit.
Adjust it with `max_image_pixels` (image processor, collator, [`load_grayscale_image`]); `None` removes it. PIL's own
decompression-bomb check (`PIL.Image.MAX_IMAGE_PIXELS`: files over twice its 89.5 megapixels are refused when
opened) still applies first; raise that too to decode such JPEGs reduced."""

HIGH_BIT_DEPTH_SCALINGS = ("bit_depth", "min_max")
_PIL_HIGH_BIT_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_PIL_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_DICOM_SUFFIXES = (".dcm", ".dicom")


class MedCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_pad_square (`bool`, *optional*, defaults to `True`):
        Whether to paste the image centered on a black square canvas of side `max(height, width, size)` before
        resizing (the original MedCLIP `pad_img`). Images smaller than `size` are padded, not upsampled.
    num_channels (`int`, *optional*, defaults to `1`):
        Number of output channels. `1` gives the grayscale image; `3` repeats it (for ImageNet-style towers).
    high_bit_depth_scaling (`str`, *optional*, defaults to `"bit_depth"`):
        How images with more than 8 bits per pixel (16-bit PNG/TIFF, `uint16`/`int32` arrays) are mapped to
        `[0, 255]`: `"bit_depth"` divides by `2**bits - 1` where `bits = max(8, max_value.bit_length())` is the
        actual bit depth of the data (a 12-bit image stored in 16 bits is divided by 4095; images with negative
        values fall back to min-max); `"min_max"` stretches `[min, max]` of each image to `[0, 255]`.
    max_image_pixels (`int`, *optional*, defaults to `MAX_IMAGE_PIXELS` = 50,000,000):
        Files and PIL images with more pixels are refused with a `ValueError` naming them (JPEGs are decoded reduced
        to fit), see [`MAX_IMAGE_PIXELS`]; `None` for no limit.
    """

    do_pad_square: bool
    num_channels: int
    high_bit_depth_scaling: str
    max_image_pixels: int | None


def _scale_to_uint8(array: np.ndarray, high_bit_depth_scaling: str, name: str) -> np.ndarray:
    """Map an integer or float array of any range to `uint8` (see `MedCLIPImageProcessorKwargs`)."""
    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        return np.zeros(array.shape, dtype=np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
        array = array.astype(np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = array * 255.0 if low >= 0.0 and high <= 1.0 else _min_max(array, low, high)
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    low, high = int(array.min()), int(array.max())
    if array.dtype == np.uint16:  # 16-bit files: a lookup table, 1 byte per pixel instead of float64 copies
        return _scale_integers(np.arange(high + 1), low, high, high_bit_depth_scaling)[array]
    return _scale_integers(array.astype(np.int64), low, high, high_bit_depth_scaling)


def _scale_integers(values: np.ndarray, low: int, high: int, high_bit_depth_scaling: str) -> np.ndarray:
    """Integer `values` of an image whose range is `[low, high]`, mapped to `uint8` (see `_scale_to_uint8`)."""
    if high_bit_depth_scaling == "bit_depth" and low >= 0:
        bits = max(8, high.bit_length())
        scaled = values * (255.0 / (2**bits - 1))
    else:
        scaled = _min_max(values, low, high)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _min_max(array: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(array.shape, dtype=np.float64)
    return (array.astype(np.float64) - low) * (255.0 / (high - low))


def _composite_on_black(image: PIL.Image.Image) -> PIL.Image.Image:
    rgba = image.convert("RGBA")
    black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return PIL.Image.alpha_composite(black, rgba).convert("L")


def _pil_to_grayscale(image: PIL.Image.Image, high_bit_depth_scaling: str, name: str) -> np.ndarray:
    """Convert a PIL image of any mode to a `(height, width)` `uint8` array."""
    if image.mode in _PIL_HIGH_BIT_DEPTH_MODES:
        return _scale_to_uint8(np.asarray(image), high_bit_depth_scaling, name)
    if image.mode in _PIL_ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        image = _composite_on_black(image)
    elif image.mode not in ("L", "1", "P", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image.convert("L"))


def _array_to_grayscale(array: np.ndarray, high_bit_depth_scaling: str, name: str, channels_first: bool) -> np.ndarray:
    """Convert a `(H, W)`, `(H, W, C)` or `(C, H, W)` array (C in 1-4) to a `(height, width)` `uint8` array."""
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(
            f"{name} has unsupported dtype {array.dtype}; expected an unsigned/signed integer or float array."
        )
    if array.ndim not in (2, 3):
        raise ValueError(
            f"{name} has {array.ndim} dimensions (shape {tuple(array.shape)}); expected one image of shape (H, W), "
            "(H, W, C) or (C, H, W). Pass a list of images for a batch."
        )
    if array.ndim == 3:
        channel_sizes = (1, 2, 3, 4)
        if channels_first and array.shape[0] in channel_sizes:
            array = np.moveaxis(array, 0, -1)
        elif array.shape[-1] not in channel_sizes:
            if array.shape[0] not in channel_sizes:
                raise ValueError(f"{name} has shape {tuple(array.shape)}: cannot find a channel axis of size 1-4.")
            array = np.moveaxis(array, 0, -1)
    if 0 in array.shape:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}).")
    array = _scale_to_uint8(np.ascontiguousarray(array), high_bit_depth_scaling, name)
    if array.ndim == 2 or array.shape[-1] == 1:
        return array.reshape(array.shape[:2])
    return _pil_to_grayscale(PIL.Image.fromarray(array), high_bit_depth_scaling, name)


def _describe(source, name: str | None) -> str:
    """How messages name an encoded image: its file path, else `name`, else "encoded image"."""
    if name is not None:
        return repr(str(name))
    if isinstance(source, (str, os.PathLike)):
        return repr(str(source))
    return "<encoded image>"


def _is_dicom(source: "str | os.PathLike | BinaryIO") -> bool:
    """A `.dcm` / `.dicom` path, or any file or file object with the DICOM magic `DICM` at byte 128."""
    if isinstance(source, (str, os.PathLike)):
        if Path(source).suffix.lower() in _DICOM_SUFFIXES:
            return True
        with open(source, "rb") as file:
            file.seek(128)
            return file.read(4) == b"DICM"
    position = source.tell()
    source.seek(128)
    magic = source.read(4)
    source.seek(position)
    return magic == b"DICM"


def _check_pixels(size: tuple[int, int], max_image_pixels: int | None, what: str) -> None:
    if max_image_pixels is not None and size[0] * size[1] > max_image_pixels:
        raise ValueError(
            f"{what} has {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels, over the limit of {max_image_pixels:,} "
            "(`max_image_pixels`, see MAX_IMAGE_PIXELS): refused as unreadable."
        )


def read_dicom(
    path: "str | os.PathLike | BinaryIO", *, max_image_pixels: int | None = MAX_IMAGE_PIXELS, name: str | None = None
) -> np.ndarray:
    """
    Read a DICOM file (a path or a binary file object) as a `(height, width)` `uint8` display image.

    Applies the modality LUT / rescale slope and intercept, then the first VOI LUT (preferred) or window center and
    width (`pydicom.pixels.apply_voi_lut`) and maps the VOI output range (the range of the LUT's entries, the
    window's output range, or the data range if the file has no VOI) linearly to `[0, 255]`; MONOCHROME1 images are
    inverted so that bone is bright. Multi-frame files give their first frame (only that frame is decoded); color
    files are converted to grayscale.

    Raises:
        `ValueError` naming the file when it cannot be read, has more than `max_image_pixels` pixels per frame, has
        NaN or infinite values (float pixel data, rescale slope or intercept), or a window width that is not positive.
    """
    label = f"DICOM file {_describe(path, name)}"
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, pixel_array
    except ImportError as error:
        raise ImportError(f"Reading the {label} needs pydicom: `pip install medclip-hf[dicom]`.") from error

    try:
        dataset = pydicom.dcmread(path)
        size = (int(dataset.Columns), int(dataset.Rows))
    except Exception as error:  # pydicom raises many exception types for corrupt or unsupported files
        raise ValueError(f"Could not read the {label}: {error}") from error
    _check_pixels(size, max_image_pixels, label)
    try:
        frames = int(dataset.get("NumberOfFrames") or 1)
        pixels = pixel_array(dataset, index=0) if frames > 1 else dataset.pixel_array
    except Exception as error:
        raise ValueError(f"Could not read the {label}: {error}") from error
    samples_per_pixel = int(dataset.get("SamplesPerPixel", 1))
    if samples_per_pixel != 1:
        return _array_to_grayscale(pixels, "bit_depth", label, channels_first=False)

    values = apply_modality_lut(pixels, dataset)
    if not np.isfinite(values).all():
        raise ValueError(f"The {label} has NaN or infinite pixel values (after its rescale slope / intercept).")
    try:
        values, low, high = _apply_voi(values, dataset)
    except ValueError as error:  # pydicom's own checks of the window or LUT do not name the file
        raise ValueError(f"The {label} has an invalid VOI window or LUT: {error}") from error

    scale = 255.0 / (high - low) if high > low else 0.0
    image = np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)
    if dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        image = 255 - image
    return image


def _apply_voi(values: np.ndarray, dataset) -> tuple[np.ndarray, float, float]:
    """The VOI LUT (preferred) or window of `dataset` applied to modality `values`, with the VOI output range."""
    from pydicom.pixels import apply_voi_lut

    if dataset.get("VOILUTSequence"):
        if np.issubdtype(values.dtype, np.floating) and np.array_equal(values, np.rint(values)):
            values = values.astype(np.int64)
        values = apply_voi_lut(values, dataset).astype(np.float64)
        # The LUT's own output range: some devices declare more bits per entry than their LUT data use.
        entries, first_mapped = dataset.VOILUTSequence[0].LUTDescriptor[:2]
        table = apply_voi_lut(np.arange(first_mapped, first_mapped + (entries or 2**16)), dataset)
        return values, float(table.min()), float(table.max())
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        width = dataset.WindowWidth[0] if dataset["WindowWidth"].VM > 1 else dataset.WindowWidth
        if not float(width) > 0:  # also NaN
            raise ValueError(f"WindowWidth is {width}; a window width must be positive (>= 1 for LINEAR windows)")
        values = apply_voi_lut(values.astype(np.float64), dataset)
        with np.errstate(over="ignore"):
            low, high = apply_voi_lut(np.array([-1e12, 1e12]), dataset)
        return values, float(low), float(high)
    values = values.astype(np.float64)
    return values, float(values.min()), float(values.max())


def _open_pil(source: "str | os.PathLike | BinaryIO", label: str) -> PIL.Image.Image:
    """`PIL.Image.open` (lazy: the header only), any failure as a `ValueError` naming the image."""
    try:
        with warnings.catch_warnings():  # over PIL's first threshold: our own limit decides
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            return PIL.Image.open(source)
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"{label} is refused as unreadable by PIL's decompression-bomb check ({error}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS (and max_image_pixels) if it is a genuine image."
        ) from error
    except Exception as error:  # PIL raises many exception types for corrupt or unsupported files
        raise ValueError(f"Could not read the {label}: {error}") from error


def _jpeg_reduction(image: PIL.Image.Image, max_image_pixels: int | None) -> int:
    """The smallest DCT reduction (1, 2, 4, 8) that brings a JPEG under `max_image_pixels`; 0 when none does."""
    width, height = image.size
    for scale in (1, 2, 4, 8):
        if max_image_pixels is None or math.ceil(width / scale) * math.ceil(height / scale) <= max_image_pixels:
            return scale
    return 0


def _decode_pil(
    image: PIL.Image.Image, label: str, max_image_pixels: int | None, max_size: int | None
) -> PIL.Image.Image:
    """Decode an opened (lazy) image within the pixel limit, reduced to `max_size` (longer side) when given."""
    scale = _jpeg_reduction(image, max_image_pixels) if image.format == "JPEG" else 1
    if scale != 1:
        if scale == 0:
            _check_pixels(image.size, max_image_pixels, label)  # even 1/8 of it is too much
        image.draft(image.mode, (image.size[0] // scale, image.size[1] // scale))
    else:
        _check_pixels(image.size, max_image_pixels, label)
    try:
        if max_size is not None and max(image.size) > max_size:
            # JPEGs are decoded at a reduced DCT scale (PIL draft), then resized: much cheaper for large files.
            image.thumbnail((max_size, max_size), PIL.Image.Resampling.BILINEAR, reducing_gap=2.0)
        image.load()
    except Exception as error:  # truncated or corrupt data
        raise ValueError(f"Could not read the {label}: {error}") from error
    return image


def load_grayscale_image(
    path: "str | os.PathLike | bytes | bytearray | memoryview | BinaryIO",
    high_bit_depth_scaling: str = "bit_depth",
    *,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    max_size: int | None = None,
    name: str | None = None,
) -> np.ndarray:
    """
    Read an encoded image (any format PIL reads, or DICOM) as a `(height, width)` `uint8` array, one file at a time.

    Args:
        path: a file path, the file's bytes, or a binary file object. DICOM is recognised by its `.dcm` / `.dicom`
            suffix or by the `DICM` magic at byte 128 (files without a suffix, embedded bytes).
        high_bit_depth_scaling: see `MedCLIPImageProcessorKwargs`.
        max_image_pixels: the pixel limit, see [`MAX_IMAGE_PIXELS`].
        max_size: decode images whose longer side exceeds it at that longer side (JPEG DCT scaling, then a bilinear
            resize; not DICOM). `None` keeps the full resolution.
        name: how messages name a source that is not a path (e.g. an image id).

    Raises:
        `ValueError` naming the image: missing, empty, corrupt, truncated, not an image, over the pixel limit, or
        with NaN values.
    """
    label = f"image file {_describe(path, name)}"
    if isinstance(path, (str, os.PathLike)):
        if not Path(path).is_file():
            raise ValueError(f"Image file {_describe(path, None)} does not exist.")
        if os.path.getsize(path) == 0:
            raise ValueError(f"The {label} is empty (0 bytes).")
    elif isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            raise ValueError(f"The {label} is empty (0 bytes).")
        path = io.BytesIO(path)
    if _is_dicom(path):
        return read_dicom(path, max_image_pixels=max_image_pixels, name=name)
    with _open_pil(path, label) as image:
        return _pil_to_grayscale(_decode_pil(image, label, max_image_pixels, max_size), high_bit_depth_scaling, label)


def to_grayscale_uint8(
    image: "PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes",
    high_bit_depth_scaling: str = "bit_depth",
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """
    Decode one image of any supported kind into a `(height, width)` `uint8` grayscale array.

    - PIL images: `L` as is; `1`, `P` and `RGB` through `convert("L")` (ITU-R 601-2 luma); modes with alpha (`RGBA`,
      `LA`, `P` with transparency) are composited on black first; 16-bit and 32-bit modes (`I;16`, `I`, `F`) are
      scaled as described by `high_bit_depth_scaling`.
    - Arrays and tensors of shape `(H, W)`, `(H, W, C)` or `(C, H, W)` with C in 1-4 (tensors prefer channels-first):
      `uint8` as is, other integer dtypes by `high_bit_depth_scaling`, floats in `[0, 1]` times 255 and other floats
      min-max stretched; NaN or infinite values are refused.
    - File paths (`str` / `os.PathLike`) and encoded bytes: read with PIL, or with pydicom for DICOM (`.dcm` /
      `.dicom` suffix or the `DICM` magic bytes), see [`load_grayscale_image`] and [`read_dicom`].

    Files and PIL images with more than `max_image_pixels` pixels are refused (see [`MAX_IMAGE_PIXELS`]).
    """
    if high_bit_depth_scaling not in HIGH_BIT_DEPTH_SCALINGS:
        raise ValueError(
            f"high_bit_depth_scaling must be one of {HIGH_BIT_DEPTH_SCALINGS}, got {high_bit_depth_scaling!r}."
        )
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        return load_grayscale_image(image, high_bit_depth_scaling, max_image_pixels=max_image_pixels)
    if isinstance(image, PIL.Image.Image):
        label = f"PIL image of mode {image.mode!r}"
        _check_pixels(image.size, max_image_pixels, label)
        return _pil_to_grayscale(image, high_bit_depth_scaling, label)
    if isinstance(image, torch.Tensor):
        if image.is_complex() or image.dtype == torch.bool:
            raise ValueError(f"Tensor image has unsupported dtype {image.dtype}.")
        tensor = image.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        return _array_to_grayscale(tensor.numpy(), high_bit_depth_scaling, "Tensor image", channels_first=True)
    if isinstance(image, np.ndarray):
        return _array_to_grayscale(image, high_bit_depth_scaling, "NumPy image", channels_first=False)
    raise ValueError(
        f"Unsupported image type {type(image).__name__}; expected a PIL image, a NumPy array, a torch tensor, a "
        "file path or encoded bytes."
    )


def pad_to_square(image: np.ndarray, min_size: int = 0) -> np.ndarray:
    """
    Paste a `(C, H, W)` image centered on a black `(C, S, S)` canvas, `S = max(H, W, min_size)`.

    The offsets are `((S - W) // 2, (S - H) // 2)`, as in the original MedCLIP `pad_img`.
    """
    channels, height, width = image.shape
    side = max(height, width, min_size)
    if side == height == width:
        return image
    canvas = np.zeros((channels, side, side), dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = image
    return canvas


class MedCLIPImageProcessor(PilBackend):
    r"""
    Constructs a MedCLIP image processor (PIL / NumPy backend, no torchvision needed).

    Pipeline: decode to 8-bit grayscale → `do_pad_square` → `do_resize` (`size`, `resample`) → `do_center_crop`
    (`crop_size`) → `do_rescale` (`rescale_factor`) → repeat to `num_channels` → `do_normalize` (`image_mean`,
    `image_std`). With the defaults this is exactly the original MedCLIP preprocessing.

    Accepts one image or a list of images, each a PIL image, a NumPy array, a torch tensor or a file path (including
    DICOM files). See [`to_grayscale_uint8`] for how modes and dtypes are mapped to 8-bit grayscale.

    Returns a [`BatchFeature`] whose `pixel_values` is a `(batch_size, num_channels, crop_height, crop_width)`
    float32 tensor / array (a list of `(num_channels, height, width)` arrays if the shapes differ).
    """

    valid_kwargs = MedCLIPImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_convert_rgb = False
    do_pad_square = True
    do_resize = True
    size = {"shortest_edge": 224}
    default_to_square = False
    resample = PILImageResampling.BICUBIC
    do_center_crop = True
    crop_size = {"height": 224, "width": 224}
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = MEDCLIP_IMAGE_MEAN
    image_std = MEDCLIP_IMAGE_STD
    num_channels = 1
    high_bit_depth_scaling = "bit_depth"
    max_image_pixels = MAX_IMAGE_PIXELS

    def __init__(self, **kwargs: Unpack[MedCLIPImageProcessorKwargs]):
        super().__init__(**kwargs)
        if self.num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {self.num_channels}.")
        if self.max_image_pixels is not None and not (
            isinstance(self.max_image_pixels, int) and self.max_image_pixels > 0
        ):
            raise ValueError(f"max_image_pixels must be a positive integer or None, got {self.max_image_pixels!r}.")
        if self.high_bit_depth_scaling not in HIGH_BIT_DEPTH_SCALINGS:
            raise ValueError(
                f"high_bit_depth_scaling must be one of {HIGH_BIT_DEPTH_SCALINGS}, got {self.high_bit_depth_scaling!r}."
            )

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list:
        """One image or a list of images -> a list of images; file paths are decoded later by `process_image`."""
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("Got an empty list of images.")
            return list(images)
        return [images]

    def process_image(
        self, image: Any, high_bit_depth_scaling: str | None = None, **kwargs: Unpack[MedCLIPImageProcessorKwargs]
    ) -> np.ndarray:
        """Decode one image into a `(1, height, width)` `uint8` array."""
        scaling = high_bit_depth_scaling or self.high_bit_depth_scaling
        return to_grayscale_uint8(image, scaling, kwargs.get("max_image_pixels", self.max_image_pixels))[None]

    def to_grayscale(self, image: Any) -> PIL.Image.Image:
        """Decode one image of any supported kind (see [`to_grayscale_uint8`]) into a PIL image of mode `"L"`."""
        return PIL.Image.fromarray(to_grayscale_uint8(image, self.high_bit_depth_scaling, self.max_image_pixels))

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_pad_square: bool,
        do_resize: bool,
        size: SizeDict,
        resample: "PILImageResampling | int | None",
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...] | None,
        image_std: float | tuple[float, ...] | None,
        num_channels: int,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        processed_images = []
        for image in images:
            if do_pad_square:
                image = pad_to_square(image, min_size=_min_square_side(size) if do_resize else 0)
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            if do_center_crop:
                image = self.center_crop(image, crop_size)
            image = image.astype(np.float32)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if num_channels != 1:
                image = np.repeat(image, num_channels, axis=0)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed_images.append(image.astype(np.float32))

        if len({image.shape for image in processed_images}) == 1:
            processed_images = np.stack(processed_images)
        return BatchFeature(data={"pixel_values": processed_images}, tensor_type=return_tensors)


def _min_square_side(size: SizeDict) -> int:
    """The smallest canvas `pad_to_square` uses: the target size, so small images are padded rather than upsampled."""
    if size.shortest_edge:
        return size.shortest_edge
    if size.height and size.width:
        return max(size.height, size.width)
    return 0


__all__ = [
    "MAX_IMAGE_PIXELS",
    "MEDCLIP_IMAGE_MEAN",
    "MEDCLIP_IMAGE_STD",
    "MedCLIPImageProcessor",
    "MedCLIPImageProcessorKwargs",
    "load_grayscale_image",
    "pad_to_square",
    "read_dicom",
    "to_grayscale_uint8",
]
