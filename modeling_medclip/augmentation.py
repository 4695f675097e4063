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
"""Training-time image augmentations for chest X-rays (ConVIRT and MedCLIP recipes).

Every augmentation maps one decoded image (a PIL image of any mode, or anything the image processor accepts) to a
normalized `(num_channels, size, size)` float32 tensor. Decoding, square padding, rescaling, channel repetition and
normalization are those of the [`MedCLIPImageProcessor`] passed in, so training and evaluation inputs agree; only the
random geometric and intensity operations in between differ. The operations run per image with PIL, which is meant
for `DataLoader` workers (`benchmarks/bench_augmentation.py` compares it with batched kornia).

Randomness and seeding: all random parameters are drawn with `torch.rand` from the `generator` passed to the call, or
from `torch.Generator().manual_seed(seed)` when an int `seed` is passed, so the same seed always gives the same
output. With neither, torch's default generator is used: inside a `DataLoader` worker, torch seeds it with
`base_seed + worker_id` (`base_seed` comes from the loader's own `generator`, or torch's global RNG, once per epoch),
so workers draw different augmentations and a run is reproducible after `torch.manual_seed(...)` regardless of
`num_workers`' process start method. Python's `random` and NumPy's RNG are never used.

"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageFilter
import torch

from .image_processing_medclip import pad_to_square


AUGMENTATIONS = ("convirt", "medclip", "none")


@dataclass(frozen=True)
class AugmentationParameters:
    """
    The random draws of one call of [`XRayAugmentation`]; fields of disabled operations are `None`.

    Attributes:
        crop_box (`tuple[int, int, int, int]`): `(left, top, right, bottom)` of the random resized crop, in pixels of
            the padded input image.
        flip (`bool`): whether the image is flipped left-right.
        angle (`float`): rotation in degrees (counter-clockwise).
        translate (`tuple[float, float]`): horizontal and vertical shift, as fractions of the image width / height.
        scale (`float`): affine zoom factor.
        brightness (`float`): brightness factor (1 keeps the image).
        contrast (`float`): contrast factor (1 keeps the image).
        brightness_first (`bool`): whether brightness is changed before contrast.
        blur_sigma (`float`): standard deviation of the Gaussian blur, in pixels of the output image.
        crop_offset (`tuple[int, int]`): `(left, top)` of the random crop after the resize.
    """

    crop_box: tuple[int, int, int, int] | None
    flip: bool
    angle: float | None
    translate: tuple[float, float] | None
    scale: float | None
    brightness: float | None
    contrast: float | None
    brightness_first: bool
    blur_sigma: float | None
    crop_offset: tuple[int, int] | None


class XRayAugmentation:
    r"""
    Random augmentation of one chest X-ray into a normalized `(num_channels, size, size)` float32 tensor.

    The image is decoded to 8-bit grayscale and padded to a square with `image_processor` (as in evaluation), then
    goes through the enabled operations in this order: random resized crop to `size` (or resize to `resize_size`) →
    horizontal flip → (if `color_before_affine`) brightness/contrast jitter → random affine → (otherwise)
    brightness/contrast jitter → Gaussian blur → random crop to `size` (after a resize to `resize_size`).
    Finally it is rescaled, repeated to `num_channels` and normalized with the image processor's settings.

    The original MedCLIP recipe resizes to 256 after the flip, jitter and affine; these commute with the resize (up
    to interpolation), so it is done first, which makes them 2-3x cheaper on full-resolution X-rays.

    Implementation: the geometric steps (resize or resized crop, flip, affine, final crop or resize) are composed into
    one bilinear `Image.transform` from the padded input straight to `size` x `size` (after an integer box `reduce` of
    the input when it is at least 2x larger, as bilinear sampling does not low-pass), so the image is resampled once.
    The pixels outside the resized crop (or outside the input) come out black, as the affine's fill. The jitter, a
    pointwise map, is one lookup table with `PIL.ImageEnhance`'s arithmetic, applied to the input before the transform
    (`color_before_affine`; its mean gray level is then that of the input rather than of the resized image) or to the
    output after it. Without flip and affine, the plain resize / resized crop of the order above is used instead.

    Args:
        image_processor ([`MedCLIPImageProcessor`]): supplies decoding, padding and normalization.
        size (`int`): output height and width.
        crop_scale (`tuple[float, float]`, *optional*): area fraction range of the random resized crop
            (aspect ratio in `[3/4, 4/3]`); `None` disables it.
        flip_probability (`float`): probability of a horizontal flip.
        degrees (`float`): rotations are drawn from `[-degrees, degrees]`.
        translate (`float`): shifts are drawn from `[-translate, translate]` times the width (height).
        scale (`tuple[float, float]`): affine zoom range.
        brightness (`float`): brightness factor drawn from `[max(0, 1 - brightness), 1 + brightness]`.
        contrast (`float`): contrast factor drawn from `[max(0, 1 - contrast), 1 + contrast]`.
        color_before_affine (`bool`): apply the intensity jitter before (MedCLIP) or after (ConVIRT) the affine.
        blur_sigma (`tuple[float, float]`, *optional*): Gaussian blur sigma range; `None` disables blurring.
        resize_size (`int`, *optional*): resize to `resize_size` then random crop `size` (MedCLIP); `None` resizes
            straight to `size` when no resized crop is done.
    """

    def __init__(
        self,
        image_processor,
        *,
        size: int = 224,
        crop_scale: tuple[float, float] | None = None,
        flip_probability: float = 0.5,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        brightness: float = 0.0,
        contrast: float = 0.0,
        color_before_affine: bool = False,
        blur_sigma: tuple[float, float] | None = None,
        resize_size: int | None = None,
    ):
        if resize_size is not None and resize_size < size:
            raise ValueError(f"resize_size ({resize_size}) must be at least size ({size}).")
        self.image_processor = image_processor
        self.size = size
        self.crop_scale = crop_scale
        self.flip_probability = flip_probability
        self.degrees = degrees
        self.translate = translate
        self.scale = scale
        self.brightness = brightness
        self.contrast = contrast
        self.color_before_affine = color_before_affine
        self.blur_sigma = blur_sigma
        self.resize_size = resize_size

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items() if key != "image_processor")
        return f"{type(self).__name__}({fields})"

    def sample_parameters(self, width: int, height: int, generator: torch.Generator | None = None):
        """Draw the random parameters for a padded input image of `width` x `height` pixels."""

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64).item()

        def randint(high: int) -> int:
            return int(torch.randint(high + 1, (1,), generator=generator).item())

        crop_box = self._sample_crop_box(width, height, uniform, randint) if self.crop_scale is not None else None
        flip = uniform(0.0, 1.0) < self.flip_probability
        angle = uniform(-self.degrees, self.degrees) if self.degrees else 0.0
        translate = (uniform(-self.translate, self.translate), uniform(-self.translate, self.translate))
        scale = uniform(*self.scale)
        brightness = uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness else None
        contrast = uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast else None
        brightness_first = uniform(0.0, 1.0) < 0.5
        blur_sigma = uniform(*self.blur_sigma) if self.blur_sigma is not None else None
        crop_offset = None
        if self.resize_size is not None:
            crop_offset = (randint(self.resize_size - self.size), randint(self.resize_size - self.size))
        return AugmentationParameters(
            crop_box=crop_box,
            flip=flip,
            angle=angle,
            translate=translate,
            scale=scale,
            brightness=brightness,
            contrast=contrast,
            brightness_first=brightness_first,
            blur_sigma=blur_sigma,
            crop_offset=crop_offset,
        )

    def _sample_crop_box(self, width, height, uniform, randint) -> tuple[int, int, int, int]:
        """Random resized crop box (area in `crop_scale`, aspect ratio in `[3/4, 4/3]`), center crop as fallback."""
        area = width * height
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target_area = area * uniform(*self.crop_scale)
            aspect_ratio = math.exp(uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect_ratio))
            crop_height = round(math.sqrt(target_area / aspect_ratio))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                left, top = randint(width - crop_width), randint(height - crop_height)
                return left, top, left + crop_width, top + crop_height
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side

    def apply(self, image: PIL.Image.Image, parameters: AugmentationParameters) -> PIL.Image.Image:
        """Apply the operations with the given `parameters` to a padded grayscale PIL image; returns `size` x `size`."""
        if parameters.flip or not _is_identity_affine(parameters):
            return self._apply_fused(image, parameters)
        # No flip and no affine: the geometry is one plain resize (and crop), done as in the unfused order.
        if parameters.crop_box is not None:
            image = image.resize((self.size, self.size), PIL.Image.Resampling.BICUBIC, box=parameters.crop_box)
        elif self.resize_size is not None:
            image = image.resize((self.resize_size, self.resize_size), PIL.Image.Resampling.BILINEAR)
        image = _jitter(image, parameters)
        if parameters.blur_sigma is not None:
            image = image.filter(PIL.ImageFilter.GaussianBlur(parameters.blur_sigma))
        if parameters.crop_offset is not None:
            left, top = parameters.crop_offset
            image = image.crop((left, top, left + self.size, top + self.size))
        elif image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), PIL.Image.Resampling.BICUBIC)
        return image

    def _apply_fused(self, image: PIL.Image.Image, parameters: AugmentationParameters) -> PIL.Image.Image:
        """Resize / resized crop, flip, affine and final crop (or resize) as one bilinear `Image.transform`."""
        width, height = image.size
        # Size of the image the flip and the affine act on ("work" resolution), and the map from its (continuous)
        # pixel coordinates to the input's.
        if parameters.crop_box is not None:
            # Cropped first, so that the affine reveals black fill beyond the crop, not the rest of the input.
            image = image.crop(parameters.crop_box)
            work_width = work_height = self.size
            to_input = _affine_matrix(image.width / self.size, 0.0, 0.0, 0.0, image.height / self.size, 0.0)
        elif self.resize_size is not None:
            work_width = work_height = self.resize_size
            to_input = _affine_matrix(width / work_width, 0.0, 0.0, 0.0, height / work_height, 0.0)
        else:
            work_width, work_height = width, height
            to_input = np.eye(3)
        if parameters.flip:
            to_input = to_input @ _affine_matrix(-1.0, 0.0, work_width, 0.0, 1.0, 0.0)
        to_input = to_input @ _affine_inverse(
            work_width, work_height, parameters.angle, parameters.translate, parameters.scale
        )
        if parameters.crop_offset is not None:
            offset_x, offset_y = parameters.crop_offset
            to_input = to_input @ _affine_matrix(1.0, 0.0, offset_x, 0.0, 1.0, offset_y)
        else:
            to_input = to_input @ _affine_matrix(work_width / self.size, 0.0, 0.0, 0.0, work_height / self.size, 0.0)

        # Bilinear sampling does not low-pass: shrink by the integer part of the zoom-out first (box filter).
        factor = int(math.sqrt(abs(np.linalg.det(to_input[:2, :2]))))
        if factor >= 2:
            image = image.reduce(factor)
            to_input = _affine_matrix(1.0 / factor, 0.0, 0.0, 0.0, 1.0 / factor, 0.0) @ to_input
        if self.color_before_affine:
            # Pointwise, so it commutes with the resize and the flip; before the transform the fill stays black.
            image = _jitter(image, parameters)
        image = image.transform(
            (self.size, self.size),
            PIL.Image.Transform.AFFINE,
            tuple(to_input[:2].ravel()),
            PIL.Image.Resampling.BILINEAR,
            fillcolor=0,
        )
        if not self.color_before_affine:
            image = _jitter(image, parameters)
        if parameters.blur_sigma is not None:
            image = image.filter(PIL.ImageFilter.GaussianBlur(parameters.blur_sigma))
        return image

    def __call__(self, image: Any, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """
        Augment one image.

        Args:
            image: a PIL image of any mode (or an array, tensor or file path the image processor accepts).
            generator (`torch.Generator`, *optional*): source of the random draws.
            seed (`int`, *optional*): use `torch.Generator().manual_seed(seed)` (exclusive with `generator`).

        Returns:
            `torch.Tensor` of shape `(num_channels, size, size)`, float32, normalized like the image processor.
        """
        generator = _resolve_generator(generator, seed)
        image = self.image_processor.to_grayscale(image)
        if self.image_processor.do_pad_square:
            image = PIL.Image.fromarray(pad_to_square(np.asarray(image)[None], min_size=self.size)[0])
        parameters = self.sample_parameters(image.width, image.height, generator)
        return normalize_like(self.image_processor, self.apply(image, parameters))


class EvalTransform:
    """The deterministic evaluation path: the image processor's own transform, as a `(C, size, size)` tensor."""

    def __init__(self, image_processor, *, size: int = 224):
        self.image_processor = image_processor
        self.size = size
        crop_size = image_processor.crop_size
        if image_processor.do_center_crop and (crop_size.height, crop_size.width) == (size, size):
            self.overrides = {}
        else:
            self.overrides = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
            self.overrides.update(do_resize=True, do_center_crop=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"

    def __call__(self, image: Any, generator: torch.Generator | None = None, seed: int | None = None) -> torch.Tensor:
        """Transform one image (`generator` and `seed` are accepted for interface parity and ignored)."""
        return self.image_processor(image, return_tensors="pt", **self.overrides)["pixel_values"][0]


def normalize_like(image_processor, image: PIL.Image.Image) -> torch.Tensor:
    """Rescale, repeat to `num_channels` and normalize a grayscale PIL image exactly as `image_processor` does."""
    array = np.asarray(image, dtype=np.float32)[None]
    if image_processor.do_rescale:
        array = image_processor.rescale(array, image_processor.rescale_factor)
    if image_processor.num_channels != 1:
        array = np.repeat(array, image_processor.num_channels, axis=0)
    if image_processor.do_normalize:
        array = image_processor.normalize(array, image_processor.image_mean, image_processor.image_std)
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def build_augmentation(name: str, image_processor, *, size: int = 224):
    """
    Build a named augmentation.

    Args:
        name (`str`): one of `AUGMENTATIONS`:
            - `"convirt"` (Zhang et al., 2020): random resized crop (area 0.6-1.0), horizontal flip (p=0.5), random
              affine (rotation ±20°, translation ±0.1, scale 0.95-1.05), brightness and contrast jitter (0.4) and
              Gaussian blur (sigma 0.1-3.0).
            - `"medclip"` (Wang et al., 2022): horizontal flip (p=0.5), brightness and contrast jitter (0.2), random
              affine (rotation ±10°, translation ±0.0625, scale 0.8-1.1), resize to `size * 256 / 224` and random
              crop `size`.
            - `"none"`: the deterministic evaluation transform of `image_processor`.
        image_processor ([`MedCLIPImageProcessor`]): decoding, padding and normalization settings.
        size (`int`, *optional*, defaults to 224): output height and width.

    Returns:
        A callable `(image, generator=None, seed=None) -> torch.Tensor` of shape `(num_channels, size, size)`.
    """
    if name == "convirt":
        return XRayAugmentation(
            image_processor,
            size=size,
            crop_scale=(0.6, 1.0),
            flip_probability=0.5,
            degrees=20.0,
            translate=0.1,
            scale=(0.95, 1.05),
            brightness=0.4,
            contrast=0.4,
            blur_sigma=(0.1, 3.0),
        )
    if name == "medclip":
        return XRayAugmentation(
            image_processor,
            size=size,
            flip_probability=0.5,
            degrees=10.0,
            translate=0.0625,
            scale=(0.8, 1.1),
            brightness=0.2,
            contrast=0.2,
            color_before_affine=True,
            resize_size=round(size * 256 / 224),
        )
    if name == "none":
        return EvalTransform(image_processor, size=size)
    raise ValueError(f"Unknown augmentation {name!r}; expected one of {AUGMENTATIONS}.")


def _resolve_generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("Pass either `generator` or `seed`, not both.")
    return torch.Generator().manual_seed(seed)


def _is_identity_affine(parameters: AugmentationParameters) -> bool:
    return parameters.angle == 0.0 and tuple(parameters.translate) == (0.0, 0.0) and parameters.scale == 1.0


def _jitter(image: PIL.Image.Image, parameters: AugmentationParameters) -> PIL.Image.Image:
    """
    Brightness (blend with black) and contrast (blend with the mean gray level) changes, in random order.

    Both are pointwise, so they are applied as one lookup table, computed exactly as `PIL.ImageEnhance.Brightness` and
    `PIL.ImageEnhance.Contrast` would (same mean, same float32 blend, truncation and clipping).
    """
    operations = []
    if parameters.brightness is not None:
        operations.append(("brightness", parameters.brightness))
    if parameters.contrast is not None:
        operations.append(("contrast", parameters.contrast))
    if not operations:
        return image
    if not parameters.brightness_first:
        operations.reverse()
    levels = np.arange(256, dtype=np.float32)
    histogram = None
    for name, factor in operations:
        if name == "brightness":
            degenerate = np.float32(0.0)
        else:
            if histogram is None:
                histogram = np.asarray(image.histogram(), dtype=np.float64)
            # ImageStat's mean of the image as changed so far: the histogram pushed through the table.
            counts = np.bincount(levels.astype(np.int64), weights=histogram, minlength=256)
            mean = (np.arange(256) * counts).sum() / counts.sum()
            degenerate = np.float32(int(mean + 0.5))
        blended = degenerate + np.float32(factor) * (levels - degenerate)
        levels = np.clip(np.trunc(blended), 0, 255).astype(np.float32)
    return image.point(levels.astype(np.uint8).tolist())


def _affine_matrix(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def _affine_inverse(width: int, height: int, angle: float, translate: tuple[float, float], scale: float) -> np.ndarray:
    """
    Map from output to input (continuous) pixel coordinates of the affine on a `width` x `height` image: rotate
    (degrees, counter-clockwise) and zoom about the center, then shift by `translate` times the width / height.
    """
    center_x, center_y = width * 0.5, height * 0.5
    radians = math.radians(angle)
    cos, sin = math.cos(radians) / scale, math.sin(radians) / scale
    a, b, d, e = cos, -sin, sin, cos
    out_x, out_y = center_x + translate[0] * width, center_y + translate[1] * height
    return _affine_matrix(a, b, center_x - a * out_x - b * out_y, d, e, center_y - d * out_x - e * out_y)


__all__ = ["AUGMENTATIONS", "AugmentationParameters", "EvalTransform", "XRayAugmentation", "build_augmentation"]
