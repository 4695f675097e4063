"""Tests of `convert_original_medclip_checkpoint`: a randomly initialised model with the ORIGINAL MedCLIP layout and
forward (written here from the original code: torchvision-style ResNet, transformers 4.2x Swin names, BERT with pooler
and MedCLIP's layer-1/2/last pooling, the clamped logit scale) is saved as `pytorch_model.bin`, converted, reloaded
with `from_pretrained`, and must give the same embeddings and logits."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoProcessor, AutoTokenizer, BertConfig, BertModel, SwinConfig, SwinModel

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.convert_original_medclip_checkpoint import convert_checkpoint, convert_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
NUM_SAMPLES = 3


# --------------------------------------------------------------------------------------------------------------------
# The original MedCLIP model, re-implemented from its description (torchvision cannot be installed here).
# --------------------------------------------------------------------------------------------------------------------
class TorchvisionBottleneck(nn.Module):
    """torchvision's `Bottleneck` (ResNet v1.5: the stride sits on the 3x3 convolution), with its parameter names."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class TorchvisionResNet(nn.Module):
    """torchvision's `ResNet` with bottleneck blocks and MedCLIP's `fc = Linear(features, 512, bias=False)`."""

    def __init__(self, stem_width: int, widths: list[int], depths: list[int], projection_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = stem_width
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(TorchvisionBottleneck(in_channels, width, stride))
                in_channels = 4 * width
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, projection_dim, bias=False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(self.num_stages):
            x = getattr(self, f"layer{stage + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class OriginalResNetVision(nn.Module):
    def __init__(self, projection_dim: int):
        super().__init__()
        self.model = TorchvisionResNet(8, [4, 8, 8, 16], [2, 1, 2, 1], projection_dim)

    def forward(self, pixel_values):
        if pixel_values.shape[1] == 1:
            pixel_values = pixel_values.repeat(1, 3, 1, 1)
        return self.model(pixel_values)


class OriginalSwinVision(nn.Module):
    def __init__(self, projection_dim: int):
        super().__init__()
        config = SwinConfig(embed_dim=8, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4], window_size=7, image_size=224)
        self.model = SwinModel(config)
        self.projection_head = nn.Linear(self.model.num_features, projection_dim, bias=False)

    def forward(self, pixel_values):
        if pixel_values.shape[1] == 1:
            pixel_values = pixel_values.repeat(1, 3, 1, 1)
        return self.projection_head(self.model(pixel_values).pooler_output)


class OriginalText(nn.Module):
    def __init__(self, projection_dim: int):
        super().__init__()
        config = BertConfig(
            vocab_size=28996, hidden_size=64, num_hidden_layers=3, num_attention_heads=1, intermediate_size=37
        )
        self.model = BertModel(config)  # with its pooler, as AutoModel.from_pretrained(Bio_ClinicalBERT)
        self.projection_head = nn.Linear(64, projection_dim, bias=False)

    def forward(self, input_ids, attention_mask):
        hidden_states = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)[
            "hidden_states"
        ]
        layers = torch.stack([hidden_states[1], hidden_states[2], hidden_states[-1]])  # (3, B, L, D)
        return self.projection_head(layers.permute(1, 0, 2, 3).mean(2).mean(1))


class OriginalMedCLIP(nn.Module):
    def __init__(self, variant: str, logit_scale: float, projection_dim: int = 16):
        super().__init__()
        vision_class = OriginalResNetVision if variant == "resnet" else OriginalSwinVision
        self.vision_model = vision_class(projection_dim)
        self.text_model = OriginalText(projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(logit_scale))

    def forward(self, input_ids, pixel_values, attention_mask):
        image_embeds = self.vision_model(pixel_values)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = self.text_model(input_ids, attention_mask)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        scale = torch.clamp(self.logit_scale, 0, 4.6052).exp()
        logits_per_text = torch.matmul(text_embeds, image_embeds.t()) * scale
        return image_embeds, text_embeds, logits_per_text.t()


