"""Saliency maps of image-text similarity: where in a chest X-ray the match with a finding prompt comes from.

[`image_text_saliency`] computes Grad-CAM (Selvaraju et al. 2017) of the cosine similarity between an image
embedding and a text embedding, on the last feature map of the vision tower. It uses gradients only, no attention
maps, so it works for any vision tower the dual encoder accepts:

- convolutional towers (ResNet, ConvNeXt, RegNet, ...): `last_hidden_state`, a `(B, C, h, w)` feature map;
- token towers whose pooled output averages all tokens (Swin): `last_hidden_state`, `(B, h * w, C)` tokens read as a
  grid;
- token towers whose pooled output reads a class token only (ViT, DeiT): the patch tokens of the last layer get no
  gradient, so the input of the last layer (`hidden_states[-2]`) is used instead, its leading class / distillation /
  register tokens left out.

The map is computed at the resolution the model sees, then carried back through the image processor's
pad-to-square, resize and center crop, so that `heatmap[y, x]` belongs to pixel `(y, x)` of the original image.
[`overlay_heatmap`] draws it over the X-ray with a matplotlib colormap.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .image_processing_medclip import MedCLIPImageProcessor, _min_square_side
from .modeling_medclip import DualEncoderModel
from .retrieval import embed_texts

# Leading non-patch tokens a token tower may carry (class, distillation, register tokens).
_MAX_PREFIX_TOKENS = 8


@dataclass
class Saliency:
    """
    A saliency map of one image for one text.

    Args:
        heatmap (`np.ndarray` of shape `(height, width)`, float32 in `[0, 1]`):
            Grad-CAM of the image-text similarity at the original image's size; 1 marks the region that raises the
            similarity most, 0 the regions that do not raise it (all zeros when nothing does).
        similarity (`float`): cosine similarity of the image and text embeddings.
        image (`PIL.Image.Image`): the image as the processor decoded it (8-bit grayscale, original size).
    """

    heatmap: np.ndarray
    similarity: float
    image: PIL.Image.Image

    def overlay(self, alpha: float = 0.45, colormap: str = "jet") -> PIL.Image.Image:
        """The heat map drawn over the image, see [`overlay_heatmap`]."""
        return overlay_heatmap(self.image, self.heatmap, alpha, colormap)


def overlay_heatmap(
    image: PIL.Image.Image, heatmap: np.ndarray, alpha: float = 0.45, colormap: str = "jet"
) -> PIL.Image.Image:
    """Blends a `[0, 1]` heat map of the image's size, colored by a matplotlib colormap, over the image.

    The blend weight of each pixel is `alpha * heatmap`, so regions with no saliency show the plain X-ray.

    Returns:
        An RGB image of the same size.
    """
    if heatmap.shape != (image.height, image.width):
        raise ValueError(f"heatmap has shape {heatmap.shape}; the image is {image.height} x {image.width}")
    gray = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    colors = matplotlib.colormaps[colormap](heatmap)[..., :3]
    weight = alpha * heatmap[..., None]
    blended = (1.0 - weight) * gray + weight * colors
    return PIL.Image.fromarray(np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8), mode="RGB")


def _grid_shape(num_tokens: int, aspect: float) -> tuple[int, int, int]:
    """`(prefix, h, w)`: the fewest leading tokens to drop so that the rest form an `h x w` grid of the image's
    aspect ratio `w / h`."""
    for prefix in range(min(_MAX_PREFIX_TOKENS, num_tokens - 1) + 1):
        grid = num_tokens - prefix
        height = max(1, round(math.sqrt(grid / aspect)))
        for h in (height - 1, height, height + 1):
            if h > 0 and grid % h == 0 and abs(grid // h / h - aspect) <= 0.5 * max(aspect, 1.0):
                return prefix, h, grid // h
    raise ValueError(f"cannot read {num_tokens} tokens as a grid of patches of an image with aspect ratio {aspect}")


def _as_feature_map(features: torch.Tensor, aspect: float) -> torch.Tensor:
    """`(B, C, h, w)` from a feature map or a `(B, L, C)` token sequence (prefix tokens dropped)."""
    if features.dim() == 4:
        return features
    if features.dim() != 3:
        raise ValueError(f"expected a (B, C, h, w) feature map or (B, L, C) tokens, got shape {tuple(features.shape)}")
    prefix, height, width = _grid_shape(features.shape[1], aspect)
    return features[:, prefix:].transpose(1, 2).reshape(features.shape[0], features.shape[2], height, width)


def _grad_cam(score: torch.Tensor, candidates: list[torch.Tensor], aspect: float) -> torch.Tensor:
    """Grad-CAM `(h, w)` on the first candidate feature tensor whose spatial part the score depends on."""
    gradients = torch.autograd.grad(score, candidates, allow_unused=True)
    for features, gradient in zip(candidates, gradients):
        if gradient is None:
            continue
        feature_map, gradient_map = _as_feature_map(features, aspect), _as_feature_map(gradient, aspect)
        if torch.count_nonzero(gradient_map) == 0:
            continue
        weights = gradient_map.mean(dim=(2, 3), keepdim=True)  # (1, C, 1, 1): channel importance
        return F.relu((weights * feature_map).sum(dim=1))[0].detach()
    raise ValueError("the image-text similarity does not depend on any spatial feature map of the vision tower")


def _heatmap_on_image(cam: torch.Tensor, image_processor: MedCLIPImageProcessor, height: int, width: int) -> torch.Tensor:
    """Carries a map over the processed image back through center crop, resize and pad-to-square to the original
    `height x width` image; regions the crop cut off get 0."""
    processor = image_processor
    canvas_h, canvas_w = height, width
    if processor.do_pad_square:
        side = max(height, width, _min_square_side(processor.size) if processor.do_resize else 0)
        canvas_h = canvas_w = side
    top, left = (canvas_h - height) // 2, (canvas_w - width) // 2
    resized_h, resized_w = canvas_h, canvas_w
    if processor.do_resize:
        resized_h, resized_w = processor.resize(np.zeros((1, canvas_h, canvas_w), np.uint8), processor.size).shape[1:]
    crop_h, crop_w = (processor.crop_size.height, processor.crop_size.width) if processor.do_center_crop else (
        resized_h, resized_w
    )
    cam = F.interpolate(cam[None, None].float(), size=(crop_h, crop_w), mode="bilinear", align_corners=False)[0, 0]
    resized = cam.new_zeros(resized_h, resized_w)
    y0, x0 = (resized_h - crop_h) // 2, (resized_w - crop_w) // 2
    ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + crop_h, resized_h), min(x0 + crop_w, resized_w)
    resized[ys:ye, xs:xe] = cam[ys - y0 : ye - y0, xs - x0 : xe - x0]
    canvas = F.interpolate(resized[None, None], size=(canvas_h, canvas_w), mode="bilinear", align_corners=False)[0, 0]
    return canvas[top : top + height, left : left + width]


def image_text_saliency(
    model: DualEncoderModel,
    processor,
    image,
    text: str | Sequence[str],
    tokenizer_kwargs: dict | None = None,
) -> Saliency:
    """Grad-CAM of the similarity of one image with a text, on the last feature map of the vision tower.

    Args:
        model ([`ConVIRTModel`] or [`MedCLIPModel`]): the dual encoder, on any device. It is run in eval mode and put
            back in its mode afterwards; no parameter gradient is left behind.
        processor ([`MedCLIPProcessor`]): its image processor (a [`MedCLIPImageProcessor`]) and tokenizer.
        image: one image of any kind the image processor reads (PIL image, array, file path, DICOM file).
        text: a finding prompt, or several prompts of one finding: their L2-normalised embeddings are averaged and
            renormalised (the `"mean_embedding"` ensemble of [`ZeroShotClassifier`]).
        tokenizer_kwargs: tokenizer arguments, by default `padding=True, truncation=True, max_length=77`.

    Returns:
        [`Saliency`] with the `(height, width)` heat map of the original image.
    """
    texts = [text] if isinstance(text, str) else list(text)
    image_processor = processor.image_processor
    grayscale = image_processor.to_grayscale(image)
    was_training = model.training
    model.eval()
    try:
        text_embedding = F.normalize(embed_texts(model, processor, texts, tokenizer_kwargs=tokenizer_kwargs).mean(0), dim=-1)
        parameter = next(model.parameters())
        pixel_values = processor(images=grayscale, return_tensors="pt")["pixel_values"]
        pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype).requires_grad_(True)
        with torch.enable_grad():
            outputs = model.get_image_features(pixel_values=pixel_values, output_hidden_states=True)
            image_embedding = F.normalize(outputs.pooler_output[0], dim=-1)
            similarity = image_embedding @ text_embedding.to(image_embedding.dtype)
            candidates = [outputs.last_hidden_state]
            if outputs.hidden_states is not None and len(outputs.hidden_states) >= 2:
                candidates.append(outputs.hidden_states[-2])
            cam = _grad_cam(similarity, candidates, aspect=pixel_values.shape[3] / pixel_values.shape[2])
    finally:
        model.train(was_training)
    heatmap = _heatmap_on_image(cam.cpu(), image_processor, grayscale.height, grayscale.width)
    peak = heatmap.max()
    heatmap = heatmap / peak if peak > 0 else heatmap
    return Saliency(
        heatmap=heatmap.clamp(0, 1).numpy().astype(np.float32), similarity=float(similarity.detach()), image=grayscale
    )


__all__ = ["Saliency", "image_text_saliency", "overlay_heatmap"]
