"""The dual encoder and its processor, from [`ModelArguments`]: a saved model, pretrained towers, or named configs."""

import json
import os
from pathlib import Path

from peft import PeftModel
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, ResNetConfig, SwinConfig, ViTConfig

from dataset_scripts.paths import shared_data_dir

from ..adapters import apply_adapters, keep_frozen_batch_norms_in_eval
from ..configuration_medclip import ConVIRTConfig, MedCLIPConfig
from ..image_processing_medclip import MedCLIPImageProcessor
from ..modeling_medclip import ConVIRTModel, DualEncoderModel, MedCLIPModel
from ..processing_medclip import MedCLIPProcessor
from .arguments import ModelArguments

MODEL_CLASSES = {"convirt": (ConVIRTConfig, ConVIRTModel), "medclip": (MedCLIPConfig, MedCLIPModel)}
CONFIG_OVERRIDES = (
    "projection_dim", "loss_type", "text_pooling", "num_frozen_text_layers", "label_similarity_scale",
    "normalize_label_vectors",
)  # fmt: skip


def named_tower_config(name: str, image_size: int):
    """The config of a named randomly initialised tower (`tiny-resnet`, ..., `bert-base`), or of a config file /
    folder."""
    named = {
        "tiny-resnet": lambda: ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        "small-resnet": lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]),
        "resnet-50": lambda: ResNetConfig(),
        "tiny-vit": lambda: ViTConfig(
            image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=37,
        ),  # fmt: skip
        "tiny-swin": lambda: SwinConfig(
            image_size=image_size, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2
        ),
        "swin-tiny": lambda: SwinConfig(image_size=image_size),
        "tiny-bert": lambda: BertConfig(
            vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        ),
        "small-bert": lambda: BertConfig(
            vocab_size=28996, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        ),
        "bert-base": lambda: BertConfig(vocab_size=28996),
    }
    if name in named:
        return named[name]()
    if Path(name).is_file():
        return AutoConfig.for_model(**json.loads(Path(name).read_text()))
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name)
    raise ValueError(f"unknown tower config {name!r}: expected one of {sorted(named)} or a config file / folder")


def build_model(model_args: ModelArguments, adapter: str | os.PathLike | None = None) -> DualEncoderModel | PeftModel:
    """[`build_base_model`], wrapped with trainable adapters when `model_args.peft` is set: new ones
    ([`apply_adapters`]), or those saved in `adapter` (a checkpoint to resume from)."""
    model = build_base_model(model_args)
    if not model_args.peft:
        return model
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        keep_frozen_batch_norms_in_eval(model)
        return model
    return apply_adapters(model, method=model_args.peft, towers=model_args.peft_towers, r=model_args.peft_rank,
                          train_heads=model_args.peft_train_heads)


def build_base_model(model_args: ModelArguments) -> DualEncoderModel:
    """The dual encoder: loaded, assembled from pretrained towers, or randomly initialised. Call after `set_seed`."""
    config_class, model_class = MODEL_CLASSES[model_args.model_type]
    overrides = {name: getattr(model_args, name) for name in CONFIG_OVERRIDES if getattr(model_args, name) is not None}
    if model_args.model_name_or_path:
        return model_class.from_pretrained(model_args.model_name_or_path, **overrides)
    vision, text = model_args.vision_model_name_or_path, model_args.text_model_name_or_path
    if vision and text:
        return model_class.from_vision_text_pretrained(vision, text, **overrides)
    if vision or text:  # one pretrained tower, the other randomly initialised from its named config
        vision_model = (
            AutoModel.from_pretrained(vision)
            if vision
            else AutoModel.from_config(named_tower_config(model_args.vision_config, model_args.image_size))
        )
        text_model = (
            AutoModel.from_pretrained(text)
            if text
            else AutoModel.from_config(named_tower_config(model_args.text_config, model_args.image_size))
        )
        return model_class.from_vision_text_models(vision_model, text_model, **overrides)
    config = config_class(
        vision_config=named_tower_config(model_args.vision_config, model_args.image_size).to_dict(),
        text_config=named_tower_config(model_args.text_config, model_args.image_size).to_dict(),
        **overrides,
    )
    return model_class(config)


def build_processor(model_args: ModelArguments, num_channels: int) -> MedCLIPProcessor:
    """The image processor at `image_size` and the tokenizer (the text tower's, else the shared Bio_ClinicalBERT
    tokenizer)."""
    tokenizer_source = (
        model_args.tokenizer_name_or_path
        or model_args.model_name_or_path
        or model_args.text_model_name_or_path
        or str(shared_data_dir() / "bio-clinicalbert-tokenizer")
    )
    size = model_args.image_size
    image_processor = MedCLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, num_channels=num_channels
    )
    return MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_source))


def build_model_and_processor(
    model_args: ModelArguments, adapter: str | os.PathLike | None = None
) -> tuple[DualEncoderModel | PeftModel, MedCLIPProcessor]:
    """[`build_model`] and [`build_processor`]."""
    model = build_model(model_args, adapter)
    return model, build_processor(model_args, model.config.vision_config.num_channels)
