"""Converts a checkpoint of the original MedCLIP release (github.com/RyanWangZf/MedCLIP) to a [`MedCLIPModel`] folder.

The original `MedCLIPModel` is a plain `nn.Module` saved as `pytorch_model.bin` (`torch.save(model.state_dict())`):

- `vision_model.model.*`: either a torchvision ResNet-50 whose `fc` was replaced by `Linear(2048, 512, bias=False)`
  (MedCLIP-ResNet; that `fc` is the projection head), or a transformers 4.2x `SwinModel`
  (`microsoft/swin-tiny-patch4-window7-224`) followed by `vision_model.projection_head = Linear(768, 512, bias=False)`
  applied to the Swin pooler output (MedCLIP-ViT). One-channel images are repeated to three channels.
- `text_model.model.*`: a transformers 4.2x `BertModel` (Bio_ClinicalBERT) with its pooler, run with
  `output_hidden_states=True`; the text vector is the mean over all token positions (padding included) of hidden
  states 1, 2 and the last, averaged over these three layers, then `text_model.projection_head =
  Linear(768, 512, bias=False)`.
- `logit_scale`: the log inverse temperature; the forward clamps it to `[0, 4.6052]` before `exp`, and the logits
  are `exp(logit_scale) * image_embeds @ text_embeds.T` on L2-normalised embeddings.

The converted model reproduces that forward: a transformers `ResNetModel` (stride on the 3x3 convolution as in
torchvision, global average pooling) or `SwinModel`, a `BertModel` without pooler, bias-free linear projections,
`text_pooling="medclip"` and `max_logit_scale = exp(4.6052)`. Key renames are explicit tables
(`_resnet_config_and_keys`, `_SWIN_BLOCK_RENAMES`):

- torchvision ResNet (`vision_model.model.`) -> transformers `ResNetModel` (`vision_model.`): `conv1` / `bn1` ->
  `embedder.embedder.convolution` / `.normalization`; `layer{s+1}.{i}.conv{k+1}` / `.bn{k+1}` ->
  `encoder.stages.{s}.layers.{i}.layer.{k}.convolution` / `.normalization` (k = 0, 1, 2);
  `layer{s+1}.{i}.downsample.0` / `.downsample.1` -> `encoder.stages.{s}.layers.{i}.shortcut.convolution` /
  `.normalization` (BatchNorm weight, bias, running_mean, running_var and num_batches_tracked alike); the bias-free
  `fc` -> the top-level `visual_projection`.
- transformers 4.2x Swin block -> transformers 5 Swin block: `attention.self.query` / `key` / `value` ->
  `attention.q_proj` / `k_proj` / `v_proj`; `attention.self.relative_position_bias_table` ->
  `attention.relative_position_bias.relative_position_bias_table`; `attention.output.dense` -> `attention.o_proj`;
  `intermediate.dense` / `output.dense` -> `mlp.fc1` / `mlp.fc2`; the `attention.self.relative_position_index`
  buffers are dropped (transformers 5 recomputes them from the window size; they are checked to agree). The
  `layernorm_before` / `layernorm_after` of the blocks, the embeddings (`patch_embeddings.projection`, `norm`), the
  patch merging (`downsample.reduction`, `downsample.norm`) and the final `layernorm` keep their names; the Swin
  pooler is a parameter-free average pooling in both versions.

`vision_model.projection_head` becomes `visual_projection`, `text_model.model.*` becomes `text_model.*` (BERT names
are unchanged), `text_model.projection_head` becomes `text_projection`. Dropped on purpose: the BERT pooler
(`text_model.model.pooler.*`, which MedCLIP's text pooling never uses and our text tower does not have) and the
`text_model.model.embeddings.position_ids` buffer that transformers 4.2x saved (the release carries it; newer
transformers no longer store it, which makes MedCLIP's own loader fail with `Unexpected key(s) in state_dict:
"text_model.model.embeddings.position_ids"`). Any other unexpected key, or any missing one, raises a `ValueError`
that lists them.

Sizes are read from the tensor shapes, so smaller checkpoints of the same layout convert too. Two settings cannot be
read from shapes: BERT's number of attention heads (taken as `hidden_size // 64`, BERT-base's head size: 12 for
Bio_ClinicalBERT) and Swin's `image_size` (MedCLIP's 224; without absolute position embeddings, which MedCLIP's
Swin-Tiny does not have, no weight depends on it).

Usage:

```bash
python -m modeling_medclip.convert_original_medclip_checkpoint \
    --checkpoint pretrained/medclip-vit/pytorch_model.bin --variant swin --output_dir medclip-vit-hf
```

The tokenizer saved with the model defaults to Bio_ClinicalBERT's: the local copy
`<repo>/../shared/data/bio-clinicalbert-tokenizer` (or `$MEDCLIP_SHARED_DATA/bio-clinicalbert-tokenizer`) when it
exists, else the Hub id `emilyalsentzer/Bio_ClinicalBERT`; `--tokenizer` overrides it.
"""