# transformers 5 Swin names -> the transformers 4.2x names of the released checkpoint (written independently of the
# converter's table, in the opposite direction).
SWIN_NAMES_TO_4_2X = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    ("attention.o_proj.", "attention.output.dense."),
    ("attention.relative_position_bias.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)


def to_4_2x_swin_name(key: str) -> str:
    for new, old in SWIN_NAMES_TO_4_2X:
        key = key.replace(new, old)
    return key


def original_state_dict(model: OriginalMedCLIP, variant: str) -> dict[str, torch.Tensor]:
    """The state dict the original code would save: 4.2x Swin names, Swin's relative position index buffers and
    BERT's `position_ids` buffer (both persistent in transformers 4.2x)."""
    state_dict = {}
    for key, value in model.state_dict().items():
        if variant == "swin" and key.startswith("vision_model.model."):
            key = to_4_2x_swin_name(key)
        state_dict[key] = value.clone()
    if variant == "swin":
        for stage, layer in enumerate(model.vision_model.model.encoder.layers):
            for index, block in enumerate(layer.blocks):
                index_buffer = block.attention.relative_position_bias.relative_position_index
                window_area = block.attention.relative_position_bias.window_area
                key = f"vision_model.model.encoder.layers.{stage}.blocks.{index}.attention.self."
                state_dict[key + "relative_position_index"] = index_buffer.view(window_area, window_area).clone()
    max_positions = model.text_model.model.config.max_position_embeddings
    state_dict["text_model.model.embeddings.position_ids"] = torch.arange(max_positions).unsqueeze(0)
    return state_dict


def build_original_model(variant: str, logit_scale: float) -> OriginalMedCLIP:
    """A randomly initialised original model in eval mode, with non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0 if variant == "resnet" else 1)
    model = OriginalMedCLIP(variant, logit_scale)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "logit_scale":
                parameter.add_(0.1 * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn_like(module.running_mean))
                module.running_var.copy_(torch.empty_like(module.running_var).uniform_(0.5, 2.0))
                module.num_batches_tracked.fill_(17)
    return model.eval()


@pytest.fixture(scope="module")
def samples(covid_cxr_dir, tokenizer_dir):
    """Real chest X-rays and notes, run through the MedCLIP processor with Bio_ClinicalBERT's tokenizer."""
    with open(covid_cxr_dir / "metadata.csv", newline="", encoding="utf-8", errors="replace") as file:
        rows = [row for row in csv.DictReader(file) if row["text"].strip()][:NUM_SAMPLES]
    images = [PIL.Image.open(covid_cxr_dir / row["file_name"]) for row in rows]
    processor = MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))
    return processor(text=[row["text"] for row in rows], images=images, return_tensors="pt")


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    ("variant", "logit_scale", "use_cli"),
    [
        # 4.7 checks the clamp of the logit scale at 4.6052; the CLI run pays a fresh interpreter's imports
        pytest.param("resnet", 4.7, True, marks=pytest.mark.slow),
        ("swin", 2.3, False),
    ],
)
def test_converted_model_matches_original(
    tmp_path, samples, shared_data, tokenizer_dir, variant, logit_scale, use_cli
):
    original = build_original_model(variant, logit_scale)
    checkpoint = tmp_path / "pytorch_model.bin"
    torch.save(original_state_dict(original, variant), checkpoint)
    output_dir = tmp_path / "converted"

    if use_cli:  # the tokenizer defaults to the local Bio_ClinicalBERT copy
        command = [sys.executable, "-m", "modeling_medclip.convert_original_medclip_checkpoint"]
        command += ["--checkpoint", str(checkpoint), "--variant", variant, "--output_dir", str(output_dir)]
        env = {**os.environ, "MEDCLIP_SHARED_DATA": str(shared_data)}
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert "dropping `text_model.model.pooler.dense.weight`" in result.stderr
    else:
        convert_checkpoint(checkpoint, variant, output_dir, tokenizer=str(tokenizer_dir))

    assert (output_dir / "config.json").is_file() and (output_dir / "model.safetensors").is_file()
    model = MedCLIPModel.from_pretrained(output_dir).eval()
    auto_model = AutoModel.from_pretrained(output_dir).eval()
    assert type(auto_model) is MedCLIPModel
    assert model.config.text_pooling == "medclip" and model.config.projection_bias is False
    assert model.config.vision_config.model_type == variant
    assert model.config.logit_scale_init_value == pytest.approx(logit_scale)

    processor = AutoProcessor.from_pretrained(output_dir)
    assert isinstance(processor, MedCLIPProcessor)
    assert processor.tokenizer.vocab_size == 28996

    with torch.no_grad():
        image_embeds, text_embeds, logits = original(
            samples["input_ids"], samples["pixel_values"], samples["attention_mask"]
        )
        for converted in (model, auto_model):
            outputs = converted(**samples)
            diffs = {
                "image_embeds": max_abs_diff(outputs.image_embeds, image_embeds),
                "text_embeds": max_abs_diff(outputs.text_embeds, text_embeds),
                "logits_per_image": max_abs_diff(outputs.logits_per_image, logits),
                "logits_per_text": max_abs_diff(outputs.logits_per_text, logits.t()),
            }
            print(f"{variant}: max abs diffs {diffs}")
            assert all(diff < TOLERANCE for diff in diffs.values()), diffs
    assert logits.std() > 0.01  # the logits are not degenerate
    # the original clamps the log scale at 4.6052 (exp = 100.00065), not at log(100)
    assert model.get_logit_scale().item() == pytest.approx(math.exp(min(logit_scale, 4.6052)), rel=1e-6)


