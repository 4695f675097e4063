"""Zero-shot chest X-ray classification with a ConVIRT / MedCLIP dual encoder, and its export as a plain classifier.

[`ZeroShotClassifier`] encodes every class's prompts once, when it is built, and classifies images by comparing
their embeddings with the cached class embeddings: the text tower never runs again at inference.

Prompt ensembles (several prompts per class, see [`modeling_medclip.prompts`]):

- `"mean_embedding"` (CLIP): the class embedding is the mean of its L2-normalised prompt embeddings, renormalised;
  the class logit is `logit_scale * <image, class>`.
- `"mean_logits"` (the released MedCLIP code): the class logit is the mean over its prompts of
  `logit_scale * <image, prompt>`. The logit is linear in the text embedding, so this equals `logit_scale *
  <image, mean of the normalised prompt embeddings>` without renormalising, which is how it is computed (and
  exported).

Learned prompts: in place of prompts, a [`PromptContext`] (CoOp context vectors trained by
[`modeling_medclip.prompt_learning.train_prompt_context`]) gives one embedding per class, multi-class only.

Modes: `"multiclass"` takes a softmax over the classes; `"multilabel"` decides every class on its own from a
positive and a negative prompt set, `p(class) = softmax(logit_positive, logit_negative)[0]`.

[`export_zero_shot_head`] writes the classifier as a standard [`MedCLIPForImageClassification`] /
[`ConVIRTForImageClassification`] folder (vision tower, visual projection, linear head made of the class embeddings)
that the stock `image-classification` pipeline serves with the same scores and without a text tower.
"""

import copy
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from .configuration_medclip import MedCLIPConfig
from .modeling_medclip import (
    ConVIRTForImageClassification,
    DualEncoderForImageClassification,
    DualEncoderModel,
    MedCLIPForImageClassification,
)
from .prompt_learning import PromptContext
from .retrieval import embed_images, embed_texts


@dataclass
class ZeroShotResult:
    """
    Zero-shot scores of a batch of images.

    Args:
        probs (`torch.Tensor` of shape `(batch_size, num_classes)`):
            Multi-class: softmax over the classes (rows sum to 1). Multi-label: per class, the probability that the
            finding is present (softmax over its positive / negative logit pair).
        logits (`torch.Tensor`):
            `(batch_size, num_classes)` class logits (multi-class) or `(batch_size, num_classes, 2)` positive and
            negative logits (multi-label).
        class_names (`list[str]`): the class of every column.
    """

    probs: torch.Tensor
    logits: torch.Tensor
    class_names: list[str]

    def to_list(self) -> list[list[dict[str, float | str]]]:
        """Per image, `[{"label": class_name, "score": probability}, ...]` sorted by decreasing score, as the
        stock zero-shot pipeline returns them."""
        results = []
        for row in self.probs.float().tolist():
            pairs = sorted(zip(row, self.class_names), key=lambda pair: -pair[0])
            results.append([{"label": label, "score": score} for score, label in pairs])
        return results

    @property
    def predictions(self) -> list[list[dict[str, float | str]]]:
        """Same as [`to_list`]."""
        return self.to_list()


def _validate_prompts(class_prompts, mode: str) -> None:
    if not isinstance(class_prompts, dict) or not class_prompts:
        raise ValueError("`class_prompts` must be a non-empty dict {class_name: prompts}")

    def check_list(prompts, where: str) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"{where} must be a non-empty list of prompt strings, got {prompts!r}")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where} contains an empty or non-string prompt: {prompt!r}")

    for name, prompts in class_prompts.items():
        if mode == "multiclass":
            check_list(prompts, f"the prompts of class {name!r}")
        else:
            if not isinstance(prompts, dict) or set(prompts) != {"positive", "negative"}:
                raise ValueError(
                    f"multilabel prompts of class {name!r} must be a dict with keys 'positive' and 'negative', "
                    f"got {prompts!r}"
                )
            check_list(prompts["positive"], f"the positive prompts of class {name!r}")
            check_list(prompts["negative"], f"the negative prompts of class {name!r}")