import argparse
import logging
import math
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, ResNetConfig, SwinConfig
from transformers.models.swin.modeling_swin import SwinRelativePositionBias

from .configuration_medclip import MedCLIPConfig
from .image_processing_medclip import MedCLIPImageProcessor
from .modeling_medclip import MedCLIPModel
from .processing_medclip import MedCLIPProcessor


logger = logging.getLogger(__name__)

VARIANTS = ("resnet", "swin")

# The original `compute_logits` clamps `logit_scale` to [0, 4.6052] before taking `exp`.
ORIGINAL_MAX_LOG_LOGIT_SCALE = 4.6052
# MedCLIP's image size (`constants.IMG_SIZE`), the `image_size` of the converted Swin config.
ORIGINAL_IMAGE_SIZE = 224
# BERT-base's attention head size: the number of heads is `hidden_size // BERT_HEAD_SIZE`.
BERT_HEAD_SIZE = 64

BIO_CLINICALBERT_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
TOKENIZER_FOLDER_NAME = "bio-clinicalbert-tokenizer"

VISION_PREFIX = "vision_model.model."
TEXT_PREFIX = "text_model.model."

# Keys of the original checkpoint that are accepted and deliberately not converted.
DROPPED_KEYS = {
    # the BERT pooler (tanh(Linear(CLS))): MedCLIP's text embedding never uses it and our text tower has none
    TEXT_PREFIX + "pooler.dense.weight": "BERT pooler, unused by MedCLIP's text pooling",
    TEXT_PREFIX + "pooler.dense.bias": "BERT pooler, unused by MedCLIP's text pooling",
    # a persistent buffer in older transformers, recomputed by the current BertEmbeddings
    TEXT_PREFIX + "embeddings.position_ids": "BERT position_ids buffer of older transformers",
}

_BATCH_NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Per-block parameters of a transformers 4.2x Swin layer and their names in transformers 5.
_SWIN_BLOCK_RENAMES = {
    "layernorm_before.weight": "layernorm_before.weight",
    "layernorm_before.bias": "layernorm_before.bias",
    "attention.self.query.weight": "attention.q_proj.weight",
    "attention.self.query.bias": "attention.q_proj.bias",
    "attention.self.key.weight": "attention.k_proj.weight",
    "attention.self.key.bias": "attention.k_proj.bias",
    "attention.self.value.weight": "attention.v_proj.weight",
    "attention.self.value.bias": "attention.v_proj.bias",
    "attention.self.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
    "attention.output.dense.weight": "attention.o_proj.weight",
    "attention.output.dense.bias": "attention.o_proj.bias",
    "layernorm_after.weight": "layernorm_after.weight",
    "layernorm_after.bias": "layernorm_after.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_SWIN_QKV_BIASES = ("attention.self.query.bias", "attention.self.key.bias", "attention.self.value.bias")
_SWIN_RELATIVE_POSITION_INDEX = "attention.self.relative_position_index"

# Parameters of one BERT layer (identical names in transformers 4.2x and 5).
_BERT_LAYER_PARAMETERS = tuple(
    f"{module}.{entry}"
    for module in (
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "attention.output.LayerNorm",
        "intermediate.dense",
        "output.dense",
        "output.LayerNorm",
    )
    for entry in ("weight", "bias")
)
_BERT_EMBEDDING_PARAMETERS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)