@pytest.fixture(scope="module")
def resnet_state_dict():
    return original_state_dict(build_original_model("resnet", 3.0), "resnet")


def test_position_ids_buffer_is_optional(resnet_state_dict):
    with_buffer, _ = convert_state_dict(resnet_state_dict, "resnet")
    state_dict = dict(resnet_state_dict)
    del state_dict["text_model.model.embeddings.position_ids"]
    config, new_state_dict = convert_state_dict(state_dict, "resnet")
    assert config.to_dict() == with_buffer.to_dict()
    assert not any("position_ids" in key or "pooler" in key for key in new_state_dict)


def test_unknown_key_raises(resnet_state_dict):
    state_dict = {**resnet_state_dict, "vision_model.model.fc.bias": torch.zeros(16)}
    with pytest.raises(ValueError, match=r"unexpected keys \['vision_model\.model\.fc\.bias'\]"):
        convert_state_dict(state_dict, "resnet")


def test_missing_key_raises(resnet_state_dict):
    state_dict = dict(resnet_state_dict)
    del state_dict["text_model.model.encoder.layer.1.output.LayerNorm.bias"]
    del state_dict["vision_model.model.layer2.0.downsample.1.running_var"]
    with pytest.raises(ValueError, match="missing keys") as error:
        convert_state_dict(state_dict, "resnet")
    assert "text_model.model.encoder.layer.1.output.LayerNorm.bias" in str(error.value)
    assert "vision_model.model.layer2.0.downsample.1.running_var" in str(error.value)


def test_wrong_variant_raises(resnet_state_dict):
    with pytest.raises(ValueError, match=r"missing keys needed to read its architecture: \[.*patch_embeddings"):
        convert_state_dict(resnet_state_dict, "swin")
    with pytest.raises(ValueError, match="unknown MedCLIP variant"):
        convert_state_dict(resnet_state_dict, "vit")


def test_full_size_configs_are_inferred():
    """The released sizes (ResNet-50 or Swin-Tiny, Bio_ClinicalBERT, 512-d) are read back from shapes alone."""
    with torch.device("meta"):
        text = {f"text_model.model.{k}": v for k, v in BertModel(BertConfig(vocab_size=28996)).state_dict().items()}
        text["text_model.projection_head.weight"] = torch.empty(512, 768)
        resnet = TorchvisionResNet(64, [64, 128, 256, 512], [3, 4, 6, 3], 512).state_dict()
        swin_config = SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)
        swin = SwinModel(swin_config).state_dict()
    logit_scale = {"logit_scale": torch.tensor(4.6052)}
    resnet_checkpoint = {**{f"vision_model.model.{k}": v for k, v in resnet.items()}, **text, **logit_scale}
    swin_checkpoint = {
        **{f"vision_model.model.{to_4_2x_swin_name(k)}": v for k, v in swin.items()},
        "vision_model.projection_head.weight": torch.empty(512, 768, device="meta"),
        **text,
        **logit_scale,
    }

    resnet_config, resnet_weights = convert_state_dict(resnet_checkpoint, "resnet")
    swin_config_out, swin_weights = convert_state_dict(swin_checkpoint, "swin")
    vision = resnet_config.vision_config
    assert (vision.embedding_size, vision.hidden_sizes, vision.depths) == (64, [256, 512, 1024, 2048], [3, 4, 6, 3])
    assert vision.downsample_in_bottleneck is False and vision.layer_type == "bottleneck"
    vision = swin_config_out.vision_config
    assert (vision.embed_dim, vision.depths, vision.num_heads) == (96, [2, 2, 6, 2], [3, 6, 12, 24])
    assert vision.window_size == 7
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.mlp_ratio) == (224, 4, 768, 4.0)
    for config in (resnet_config, swin_config_out):
        text_config = config.text_config
        assert (text_config.vocab_size, text_config.hidden_size, text_config.num_hidden_layers) == (28996, 768, 12)
        assert (text_config.num_attention_heads, text_config.intermediate_size) == (12, 3072)
        assert config.projection_dim == 512 and config.projection_head == "linear"
    # the converted keys and shapes are exactly those of the full-size model
    for config, weights in ((resnet_config, resnet_weights), (swin_config_out, swin_weights)):
        with torch.device("meta"):
            expected = MedCLIPModel(config).state_dict()
        assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in expected.items()}
