"""PyTorch ConVIRT and MedCLIP: contrastive dual encoders for chest X-rays and radiology reports.

Both are a vision tower and a text tower (any `AutoModel`), projection heads into a shared space, and a temperature.
[`DualEncoderModel`] holds the shared code; [`ConVIRTModel`] and [`MedCLIPModel`] only bind their configs, whose
defaults reproduce the papers. [`ConVIRTForImageClassification`] and [`MedCLIPForImageClassification`] put a linear
head on the vision tower for fine-tuning, linear probes and exported zero-shot heads.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import ModelOutput, can_return_tuple

from .configuration_medclip import ConVIRTConfig, DualEncoderConfig, MedCLIPConfig
from .losses import clip_loss, convirt_loss, semantic_matching_loss, sigmoid_loss
from .towers import (
    add_block_checkpointing,
    build_projection_head,
    freeze_text_layers,
    match_channels,
    pool_text_output,
    pool_vision_output,
    vision_output_size,
)


@dataclass
class DualEncoderOutput(ModelOutput):
    r"""
    Output of [`ConVIRTModel`] and [`MedCLIPModel`].

    Args:
        loss (`torch.Tensor` of shape `()`, *optional*, returned when `return_loss=True`):
            The contrastive loss chosen by `config.loss_type`.
        logits_per_image (`torch.Tensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities of every image to every text.
        logits_per_text (`torch.Tensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        image_embeds (`torch.Tensor` of shape `(image_batch_size, projection_dim)`):
            L2-normalised projected image embeddings.
        text_embeds (`torch.Tensor` of shape `(text_batch_size, projection_dim)`):
            L2-normalised projected text embeddings.
        vision_model_output (`BaseModelOutputWithPooling`):
            The vision tower's output, with `pooler_output` set to the projected (not normalised) embeddings.
        text_model_output (`BaseModelOutputWithPooling`):
            The text tower's output, with `pooler_output` set to the projected (not normalised) embeddings.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


def _text_tower_from_config(text_config) -> PreTrainedModel:
    """Builds the text tower without its pooler layer when the model class has one (BERT, RoBERTa, ...).

    The pooler is never used by the dual encoder; leaving it out keeps every parameter trained, which DDP requires.
    """
    model_class = MODEL_MAPPING.get(type(text_config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        return AutoModel.from_config(text_config, add_pooling_layer=False)
    return AutoModel.from_config(text_config)


class DualEncoderPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers integration shared by every model of this file."""

    config: DualEncoderConfig
    base_model_prefix = "dual_encoder"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # The towers add their own `_no_split_modules` (BertLayer, SwinStage, ...) in `post_init`.
    _no_split_modules = []

    def _init_weights(self, module):
        super()._init_weights(module)  # projection and classification heads: normal(0, initializer_range), zero bias
        if isinstance(module, DualEncoderModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)


class DualEncoderModel(DualEncoderPreTrainedModel):
    r"""
    A contrastive image-text dual encoder: `vision_model` and `text_model` (any `AutoModel`), `visual_projection` and
    `text_projection` heads, and `logit_scale = log(1 / temperature)`.

    Args:
        config ([`DualEncoderConfig`]): the model configuration.
        vision_model (`PreTrainedModel`, *optional*): an existing vision tower (built from the config when omitted).
        text_model (`PreTrainedModel`, *optional*): an existing text tower (built from the config when omitted).
    """

    def __init__(
        self,
        config: DualEncoderConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else AutoModel.from_config(config.vision_config)
        self.text_model = text_model if text_model is not None else _text_tower_from_config(config.text_config)
        add_block_checkpointing(self.vision_model)
        # the towers share the sub-configs so that changes to the model config reach them
        self.config.vision_config._attn_implementation = self.vision_model.config._attn_implementation
        self.config.text_config._attn_implementation = self.text_model.config._attn_implementation
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        self.visual_projection = build_projection_head(
            vision_output_size(config.vision_config),
            config.projection_dim,
            config.projection_head,
            config.projection_hidden_dim,
            config.projection_bias,
        )
        self.text_projection = build_projection_head(
            config.text_config.hidden_size,
            config.projection_dim,
            config.projection_head,
            config.projection_hidden_dim,
            config.projection_bias,
        )
        self.logit_scale = nn.Parameter(
            torch.tensor(config.logit_scale_init_value), requires_grad=config.learnable_logit_scale
        )
        self.logit_bias = (
            nn.Parameter(torch.tensor(config.logit_bias_init_value)) if config.loss_type == "sigmoid" else None
        )
        self.post_init()
        self.freeze_configured_parameters()

    def freeze_configured_parameters(self) -> None:
        """Freezes what the config fixes: the text embeddings and first `num_frozen_text_layers` layers, and the logit
        scale unless `learnable_logit_scale`."""
        freeze_text_layers(self.text_model, self.config.num_frozen_text_layers)
        self.logit_scale.requires_grad_(self.config.learnable_logit_scale)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with the config's frozen parameters frozen again: transformers 5 loads
        every floating-point parameter as trainable."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_configured_parameters()
        return loaded

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_name_or_path: str, text_name_or_path: str, **kwargs
    ) -> "DualEncoderModel":
        """Builds a dual encoder from two pretrained towers, with freshly initialised heads.

        Args:
            vision_name_or_path: a Hub id or local folder of any vision model (`microsoft/resnet-50`,
                `microsoft/swin-tiny-patch4-window7-224`, ...).
            text_name_or_path: a Hub id or local folder of any text encoder (`emilyalsentzer/Bio_ClinicalBERT`, ...).
            kwargs: arguments of the model config (`projection_dim=...`, `text_pooling=...`); keys prefixed with
                `vision_` / `text_` are passed to that tower's `from_pretrained` instead.

        Returns:
            The model, in training mode like any freshly built model.
        """
        vision_kwargs = {k[len("vision_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("vision_")}
        text_kwargs = {k[len("text_") :]: kwargs.pop(k) for k in list(kwargs) if k.startswith("text_")}
        vision_model = AutoModel.from_pretrained(vision_name_or_path, **vision_kwargs)
        text_model = AutoModel.from_pretrained(text_name_or_path, **text_kwargs)
        return cls.from_vision_text_models(vision_model, text_model, **kwargs)

    @classmethod
    def from_vision_text_models(cls, vision_model: PreTrainedModel, text_model: PreTrainedModel, **kwargs):
        """Builds a dual encoder around two tower instances (pretrained or not), with freshly initialised heads.

        Args:
            vision_model, text_model: `AutoModel` instances of any vision / text architecture.
            kwargs: arguments of the model config (`projection_dim=...`, `text_pooling=...`).
        """
        if getattr(text_model, "pooler", None) is not None:
            text_model.pooler = None  # never used by the dual encoder (see `_text_tower_from_config`)
        config = cls.config_class.from_vision_text_configs(vision_model.config, text_model.config, **kwargs)
        return cls(config, vision_model=vision_model, text_model=text_model)

    def enable_input_require_grads(self):
        """Makes the outputs of both towers' input embeddings require grad (activation checkpointing, PEFT).

        transformers' version calls `requires_grad_` on each embedding output, which fails for vision towers whose
        patch embeddings return a tuple (Swin: `(embeddings, output_dimensions)`); here the tensor is its first item.
        """

        def make_inputs_require_grads(module, inputs, output):
            (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

        self._require_grads_hooks = []
        for tower in (self.vision_model, self.text_model):
            try:
                embeddings = tower.get_input_embeddings()
            except NotImplementedError:  # ResNet and other towers without input embeddings
                continue
            if embeddings is not None:
                self._require_grads_hooks.append(embeddings.register_forward_hook(make_inputs_require_grads))

    def get_logit_scale(self) -> torch.Tensor:
        """`exp(logit_scale)` clamped to `[1, config.max_logit_scale]`, computed without touching the parameter."""
        return self.logit_scale.clamp(0.0, math.log(self.config.max_logit_scale)).exp()

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Images from [`MedCLIPImageProcessor`]; one-channel images are repeated for three-channel towers.

        Returns:
            The vision tower's output with `pooler_output` of shape `(batch_size, projection_dim)`: the projected,
            not yet normalised, image embeddings.
        """
        pixel_values = match_channels(pixel_values, self.config.vision_config.num_channels)
        vision_outputs = self.vision_model(pixel_values=pixel_values, return_dict=True, **kwargs)
        pooled = pool_vision_output(vision_outputs)
        return BaseModelOutputWithPooling(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.visual_projection(pooled),
            hidden_states=getattr(vision_outputs, "hidden_states", None),
            attentions=getattr(vision_outputs, "attentions", None),
        )

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            input_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`): token ids from the tokenizer.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 on real tokens.
            token_type_ids, position_ids (*optional*): passed to the text tower.

        Returns:
            The text tower's output with `pooler_output` of shape `(batch_size, projection_dim)`: the projected, not
            yet normalised, text embeddings pooled as `config.text_pooling` says.
        """
        if self.config.text_pooling == "medclip":
            kwargs["output_hidden_states"] = True
        text_outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
            **kwargs,
        )
        pooled = pool_text_output(text_outputs, attention_mask, self.config.text_pooling)
        return BaseModelOutputWithPooling(
            last_hidden_state=text_outputs.last_hidden_state,
            pooler_output=self.text_projection(pooled),
            hidden_states=text_outputs.hidden_states,
            attentions=text_outputs.attentions,
        )

    def compute_loss(
        self,
        logits_per_image: torch.Tensor,
        logits_per_text: torch.Tensor,
        image_labels: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss chosen by `config.loss_type`, from logits that may span the whole (gathered) global batch.

        Args:
            logits_per_image: `(B_img, B_txt)` scaled similarities.
            logits_per_text: `(B_txt, B_img)`, their transpose.
            image_labels: `(B_img, C)` label vectors, required by the semantic loss.
            text_labels: `(B_txt, C)` label vectors, required by the semantic loss.
        """
        loss_type = self.config.loss_type
        if loss_type == "infonce":
            return clip_loss(logits_per_image, logits_per_text)
        if loss_type == "convirt":
            return convirt_loss(logits_per_image, logits_per_text, self.config.convirt_lambda)
        if loss_type == "semantic":
            if image_labels is None or text_labels is None:
                raise ValueError(
                    "loss_type='semantic' needs `image_labels` (B_img, C) and `text_labels` (B_txt, C) label vectors"
                )
            return semantic_matching_loss(
                logits_per_image,
                logits_per_text,
                image_labels,
                text_labels,
                self.config.label_similarity_scale,
                self.config.normalize_label_vectors,
            )
        return sigmoid_loss(logits_per_image, self.logit_bias)

    def _forward_loss(self, logits_per_image, logits_per_text, image_labels, text_labels) -> torch.Tensor:
        """`compute_loss`, except that the semantic loss without label vectors is the paired batch's InfoNCE."""
        if self.config.loss_type != "semantic" or (image_labels is not None and text_labels is not None):
            return self.compute_loss(logits_per_image, logits_per_text, image_labels, text_labels)
        if logits_per_image.shape[0] != logits_per_image.shape[1]:
            raise ValueError(
                f"return_loss=True without label vectors takes the batch as image-text pairs, but it has "
                f"{logits_per_image.shape[0]} images and {logits_per_image.shape[1]} texts: pass `image_labels` and "
                "`text_labels` for the semantic loss of decoupled batches"
            )
        return clip_loss(logits_per_image, logits_per_text)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_labels: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> DualEncoderOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(text_batch_size, sequence_length)`): token ids.
            attention_mask (`torch.Tensor` of shape `(text_batch_size, sequence_length)`, *optional*): padding mask.
            pixel_values (`torch.Tensor` of shape `(image_batch_size, num_channels, height, width)`): images; one or
                three channels. `image_batch_size` and `text_batch_size` may differ (decoupled MedCLIP batches).
            image_labels (`torch.Tensor` of shape `(image_batch_size, num_classes)`, *optional*): label vectors of the
                images, for the semantic loss.
            text_labels (`torch.Tensor` of shape `(text_batch_size, num_classes)`, *optional*): label vectors of the
                texts, for the semantic loss.
            return_loss (`bool`, *optional*): whether to compute the loss of `config.loss_type`. For the semantic loss
                called without `image_labels` / `text_labels`, the batch is taken as image-text pairs (image `i` with
                text `i`, as in MedCLIP's and CLIP's forward) and the loss is their symmetric InfoNCE; that needs
                `image_batch_size == text_batch_size` (a `ValueError` says so otherwise).
            token_type_ids, position_ids (*optional*): passed to the text tower (the stock pipelines pass every
                tokenizer output).

        Returns:
            [`DualEncoderOutput`].

        Example:

        ```python
        >>> import torch
        >>> from transformers import BertConfig, ResNetConfig
        >>> from modeling_medclip import MedCLIPConfig, MedCLIPModel

        >>> config = MedCLIPConfig(
        ...     vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        ...     text_config=BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                            intermediate_size=37),
        ...     projection_dim=16,
        ... )
        >>> model = MedCLIPModel(config).eval()
        >>> out = model(input_ids=torch.randint(0, 99, (3, 7)), pixel_values=torch.randn(2, 1, 64, 64))
        >>> out.logits_per_image.shape
        torch.Size([2, 3])
        ```"""
        if pixel_values is None or input_ids is None:
            raise ValueError("forward needs both `pixel_values` and `input_ids`; use get_image_features / "
                             "get_text_features for one modality")
        vision_outputs = self.get_image_features(pixel_values=pixel_values, **kwargs)
        text_outputs = self.get_text_features(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            **kwargs,
        )
        image_embeds = F.normalize(vision_outputs.pooler_output, dim=-1)
        text_embeds = F.normalize(text_outputs.pooler_output, dim=-1)
        logits_per_image = self.get_logit_scale() * image_embeds @ text_embeds.T
        logits_per_text = logits_per_image.T

        loss = None
        if return_loss:
            loss = self._forward_loss(logits_per_image, logits_per_text, image_labels, text_labels)
        return DualEncoderOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            vision_model_output=vision_outputs,
            text_model_output=text_outputs,
        )


class DualEncoderForImageClassification(DualEncoderPreTrainedModel):
    r"""
    The vision tower of a dual encoder with a linear classification head.

    Loading a pretrained [`ConVIRTModel`] / [`MedCLIPModel`] folder with `from_pretrained(path, num_labels=...)`
    keeps its vision tower (and its visual projection when `config.classifier_features == "normalized_embeds"`) and
    initialises the head. The loss follows `config.problem_type`: `"single_label_classification"` (cross-entropy over
    `num_labels` classes, integer labels), `"multi_label_classification"` (binary cross-entropy per class, float
    multi-hot labels) or `"regression"` (MSE). When `problem_type` is unset it is chosen from the labels:
    `num_labels == 1` is a binary classifier (one logit, BCE on 0/1 labels), integer labels give single-label
    classification and float labels multi-label classification.
    """

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # the text half of a pretrained dual encoder is not part of the classifier (nor, on pooled features, the visual
    # projection)
    _keys_to_ignore_on_load_unexpected = [
        r"^text_model\.", r"^text_projection\.", r"^logit_scale$", r"^logit_bias$", r"^visual_projection\."
    ]

    def __init__(self, config: DualEncoderConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vision_model = AutoModel.from_config(config.vision_config)
        self.vision_model.config = self.config.vision_config
        add_block_checkpointing(self.vision_model)
        if config.classifier_features == "normalized_embeds":
            self.visual_projection = build_projection_head(
                vision_output_size(config.vision_config),
                config.projection_dim,
                config.projection_head,
                config.projection_hidden_dim,
                config.projection_bias,
            )
            feature_size = config.projection_dim
        else:
            self.visual_projection = None
            feature_size = vision_output_size(config.vision_config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(feature_size, config.num_labels)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch_size, feature_size)` features that the head classifies (see `config.classifier_features`)."""
        pixel_values = match_channels(pixel_values, self.config.vision_config.num_channels)
        pooled = pool_vision_output(self.vision_model(pixel_values=pixel_values, return_dict=True))
        if self.visual_projection is None:
            return pooled
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        problem_type = self.config.problem_type
        if problem_type is None:
            if self.num_labels == 1 or labels.is_floating_point():
                problem_type = "multi_label_classification"
            else:
                problem_type = "single_label_classification"
        if problem_type == "single_label_classification":
            if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"single-label `labels` must have shape ({logits.shape[0]},), got {tuple(labels.shape)}"
                )
            return F.cross_entropy(logits, labels.long())
        labels = labels.to(logits.dtype).reshape(logits.shape[0], -1)
        if labels.shape != logits.shape:
            raise ValueError(f"`labels` must have shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels)
        return F.mse_loss(logits, labels)

    @can_return_tuple
    def forward(
        self, pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`): images.
            labels (`torch.Tensor`, *optional*): `(batch_size,)` class ids, or `(batch_size, num_labels)` multi-hot
                floats (a `(batch_size,)` float vector for a binary head).

        Returns:
            `ImageClassifierOutput` with `logits` of shape `(batch_size, num_labels)`.
        """
        if pixel_values is None:
            raise ValueError("forward needs `pixel_values`")
        logits = self.classifier(self.dropout(self.get_image_features(pixel_values)))
        loss = self._loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class ConVIRTModel(DualEncoderModel):
    """ConVIRT (Zhang et al. 2020). See [`DualEncoderModel`] and [`ConVIRTConfig`]."""

    config_class = ConVIRTConfig


class MedCLIPModel(DualEncoderModel):
    """MedCLIP (Wang et al. 2022). See [`DualEncoderModel`] and [`MedCLIPConfig`]."""

    config_class = MedCLIPConfig


class ConVIRTForImageClassification(DualEncoderForImageClassification):
    """The ConVIRT vision tower with a classification head. See [`DualEncoderForImageClassification`]."""

    config_class = ConVIRTConfig


class MedCLIPForImageClassification(DualEncoderForImageClassification):
    """The MedCLIP vision tower with a classification head. See [`DualEncoderForImageClassification`]."""

    config_class = MedCLIPConfig


__all__ = [
    "ConVIRTForImageClassification",
    "ConVIRTModel",
    "DualEncoderForImageClassification",
    "DualEncoderModel",
    "DualEncoderOutput",
    "DualEncoderPreTrainedModel",
    "MedCLIPForImageClassification",
    "MedCLIPModel",
]
