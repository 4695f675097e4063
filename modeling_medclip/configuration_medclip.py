"""Configurations of the ConVIRT and MedCLIP dual encoders.

Both models are a vision tower and a text tower (any transformers vision / text model, described by their own
configs) joined by projection heads into one embedding space. The two configs differ only in their defaults, which
reproduce the papers:

| setting                 | ConVIRT (Zhang et al. 2020)        | MedCLIP (Wang et al. 2022)                         |
|-------------------------|------------------------------------|----------------------------------------------------|
| vision tower            | ResNet-50                          | Swin-Tiny (ResNet-50 variant: pass a ResNetConfig) |
| text tower              | BERT-base (Bio_ClinicalBERT vocab) | BERT-base (Bio_ClinicalBERT vocab)                 |
| projection head         | Linear -> ReLU -> Linear, 512-d    | one Linear without bias, 512-d                     |
| text pooling            | masked max over tokens             | `medclip`: mean of hidden states 1, 2 and last     |
| temperature             | fixed tau = 0.1                    | learnable, init 0.07, exp(scale) <= 100            |
| loss                    | lambda-weighted InfoNCE (0.75)     | semantic matching loss on label vectors            |
| frozen text layers      | embeddings + first 6 layers        | none                                               |
"""

import math
from typing import ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

# Bio_ClinicalBERT (the text tower of both papers) is a cased BERT-base with this vocabulary size.
BIO_CLINICALBERT_VOCAB_SIZE = 28996


@strict
class DualEncoderConfig(PreTrainedConfig):
    r"""
    Shared configuration of a contrastive image-text dual encoder. Not used directly: see [`ConVIRTConfig`] and
    [`MedCLIPConfig`].

    Args:
        vision_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the vision tower: any transformers vision model (`ResNetConfig`, `SwinConfig`, `ViTConfig`,
            `ConvNextConfig`, ...). A dict must carry its `model_type`.
        text_config (`PreTrainedConfig` or `dict`, *optional*):
            Config of the text tower: any transformers text encoder (`BertConfig`, `RobertaConfig`, ...).
        projection_dim (`int`, defaults to 512):
            Size of the shared embedding space.
        projection_head (`str`, defaults to `"linear"`):
            `"linear"`: one `Linear(d_tower, projection_dim)`; `"mlp"`: `Linear(d_tower, hidden) -> ReLU ->
            Linear(hidden, projection_dim)` (ConVIRT's non-linear head).
        projection_hidden_dim (`int`, *optional*):
            Hidden size of the `"mlp"` head; defaults to the tower's output size.
        projection_bias (`bool`, defaults to `False`):
            Whether the projection layers have a bias.
        text_pooling (`str`, defaults to `"cls"`):
            How token states become one text vector: `"cls"` (first token), `"mean"` (mean over non-padding tokens),
            `"max"` (max over non-padding tokens, ConVIRT), `"medclip"` (the released MedCLIP code: hidden states of
            layers 1, 2 and the last, each averaged over ALL token positions including padding, then averaged over
            the three layers; kept unmasked so converted MedCLIP weights give identical embeddings).
        logit_scale_init_value (`float`):
            Initial value of the log inverse temperature `log(1 / tau)`.
        learnable_logit_scale (`bool`):
            Whether the temperature is trained.
        max_logit_scale (`float`, defaults to 100.0):
            The scale `exp(logit_scale)` is clamped to `[1, max_logit_scale]` in the forward pass (functionally:
            the parameter itself is never modified inside `forward`).
        logit_bias_init_value (`float`, defaults to -10.0):
            Initial logit bias, used only by the sigmoid (SigLIP) loss.
        loss_type (`str`):
            `"infonce"` (symmetric CLIP loss), `"convirt"` (lambda-weighted image->text and text->image InfoNCE),
            `"semantic"` (MedCLIP's semantic matching loss on label vectors), `"sigmoid"` (SigLIP).
        convirt_lambda (`float`, defaults to 0.75):
            Weight of the image->text term of the ConVIRT loss; text->image gets `1 - convirt_lambda`.
        label_similarity_scale (`float`, defaults to 1.0):
            Scale of the label-vector similarity before the row softmax of the semantic loss (1.0 as in MedCLIP).
        normalize_label_vectors (`bool`, defaults to `False`):
            Whether the semantic loss L2-normalises the label vectors before their similarity (cosine label
            similarity; MedCLIP uses the raw dot product). With binary vectors and a scale of 1 MedCLIP's targets
            are nearly uniform; normalised vectors with a scale of about 10 give sharper targets.
        num_frozen_text_layers (`int`, defaults to 0):
            When > 0, the text embeddings and the first `num_frozen_text_layers` encoder layers get
            `requires_grad=False` (ConVIRT freezes the embeddings and the first 6 layers).
        classifier_features (`str`, defaults to `"pooled"`):
            Input of the `...ForImageClassification` head: `"pooled"` (the vision tower's pooled output, for
            fine-tuning and linear probes) or `"normalized_embeds"` (the L2-normalised projected image embedding, as
            used by an exported zero-shot head).
        classifier_dropout (`float`, defaults to 0.0):
            Dropout before the classification head.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialisation of the projection and classification heads.
    """

    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs={"vocab_size": BIO_CLINICALBERT_VOCAB_SIZE}
        ),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    projection_dim: int = 512
    projection_head: Literal["linear", "mlp"] = "linear"
    projection_hidden_dim: int | None = None
    projection_bias: bool = False
    text_pooling: Literal["cls", "mean", "max", "medclip"] = "cls"
    logit_scale_init_value: float = math.log(1 / 0.07)
    learnable_logit_scale: bool = True
    max_logit_scale: float = 100.0
    logit_bias_init_value: float = -10.0
    loss_type: Literal["infonce", "convirt", "semantic", "sigmoid"] = "infonce"
    convirt_lambda: float = 0.75
    label_similarity_scale: float = 1.0
    normalize_label_vectors: bool = False
    num_frozen_text_layers: int = 0
    classifier_features: Literal["pooled", "normalized_embeds"] = "pooled"
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02

    # Prefix of the model classes of a concrete config ("MedCLIP" -> MedCLIPModel, ...), used for `auto_map`.
    model_class_prefix: ClassVar[str] = ""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.model_class_prefix and getattr(self, "auto_map", None) is None:
            # Every Auto class, so that a saved folder loads with `trust_remote_code=True` in any of them.
            prefix = self.model_class_prefix
            self.auto_map = {
                "AutoConfig": f"configuration_medclip.{type(self).__name__}",
                "AutoModel": f"modeling_medclip.{prefix}Model",
                "AutoModelForZeroShotImageClassification": f"modeling_medclip.{prefix}Model",
                "AutoModelForImageClassification": f"modeling_medclip.{prefix}ForImageClassification",
            }
        if not 0.0 <= self.convirt_lambda <= 1.0:
            raise ValueError(f"`convirt_lambda` must be in [0, 1], got {self.convirt_lambda}")
        if self.max_logit_scale < 1.0:
            raise ValueError(f"`max_logit_scale` must be >= 1, got {self.max_logit_scale}")
        if self.num_frozen_text_layers < 0:
            raise ValueError(f"`num_frozen_text_layers` must be >= 0, got {self.num_frozen_text_layers}")
        if self.projection_dim <= 0:
            raise ValueError(f"`projection_dim` must be positive, got {self.projection_dim}")

    @classmethod
    def from_vision_text_configs(cls, vision_config: PreTrainedConfig, text_config: PreTrainedConfig, **kwargs):
        """Build a config from the configs of two existing towers."""
        return cls(vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), **kwargs)


