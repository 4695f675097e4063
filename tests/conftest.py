"""Shared pytest fixtures: paths to the real data in ``../shared/data`` and tiny model configs."""

from pathlib import Path

import pytest
from hub_server import hub_server_fixture  # noqa: F401  (the `hub_server` fixture for every test file)

from dataset_scripts.paths import shared_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real shared data not found at {path} (set MEDCLIP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def covid_cxr_dir(shared_data) -> Path:
    return shared_data / "covid-cxr"


@pytest.fixture(scope="session")
def iu_reports_dir(shared_data) -> Path:
    return shared_data / "iu-xray-reports"


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data) -> Path:
    return shared_data / "bio-clinicalbert-tokenizer"


def tiny_text_config(**kwargs):
    """A 2-layer BERT with Bio_ClinicalBERT's vocabulary size, small enough for unit tests."""
    from transformers import BertConfig

    defaults = dict(
        vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=128,
    )
    return BertConfig(**{**defaults, **kwargs})


def tiny_vision_config(kind: str = "resnet"):
    """Tiny ResNet / Swin / ViT towers that accept 32 x 32 (ResNet: any size) images."""
    from transformers import ResNetConfig, SwinConfig, ViTConfig

    if kind == "resnet":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    if kind == "swin":
        return SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)
    if kind == "vit":
        return ViTConfig(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20
        )
    raise ValueError(kind)


def tiny_config(model_type: str = "medclip", vision: str = "resnet", **kwargs):
    from modeling_medclip import ConVIRTConfig, MedCLIPConfig

    config_class = {"medclip": MedCLIPConfig, "convirt": ConVIRTConfig}[model_type]
    if model_type == "convirt":
        kwargs.setdefault("num_frozen_text_layers", 1)
    return config_class(
        vision_config=tiny_vision_config(vision), text_config=tiny_text_config(), projection_dim=16, **kwargs
    )