def _require(state_dict: dict[str, torch.Tensor], keys: list[str]) -> None:
    """Raises a `ValueError` listing the `keys` absent from `state_dict` (needed to read the architecture)."""
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"the checkpoint is missing keys needed to read its architecture: {missing}")


def _check_projection(state_dict: dict[str, torch.Tensor], key: str, input_size: int) -> int:
    """Checks that the projection `key` (a bias-free `Linear` weight) takes `input_size` features; returns its output
    size."""
    weight = state_dict[key]
    if weight.dim() != 2 or weight.shape[1] != input_size:
        raise ValueError(f"`{key}` has shape {tuple(weight.shape)}: expected (projection_dim, {input_size})")
    return weight.shape[0]


def _count_indices(state_dict: dict[str, torch.Tensor], pattern: str, start: int = 0) -> int:
    """Number of consecutive indices `n = start, start + 1, ...` such that `pattern.format(n)` is a key of
    `state_dict`."""
    count = 0
    while pattern.format(start + count) in state_dict:
        count += 1
    return count


def _resnet_config_and_keys(state_dict: dict[str, torch.Tensor]) -> tuple[ResNetConfig, int, dict[str, str]]:
    """Reads a torchvision bottleneck ResNet under `vision_model.model.`.

    Returns:
        The `ResNetConfig`, the projection size (rows of `fc.weight`) and the map original key -> converted key.
    """
    _require(state_dict, [VISION_PREFIX + "conv1.weight", VISION_PREFIX + "fc.weight"])
    stem = state_dict[VISION_PREFIX + "conv1.weight"]  # (embedding_size, num_channels, 7, 7)
    if tuple(stem.shape[2:]) != (7, 7):
        raise ValueError(f"`{VISION_PREFIX}conv1.weight` has shape {tuple(stem.shape)}: expected a 7x7 ResNet stem")
    num_stages = _count_indices(state_dict, VISION_PREFIX + "layer{}.0.conv1.weight", start=1)  # layer1, layer2, ...
    if num_stages == 0:
        raise ValueError(f"no ResNet stage found: the checkpoint has no `{VISION_PREFIX}layer1.0.conv1.weight`")
    depths, hidden_sizes = [], []
    for stage in range(1, num_stages + 1):
        depth = _count_indices(state_dict, VISION_PREFIX + f"layer{stage}.{{}}.conv1.weight")
        conv3 = VISION_PREFIX + f"layer{stage}.0.conv3.weight"
        _require(state_dict, [conv3, VISION_PREFIX + f"layer{stage}.0.conv2.weight"])
        out_channels = state_dict[conv3].shape[0]
        width = state_dict[VISION_PREFIX + f"layer{stage}.0.conv2.weight"].shape[0]
        if width * 4 != out_channels:
            raise ValueError(
                f"stage layer{stage} has bottleneck width {width} for {out_channels} output channels; transformers' "
                "ResNet needs the ResNet-50 ratio of 4"
            )
        depths.append(depth)
        hidden_sizes.append(out_channels)

    config = ResNetConfig(
        num_channels=stem.shape[1],
        embedding_size=stem.shape[0],
        hidden_sizes=hidden_sizes,
        depths=depths,
        layer_type="bottleneck",
        hidden_act="relu",
        downsample_in_first_stage=False,  # torchvision: stride 1 in layer1
        downsample_in_bottleneck=False,  # torchvision v1.5: the stride sits on the 3x3 convolution
    )

    def batch_norm(original: str, converted: str) -> dict[str, str]:
        return {f"{original}.{entry}": f"{converted}.{entry}" for entry in _BATCH_NORM_ENTRIES}

    keys = {"conv1.weight": "embedder.embedder.convolution.weight"}
    keys.update(batch_norm("bn1", "embedder.embedder.normalization"))
    in_channels = config.embedding_size
    for stage, (depth, out_channels) in enumerate(zip(depths, hidden_sizes)):
        stride = 1 if stage == 0 else 2
        for index in range(depth):
            original = f"layer{stage + 1}.{index}"
            converted = f"encoder.stages.{stage}.layers.{index}"
            for conv in range(3):
                keys[f"{original}.conv{conv + 1}.weight"] = f"{converted}.layer.{conv}.convolution.weight"
                keys.update(batch_norm(f"{original}.bn{conv + 1}", f"{converted}.layer.{conv}.normalization"))
            block_in, block_stride = (in_channels, stride) if index == 0 else (out_channels, 1)
            if block_in != out_channels or block_stride != 1:  # the rule of torchvision and transformers alike
                keys[f"{original}.downsample.0.weight"] = f"{converted}.shortcut.convolution.weight"
                keys.update(batch_norm(f"{original}.downsample.1", f"{converted}.shortcut.normalization"))
        in_channels = out_channels

    key_map = {VISION_PREFIX + original: "vision_model." + converted for original, converted in keys.items()}
    key_map[VISION_PREFIX + "fc.weight"] = "visual_projection.weight"
    return config, _check_projection(state_dict, VISION_PREFIX + "fc.weight", hidden_sizes[-1]), key_map