@strict
class ConVIRTConfig(DualEncoderConfig):
    r"""
    Configuration of [`ConVIRTModel`] (Zhang et al., *Contrastive Learning of Medical Visual Representations from
    Paired Images and Text*, 2020). The defaults are the paper's: ResNet-50 and a BERT-base text tower with the
    Bio_ClinicalBERT vocabulary, non-linear 512-d projection heads, masked max pooling of the text, a fixed
    temperature of 0.1, the lambda = 0.75 bidirectional loss and the embeddings plus the first 6 text layers frozen.
    See [`DualEncoderConfig`] for every argument.

    Example:

    ```python
    >>> from transformers import BertConfig, ResNetConfig
    >>> from modeling_medclip import ConVIRTConfig, ConVIRTModel

    >>> config = ConVIRTConfig(
    ...     vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    ...     text_config=BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37),
    ...     projection_dim=16,
    ...     num_frozen_text_layers=1,
    ... )
    >>> model = ConVIRTModel(config)
    ```"""

    model_type = "convirt"
    model_class_prefix = "ConVIRT"

    projection_head: Literal["linear", "mlp"] = "mlp"
    projection_bias: bool = True
    text_pooling: Literal["cls", "mean", "max", "medclip"] = "max"
    logit_scale_init_value: float = math.log(1 / 0.1)
    learnable_logit_scale: bool = False
    loss_type: Literal["infonce", "convirt", "semantic", "sigmoid"] = "convirt"
    num_frozen_text_layers: int = 6


@strict
class MedCLIPConfig(DualEncoderConfig):
    r"""
    Configuration of [`MedCLIPModel`] (Wang et al., *MedCLIP: Contrastive Learning from Unpaired Medical Images and
    Text*, EMNLP 2022). The defaults are the released MedCLIP-ViT model: a Swin-Tiny vision tower (pass a
    `ResNetConfig` for MedCLIP-ResNet), a BERT-base text tower with the Bio_ClinicalBERT vocabulary, bias-free linear
    512-d projections, MedCLIP's layer-1/2/last pooling, a learnable temperature initialised at 0.07 with
    `exp(scale) <= 100`, and the semantic matching loss. See [`DualEncoderConfig`] for every argument.

    Example:

    ```python
    >>> from transformers import AutoConfig
    >>> config = AutoConfig.for_model(
    ...     "medclip",
    ...     vision_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]},
    ...     text_config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
    ...                  "num_attention_heads": 2, "intermediate_size": 37},
    ... )
    ```"""

    model_type = "medclip"
    model_class_prefix = "MedCLIP"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="swin"),
        "text_config": SubConfigSpec(
            config_class=AutoConfig, model_type="bert", init_kwargs={"vocab_size": BIO_CLINICALBERT_VOCAB_SIZE}
        ),
    }

    text_pooling: Literal["cls", "mean", "max", "medclip"] = "medclip"
    loss_type: Literal["infonce", "convirt", "semantic", "sigmoid"] = "semantic"


__all__ = ["ConVIRTConfig", "DualEncoderConfig", "MedCLIPConfig"]
