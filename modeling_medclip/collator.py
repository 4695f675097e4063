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
"""The collator shared by training and evaluation: decodes, augments and tokenizes a batch in DataLoader workers.

Input, either

- a list of examples (`{"image", "text", "labels", "image_id", ...}`, as the `dataset_scripts` builders yield), where
  example *i*'s image and text form a pair (ConVIRT, retrieval) when every example has an image; otherwise examples
  with an image give images and examples with a text give texts (`return_texts=False`: images only); or
- a batch of `dataset_scripts.pairing` (`{"images": [...], "texts": [...], "paired": bool, "position": ...}`), where
  the images and texts are separate lists of different lengths unless `paired` (MedCLIP's decoupled batches).

Output::

    {"pixel_values": (B_img, C, H, W) float32, "image_labels": (B_img, 14) float32 or (B_img,) int64,
     "input_ids": (B_txt, L) int64, "attention_mask": (B_txt, L) int64, "text_labels": (B_txt, 14) float32,
     "image_ids": list[str], "text_ids": list[str], "num_skipped_images": int, "num_skipped_texts": int}

Image keys are left out when the batch has no images, text keys when it has no texts, label keys when an example
has no labels. In paired input an example whose image or text is dropped loses both, so images and texts stay
aligned. Corrupt, truncated, over-large (see `max_image_pixels`) or otherwise unreadable images, and empty or invalid
texts (not a string, unpaired surrogates) are skipped with a warning naming them, counted in
`num_skipped_images` / `num_skipped_texts` of the batch (sum these in the training loop: with `num_workers > 0` the
collator runs in worker processes, so its own `skipped_images` / `skipped_texts` counters only count the calls made
in this process). A batch can therefore be smaller than requested, or even empty (`pixel_values` of shape
`(0, C, H, W)` is impossible to build without an image, so the key is then missing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch

from .image_processing_medclip import MAX_IMAGE_PIXELS, load_grayscale_image, to_grayscale_uint8
from .processing_medclip import text_problem


logger = logging.getLogger(__name__)


def decode_image(
    image: Any,
    name: str,
    decode_size: int | None = None,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    high_bit_depth_scaling: str = "bit_depth",
) -> PIL.Image.Image:
    """Decode one image source into an 8-bit grayscale PIL image: the one decoding path of training and evaluation.

    Args:
        image: a file path (any PIL format, 16-bit PNG, or DICOM, with or without a `.dcm` suffix), encoded bytes, a
            `{"bytes", "path"}` dict (the `datasets.Image(decode=False)` form) or a PIL image.
        name: how to name the image in the error message.
        decode_size (`int`, *optional*): shrink images whose longer side exceeds it to that longer side while
            decoding (JPEG DCT scaling; not DICOM); `None` keeps the full resolution.
        max_image_pixels (`int`, *optional*): images with more pixels are refused (JPEGs decoded reduced to fit), see
            `modeling_medclip.image_processing_medclip.MAX_IMAGE_PIXELS`; `None` for no limit.
        high_bit_depth_scaling (`str`): how images of more than 8 bits reach 8 bits (see `MedCLIPImageProcessor`).

    Raises:
        `ValueError` naming the image when it is missing, empty, corrupt, truncated, not an image, over the pixel
        limit or has NaN values (PIL's `DecompressionBombError` included).
    """
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        source_name = None if isinstance(image, (str, os.PathLike)) else name
        array = load_grayscale_image(
            image, high_bit_depth_scaling, max_image_pixels=max_image_pixels, max_size=decode_size, name=source_name
        )
        return PIL.Image.fromarray(array, mode="L")
    if isinstance(image, PIL.Image.Image):
        return PIL.Image.fromarray(to_grayscale_uint8(image, high_bit_depth_scaling, max_image_pixels), mode="L")
    raise ValueError(f"Image of {name!r} has unsupported type {type(image).__name__}")


class LazyImages(Sequence):
    """A sequence of image sources (paths, bytes, PIL images) decoded by [`decode_image`] only when indexed.

    Evaluation hands it to the processor batch by batch (`images[start:stop]` decodes that slice), so only one batch
    of files is open or decoded at a time, DICOM is read, and a bad file raises a `ValueError` naming it.
    """

    def __init__(
        self,
        sources: Sequence,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        high_bit_depth_scaling: str = "bit_depth",
    ):
        self.sources = list(sources)
        self.max_image_pixels = max_image_pixels
        self.high_bit_depth_scaling = high_bit_depth_scaling

    @classmethod
    def for_processor(cls, sources: Sequence, image_processor=None) -> "LazyImages":
        """`sources` decoded with the pixel limit and high-bit-depth scaling of `image_processor` (if given)."""
        if image_processor is None:
            return cls(sources)
        return cls(sources, image_processor.max_image_pixels, image_processor.high_bit_depth_scaling)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._decode(i) for i in range(len(self.sources))[index]]
        return self._decode(range(len(self.sources))[index])

    def _decode(self, index: int) -> PIL.Image.Image:
        source = self.sources[index]
        name = str(source) if isinstance(source, (str, os.PathLike)) else f"image #{index}"
        return decode_image(
            source, name, max_image_pixels=self.max_image_pixels, high_bit_depth_scaling=self.high_bit_depth_scaling
        )


class MedCLIPCollator:
    r"""
    Turns examples (or a decoupled image/text batch) into model inputs; see the module docstring for the formats.

    Args:
        tokenizer: a (fast) tokenizer, e.g. Bio_ClinicalBERT's.
        image_transform (`Callable`): `(PIL image) -> (C, H, W) float tensor`, e.g.
            `modeling_medclip.augmentation.build_augmentation("medclip", image_processor)`; it draws its random
            parameters from torch's default generator, which the DataLoader seeds per worker.
        max_length (`int`, *optional*, defaults to 77): texts are truncated to this many tokens.
        pad_to_max_length (`bool`, *optional*, defaults to `False`): pad every batch to `max_length` instead of to
            its longest text.
        image_column, text_column, label_column, id_column (`str`): the example keys to read.
        return_texts (`bool`, *optional*, defaults to `True`): `False` ignores the texts of a list of examples
            (image classification), so examples with an empty text keep their image.
        decode_size (`int`, *optional*): decode images whose longer side exceeds it at that longer side (JPEG DCT
            scaling + bilinear resize, see `decode_image`), so augmentation works on fewer pixels; e.g. 256 for
            224 px training on full-size MIMIC-CXR JPEGs. `None` (default) decodes at full resolution.
        max_image_pixels (`int`, *optional*, defaults to 50,000,000): images with more pixels are unreadable (skipped
            and counted; JPEGs are decoded reduced to fit), see
            `modeling_medclip.image_processing_medclip.MAX_IMAGE_PIXELS`; `None` for no limit.
    """

    def __init__(
        self,
        tokenizer,
        image_transform: Callable[[PIL.Image.Image], torch.Tensor],
        max_length: int = 77,
        pad_to_max_length: bool = False,
        image_column: str = "image",
        text_column: str = "text",
        label_column: str = "labels",
        id_column: str = "image_id",
        return_texts: bool = True,
        decode_size: int | None = None,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ):
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.max_length = max_length
        self.padding = "max_length" if pad_to_max_length else "longest"
        self.image_column = image_column
        self.text_column = text_column
        self.label_column = label_column
        self.id_column = id_column
        self.return_texts = return_texts
        self.decode_size = decode_size
        self.max_image_pixels = max_image_pixels
        self.skipped_images = 0
        self.skipped_texts = 0

    def _name(self, example: dict) -> str:
        image = example.get(self.image_column)
        if isinstance(image, (str, os.PathLike)):
            return str(image)
        return str(example.get(self.id_column, "<unnamed image>"))

    def _transform(self, example: dict) -> torch.Tensor | None:
        """The transformed image of `example`, or `None` (warned and counted) when it cannot be decoded."""
        name = self._name(example)
        try:
            image = decode_image(example[self.image_column], name, self.decode_size, self.max_image_pixels)
            return self.image_transform(image)
        except ValueError as error:
            logger.warning("Skipping image %s: %s", name, error)
            self.skipped_images += 1
            return None

    def _has_text(self, example: dict) -> bool:
        text = example.get(self.text_column)
        problem = text_problem(text)
        if problem is None:
            return True
        logger.warning("Skipping the text of %s: %s", example.get(self.id_column, "<unnamed example>"), problem)
        self.skipped_texts += 1
        return False

    def _image_outputs(self, examples: list[dict], pixels: list[torch.Tensor]) -> dict:
        if not pixels:
            return {}
        outputs = {"pixel_values": torch.stack(pixels), "image_ids": [str(e.get(self.id_column, "")) for e in examples]}
        labels = self._labels(examples)
        if labels is not None:
            outputs["image_labels"] = labels
        return outputs

    def _text_outputs(self, examples: list[dict]) -> dict:
        if not examples:
            return {}
        encoding = self.tokenizer(
            [example[self.text_column] for example in examples],
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        outputs = {
            "input_ids": encoding["input_ids"],
            "attention_mask": encoding["attention_mask"],
            "text_ids": [str(example.get(self.id_column, "")) for example in examples],
        }
        labels = self._labels(examples)
        if labels is not None:
            outputs["text_labels"] = labels
        return outputs

    def _labels(self, examples: Sequence[dict]) -> torch.Tensor | None:
        labels = [example.get(self.label_column) for example in examples]
        if any(label is None for label in labels):
            return None
        if isinstance(labels[0], (list, tuple)):
            return torch.tensor(labels, dtype=torch.float32)
        return torch.tensor(labels, dtype=torch.int64)

    def _collate_paired(self, examples: list[dict]) -> dict:
        kept, pixels = [], []
        for example in examples:
            if not self._has_text(example):
                continue
            image = self._transform(example)
            if image is not None:
                kept.append(example)
                pixels.append(image)
        return {**self._image_outputs(kept, pixels), **self._text_outputs(kept)}

    def _collate_decoupled(self, images: list[dict], texts: list[dict]) -> dict:
        kept, pixels = [], []
        for example in images:
            image = self._transform(example)
            if image is not None:
                kept.append(example)
                pixels.append(image)
        return {**self._image_outputs(kept, pixels), **self._text_outputs([t for t in texts if self._has_text(t)])}

    def __call__(self, batch: list[dict] | dict) -> dict[str, Any]:
        skipped_images, skipped_texts = self.skipped_images, self.skipped_texts
        if isinstance(batch, dict):
            if batch.get("paired"):
                outputs = self._collate_paired(batch["images"])
            else:
                outputs = self._collate_decoupled(batch["images"], batch["texts"])
            if "position" in batch:
                outputs["position"] = batch["position"]
        else:
            batch = list(batch)
            images = [example for example in batch if example.get(self.image_column) is not None]
            if not self.return_texts:
                outputs = self._collate_decoupled(images, [])
            elif len(images) == len(batch):
                outputs = self._collate_paired(batch)
            else:
                outputs = self._collate_decoupled(images, [e for e in batch if e.get(self.text_column) is not None])
        outputs["num_skipped_images"] = self.skipped_images - skipped_images
        outputs["num_skipped_texts"] = self.skipped_texts - skipped_texts
        return outputs