class ZeroShotClassifier:
    r"""
    Zero-shot image classifier from a dual encoder and prompts per class.

    The prompts are tokenized by `processor` in chunks of `batch_size`, each chunk padded to its longest prompt,
    and encoded once under `torch.no_grad()` in the constructor. With `config.text_pooling="medclip"` (an unmasked
    mean over all positions) a prompt's embedding depends on the padding of its chunk; the stock
    `zero-shot-image-classification` pipeline pads all its candidate texts together, so the two agree exactly when
    all prompts fit in one chunk (`batch_size >= number of prompts`).

    Args:
        model ([`ConVIRTModel`] or [`MedCLIPModel`]): the dual encoder, used in eval mode on its own device.
        processor ([`MedCLIPProcessor`]): its image processor and tokenizer.
        class_prompts (`dict` or [`PromptContext`]): `{class_name: [prompt, ...]}` (multi-class) or
            `{class_name: {"positive": [...], "negative": [...]}}` (multi-label), e.g. from
            [`generate_prompts`] / [`multilabel_prompts`]; or a learned prompt context (multi-class; `ensemble` and
            `tokenizer_kwargs` do not apply to it).
        ensemble (`str`, defaults to `"mean_embedding"`): `"mean_embedding"` or `"mean_logits"` (see the module).
        mode (`str`, defaults to `"multiclass"`): `"multiclass"` or `"multilabel"`.
        batch_size (`int`, defaults to 64): prompts per text-tower call and images per vision-tower call.
        tokenizer_kwargs (`dict`, *optional*): tokenizer arguments, by default `padding=True, truncation=True,
            max_length=77`.

    Example:

    ```python
    >>> classifier = ZeroShotClassifier(model, processor, generate_prompts("chexpert5", n_per_class=10))
    >>> result = classifier.classify(images)  # PIL images or (B, C, H, W) pixel values
    >>> result.probs.shape
    torch.Size([2, 5])
    >>> result.to_list()[0][0]
    {'label': 'Edema', 'score': 0.31}
    ```"""

    def __init__(
        self,
        model: DualEncoderModel,
        processor,
        class_prompts: dict | PromptContext,
        *,
        ensemble: Literal["mean_embedding", "mean_logits"] = "mean_embedding",
        mode: Literal["multiclass", "multilabel"] = "multiclass",
        batch_size: int = 64,
        tokenizer_kwargs: dict | None = None,
    ):
        if ensemble not in ("mean_embedding", "mean_logits"):
            raise ValueError(f"unknown ensemble {ensemble!r}; expected 'mean_embedding' or 'mean_logits'")
        if mode not in ("multiclass", "multilabel"):
            raise ValueError(f"unknown mode {mode!r}; expected 'multiclass' or 'multilabel'")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        if isinstance(class_prompts, PromptContext):
            if mode != "multiclass":
                raise ValueError("a learned prompt context classifies multi-class only: use mode='multiclass'")
        else:
            _validate_prompts(class_prompts, mode)
        self.model = model.eval()
        self.processor = processor
        self.ensemble = ensemble
        self.mode = mode
        self.batch_size = batch_size
        self.tokenizer_kwargs = tokenizer_kwargs
        self.class_names = list(
            class_prompts.class_names if isinstance(class_prompts, PromptContext) else class_prompts
        )
        self.class_prompts = class_prompts

        with torch.no_grad():
            self.logit_scale = model.get_logit_scale().detach()
            if isinstance(class_prompts, PromptContext):
                self.class_embeddings = class_prompts.class_embeddings(model, processor.tokenizer)
                self.negative_class_embeddings = None
            elif mode == "multiclass":
                self.class_embeddings = self._encode_classes([class_prompts[c] for c in self.class_names])
                self.negative_class_embeddings = None
            else:
                sides = [class_prompts[c]["positive"] for c in self.class_names]
                sides += [class_prompts[c]["negative"] for c in self.class_names]
                embeddings = self._encode_classes(sides)
                self.class_embeddings, self.negative_class_embeddings = embeddings.chunk(2)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """`(len(texts), projection_dim)` L2-normalised text embeddings ([`embed_texts`] in chunks of
        `batch_size`)."""
        return embed_texts(self.model, self.processor, texts, self.batch_size, self.tokenizer_kwargs)

    def _encode_classes(self, prompt_lists: list[list[str]]) -> torch.Tensor:
        """`(num_lists, projection_dim)` ensembled embeddings of prompt lists, all prompts encoded in one pass."""
        prompt_embeddings = self.encode_texts([prompt for prompts in prompt_lists for prompt in prompts])
        chunks = prompt_embeddings.split([len(prompts) for prompts in prompt_lists])
        class_embeddings = torch.stack([chunk.mean(dim=0) for chunk in chunks])
        if self.ensemble == "mean_embedding":
            class_embeddings = F.normalize(class_embeddings, dim=-1)
        return class_embeddings

    def encode_images(self, images) -> torch.Tensor:
        """`(B, projection_dim)` L2-normalised embeddings of PIL images or `(B, C, H, W)` pixel values
        ([`embed_images`] in chunks of `batch_size`)."""
        return embed_images(self.model, self.processor, images, self.batch_size)

    def classify_embeddings(self, image_embeddings: torch.Tensor) -> ZeroShotResult:
        """Scores of `(B, projection_dim)` L2-normalised image embeddings against the cached class embeddings."""
        image_embeddings = image_embeddings.to(self.class_embeddings.dtype)
        logits = self.logit_scale * image_embeddings @ self.class_embeddings.T  # (B, C)
        if self.mode == "multiclass":
            probs = logits.softmax(dim=-1)
        else:
            negative_logits = self.logit_scale * image_embeddings @ self.negative_class_embeddings.T
            logits = torch.stack([logits, negative_logits], dim=-1)  # (B, C, 2)
            probs = logits.softmax(dim=-1)[..., 0]
        return ZeroShotResult(probs=probs, logits=logits, class_names=self.class_names)

    def classify(self, images) -> ZeroShotResult:
        """Classifies PIL images (one or a list) or `(B, C, H, W)` pixel values from the processor.

        Returns:
            [`ZeroShotResult`] with `probs` of shape `(B, num_classes)`.
        """
        return self.classify_embeddings(self.encode_images(images))

    __call__ = classify