def _swin_config_and_keys(state_dict: dict[str, torch.Tensor]) -> tuple[SwinConfig, int, dict[str, str]]:
    """Reads a transformers 4.2x `SwinModel` under `vision_model.model.` and its `vision_model.projection_head`.

    Returns:
        The `SwinConfig`, the projection size and the map original key -> converted key.
    """
    patch_key = VISION_PREFIX + "embeddings.patch_embeddings.projection.weight"
    head_key = "vision_model.projection_head.weight"
    _require(state_dict, [patch_key, head_key])
    patch = state_dict[patch_key]  # (embed_dim, num_channels, patch_size, patch_size)
    embed_dim, num_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]

    block = VISION_PREFIX + "encoder.layers.{}.blocks.{}."
    num_stages = _count_indices(state_dict, block.format("{}", 0) + "layernorm_before.weight")
    if num_stages == 0:
        raise ValueError(f"no Swin stage found: the checkpoint has no `{block.format(0, 0)}layernorm_before.weight`")
    depths, num_heads, window_sizes = [], [], set()
    for stage in range(num_stages):
        depth = _count_indices(state_dict, block.format(stage, "{}") + "layernorm_before.weight")
        table_keys = [
            block.format(stage, index) + "attention.self.relative_position_bias_table" for index in range(depth)
        ]
        _require(state_dict, table_keys)
        heads = {state_dict[key].shape[1] for key in table_keys}
        if len(heads) != 1:
            raise ValueError(f"Swin stage {stage} has blocks with different numbers of heads: {sorted(heads)}")
        for key in table_keys:  # the table has (2 * window - 1) ** 2 rows
            side = math.isqrt(state_dict[key].shape[0])
            if side * side != state_dict[key].shape[0] or side % 2 == 0:
                raise ValueError(f"`{key}` has shape {tuple(state_dict[key].shape)}: not a square window's table")
            window_sizes.add((side + 1) // 2)
        depths.append(depth)
        num_heads.append(heads.pop())
    if len(window_sizes) != 1:
        raise ValueError(f"the Swin blocks use different window sizes {sorted(window_sizes)}; SwinConfig has one")
    window_size = window_sizes.pop()

    first_block = block.format(0, 0)
    _require(state_dict, [first_block + "intermediate.dense.weight"])
    mlp_ratio = state_dict[first_block + "intermediate.dense.weight"].shape[0] / embed_dim
    qkv_bias = first_block + "attention.self.query.bias" in state_dict

    # Swin-Tiny has no absolute position embeddings (an `embeddings.position_embeddings` key is rejected as
    # unexpected), so nothing in the checkpoint depends on the image size.
    config = SwinConfig(
        image_size=ORIGINAL_IMAGE_SIZE,
        patch_size=patch_size,
        num_channels=num_channels,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        use_absolute_embeddings=False,
    )

    keys = {
        "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
        "embeddings.norm.weight": "embeddings.norm.weight",
        "embeddings.norm.bias": "embeddings.norm.bias",
        "layernorm.weight": "layernorm.weight",
        "layernorm.bias": "layernorm.bias",
    }
    block_renames = {
        original: converted
        for original, converted in _SWIN_BLOCK_RENAMES.items()
        if qkv_bias or original not in _SWIN_QKV_BIASES
    }
    for stage, depth in enumerate(depths):
        for index in range(depth):
            prefix = f"encoder.layers.{stage}.blocks.{index}."
            keys.update({prefix + original: prefix + converted for original, converted in block_renames.items()})
        if stage < len(depths) - 1:  # patch merging between stages
            for name in ("downsample.reduction.weight", "downsample.norm.weight", "downsample.norm.bias"):
                keys[f"encoder.layers.{stage}.{name}"] = f"encoder.layers.{stage}.{name}"

    key_map = {VISION_PREFIX + original: "vision_model." + converted for original, converted in keys.items()}
    key_map[head_key] = "visual_projection.weight"
    return config, _check_projection(state_dict, head_key, config.hidden_size), key_map


def _check_swin_relative_position_indices(state_dict: dict[str, torch.Tensor], config: SwinConfig) -> list[str]:
    """Checks the `relative_position_index` buffers of a 4.2x Swin checkpoint against the index transformers 5
    recomputes from the window size, and returns their keys (to be dropped)."""
    window = config.window_size
    expected = SwinRelativePositionBias(1, (window, window)).relative_position_index.view(window**2, window**2)
    keys = []
    for stage, depth in enumerate(config.depths):
        for index in range(depth):
            key = f"{VISION_PREFIX}encoder.layers.{stage}.blocks.{index}.{_SWIN_RELATIVE_POSITION_INDEX}"
            if key in state_dict:
                if not torch.equal(state_dict[key].long(), expected):
                    raise ValueError(f"`{key}` differs from Swin's relative position index for window {window}")
                keys.append(key)
    return keys


def _bert_config_and_keys(state_dict: dict[str, torch.Tensor]) -> tuple[BertConfig, int, dict[str, str]]:
    """Reads a transformers 4.2x `BertModel` under `text_model.model.` and its `text_model.projection_head`.

    Returns:
        The `BertConfig`, the projection size and the map original key -> converted key (the pooler excluded).
    """
    words_key = TEXT_PREFIX + "embeddings.word_embeddings.weight"
    head_key = "text_model.projection_head.weight"
    layer = TEXT_PREFIX + "encoder.layer.{}."
    _require(
        state_dict,
        [
            words_key,
            head_key,
            TEXT_PREFIX + "embeddings.position_embeddings.weight",
            TEXT_PREFIX + "embeddings.token_type_embeddings.weight",
            layer.format(0) + "intermediate.dense.weight",
        ],
    )
    vocab_size, hidden_size = state_dict[words_key].shape
    if hidden_size % BERT_HEAD_SIZE != 0:
        raise ValueError(
            f"the text tower's hidden size {hidden_size} is not a multiple of BERT's head size {BERT_HEAD_SIZE}: "
            "cannot infer its number of attention heads"
        )
    num_layers = _count_indices(state_dict, layer + "attention.self.query.weight")
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // BERT_HEAD_SIZE,
        intermediate_size=state_dict[layer.format(0) + "intermediate.dense.weight"].shape[0],
        max_position_embeddings=state_dict[TEXT_PREFIX + "embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state_dict[TEXT_PREFIX + "embeddings.token_type_embeddings.weight"].shape[0],
    )
    names = list(_BERT_EMBEDDING_PARAMETERS)
    names += [f"encoder.layer.{index}.{name}" for index in range(num_layers) for name in _BERT_LAYER_PARAMETERS]
    key_map = {TEXT_PREFIX + name: "text_model." + name for name in names}
    key_map[head_key] = "text_projection.weight"
    return config, _check_projection(state_dict, head_key, hidden_size), key_map


def convert_state_dict(
    state_dict: dict[str, torch.Tensor], variant: str
) -> tuple[MedCLIPConfig, dict[str, torch.Tensor]]:
    """Converts the state dict of an original MedCLIP model.

    Args:
        state_dict: the original `MedCLIPModel.state_dict()` (`vision_model.*`, `text_model.*`, `logit_scale`).
        variant: `"resnet"` (MedCLIP-ResNet, torchvision ResNet-50) or `"swin"` (MedCLIP-ViT, Swin-Tiny).

    Returns:
        The [`MedCLIPConfig`] (sizes read from the tensor shapes, `logit_scale_init_value` from the checkpoint) and
        the state dict of a [`MedCLIPModel`] built from it.

    Raises:
        ValueError: for an unknown variant, or when keys are missing or unexpected (all of them are listed).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MedCLIP variant {variant!r}; expected one of {VARIANTS}")
    _require(state_dict, ["logit_scale"])

    if variant == "resnet":
        vision_config, vision_projection_dim, vision_keys = _resnet_config_and_keys(state_dict)
        dropped = []
    else:
        vision_config, vision_projection_dim, vision_keys = _swin_config_and_keys(state_dict)
        dropped = _check_swin_relative_position_indices(state_dict, vision_config)
    text_config, text_projection_dim, text_keys = _bert_config_and_keys(state_dict)
    if vision_projection_dim != text_projection_dim:
        raise ValueError(
            f"the vision projection gives {vision_projection_dim}-d embeddings and the text projection "
            f"{text_projection_dim}-d ones"
        )
    key_map = {**vision_keys, **text_keys, "logit_scale": "logit_scale"}
    dropped += [key for key in DROPPED_KEYS if key in state_dict]

    missing = sorted(set(key_map) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(key_map) - set(dropped))
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not match the original MedCLIP-{variant} layout: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    for key in dropped:
        logger.info("dropping `%s`: %s", key, DROPPED_KEYS.get(key, "recomputed by transformers from the window size"))

    config = MedCLIPConfig(
        vision_config=vision_config,
        text_config=text_config,
        projection_dim=vision_projection_dim,
        projection_head="linear",
        projection_bias=False,
        text_pooling="medclip",
        logit_scale_init_value=float(state_dict["logit_scale"]),
        max_logit_scale=math.exp(ORIGINAL_MAX_LOG_LOGIT_SCALE),
    )
    new_state_dict = {converted: state_dict[original] for original, converted in key_map.items()}
    return config, new_state_dict


def default_tokenizer() -> str:
    """Bio_ClinicalBERT's tokenizer: the local copy in the shared data folder when it exists, else the Hub id."""
    shared_data = Path(os.environ.get("MEDCLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    folder = shared_data / TOKENIZER_FOLDER_NAME
    return str(folder) if folder.is_dir() else BIO_CLINICALBERT_HUB_ID


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    variant: str,
    output_dir: str | os.PathLike,
    tokenizer: str | None = None,
) -> MedCLIPModel:
    """Converts an original MedCLIP `pytorch_model.bin` into a [`MedCLIPModel`] folder.

    Args:
        checkpoint_path: the original `pytorch_model.bin` (a state dict saved with `torch.save`).
        variant: `"resnet"` or `"swin"` (see [`convert_state_dict`]).
        output_dir: folder that receives `config.json`, `model.safetensors`, the model code and the processor
            ([`MedCLIPImageProcessor`] defaults, MedCLIP's preprocessing, and the tokenizer).
        tokenizer: Hub id or folder of the tokenizer to save; defaults to [`default_tokenizer`].

    Returns:
        The converted model, in evaluation mode.
    """
    state_dict = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or not all(isinstance(value, torch.Tensor) for value in state_dict.values()):
        raise ValueError(f"{checkpoint_path} does not hold a state dict (a mapping of names to tensors)")
    config, new_state_dict = convert_state_dict(state_dict, variant)

    model = MedCLIPModel(config)
    model.load_state_dict(new_state_dict, strict=True)
    model.eval()
    text_tokenizer = AutoTokenizer.from_pretrained(tokenizer or default_tokenizer())
    processor = MedCLIPProcessor(MedCLIPImageProcessor(), text_tokenizer)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert a pytorch_model.bin of the original MedCLIP release into a MedCLIPModel folder."
    )
    parser.add_argument("--checkpoint", required=True, help="the original MedCLIP pytorch_model.bin")
    parser.add_argument(
        "--variant", required=True, choices=VARIANTS, help="resnet (MedCLIP-ResNet) or swin (MedCLIP-ViT)"
    )
    parser.add_argument("--output_dir", required=True, help="folder for the converted model and processor")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help=(
            f"tokenizer to save (Hub id or folder); default: the local {TOKENIZER_FOLDER_NAME} folder when it exists, "
            f"else {BIO_CLINICALBERT_HUB_ID}"
        ),
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # report the keys that are deliberately dropped
    convert_checkpoint(args.checkpoint, args.variant, args.output_dir, args.tokenizer)


if __name__ == "__main__":
    main()