def build_zero_shot_head(classifier: ZeroShotClassifier) -> DualEncoderForImageClassification:
    """The zero-shot classifier as a [`MedCLIPForImageClassification`] / [`ConVIRTForImageClassification`].

    The model keeps the vision tower and the visual projection (`classifier_features="normalized_embeds"`), and
    its linear head holds the cached class embeddings times the logit scale, with zero bias: its logits equal the
    classifier's for both ensembles (for `"mean_logits"` the rows are the unrenormalised mean prompt embeddings,
    whose dot product with an image is the mean of the per-prompt logits).

    Multi-class heads get `problem_type="single_label_classification"` (softmax over the classes). Multi-label
    heads have one row per class, `logit_scale * (positive - negative)`, and `problem_type=
    "multi_label_classification"`: `sigmoid(l_pos - l_neg)` is the softmax over the pair, so the stock pipeline's
    sigmoid gives the same per-class probabilities.
    """
    model = classifier.model
    config = copy.deepcopy(model.config)
    config.classifier_features = "normalized_embeds"
    config.classifier_dropout = 0.0
    config.id2label = dict(enumerate(classifier.class_names))
    config.label2id = {name: index for index, name in enumerate(classifier.class_names)}
    config.problem_type = (
        "single_label_classification" if classifier.mode == "multiclass" else "multi_label_classification"
    )
    head_class = MedCLIPForImageClassification if isinstance(config, MedCLIPConfig) else ConVIRTForImageClassification
    parameter = next(model.parameters())
    head = head_class(config).to(device=parameter.device, dtype=parameter.dtype).eval()
    head.vision_model.load_state_dict(model.vision_model.state_dict())
    head.visual_projection.load_state_dict(model.visual_projection.state_dict())
    weight = classifier.class_embeddings
    if classifier.mode == "multilabel":
        weight = weight - classifier.negative_class_embeddings
    with torch.no_grad():
        head.classifier.weight.copy_(classifier.logit_scale * weight)
        head.classifier.bias.zero_()
    return head


def export_zero_shot_head(classifier: ZeroShotClassifier, output_dir: str | os.PathLike) -> str:
    """Saves [`build_zero_shot_head`]'s model and the image processor to `output_dir`, ready for
    `transformers.pipeline("image-classification", model=output_dir)` (no text tower needed).

    Returns:
        `output_dir` as a string.
    """
    output_dir = os.fspath(output_dir)
    build_zero_shot_head(classifier).save_pretrained(output_dir)
    classifier.processor.image_processor.save_pretrained(output_dir)
    return output_dir


__all__ = ["ZeroShotClassifier", "ZeroShotResult", "build_zero_shot_head", "export_zero_shot_head"]
