"""Adapters that turn any transformers vision / text model into a tower of a dual encoder.

Vision towers disagree on what they return: ResNet and ConvNeXt pool to `(B, C, 1, 1)` or `(B, C)`, Swin and ViT to
`(B, D)`, some models only give `last_hidden_state` as a feature map `(B, C, H, W)` or a token sequence `(B, L, D)`.
[`pool_vision_output`] maps all of them to one `(B, D)` vector per image, and [`vision_output_size`] reads `D` from
the config. Text towers give token states; [`pool_text_output`] implements the poolings of ConVIRT and MedCLIP.
"""

import contextlib
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedConfig


def vision_output_size(vision_config: PreTrainedConfig) -> int:
    """Size `D` of the pooled output of a vision tower built from `vision_config`."""
    hidden_sizes = getattr(vision_config, "hidden_sizes", None)
    if hidden_sizes:  # ResNet, ConvNeXt, RegNet, ...: the channels of the last stage
        return int(hidden_sizes[-1])
    hidden_size = getattr(vision_config, "hidden_size", None)
    if hidden_size:  # ViT, Swin (its config sets hidden_size to the last stage's width), DeiT, BEiT, ...
        return int(hidden_size)
    raise ValueError(
        f"cannot tell the output size of vision tower `{vision_config.model_type}`: its config has neither "
        "`hidden_sizes` nor `hidden_size`"
    )


def pool_vision_output(outputs) -> torch.Tensor:
    """One vector per image from a vision tower's output.

    Args:
        outputs: the tower's `ModelOutput`. Its `pooler_output` is used when present, shaped `(B, D)` or
            `(B, D, 1, 1)`; otherwise `last_hidden_state` is averaged: over the spatial grid when it is a feature map
            `(B, D, H, W)`, over the tokens when it is a sequence `(B, L, D)`.

    Returns:
        `(B, D)` pooled features.
    """
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        pooled = outputs.last_hidden_state
    if pooled.dim() == 4:
        return pooled.mean(dim=(2, 3))
    if pooled.dim() == 3:
        return pooled.mean(dim=1)
    return pooled


def match_channels(pixel_values: torch.Tensor, num_channels: int) -> torch.Tensor:
    """Adapts `(B, C, H, W)` images to the `num_channels` a tower expects.

    One-channel X-rays are repeated to three channels (as MedCLIP does) and three-channel images are averaged to one.
    """
    if pixel_values.dim() != 4:
        raise ValueError(f"`pixel_values` must have shape (B, C, H, W), got {tuple(pixel_values.shape)}")
    channels = pixel_values.shape[1]
    if channels == num_channels:
        return pixel_values
    if channels == 1:
        return pixel_values.expand(-1, num_channels, -1, -1)
    if num_channels == 1 and channels == 3:
        return pixel_values.mean(dim=1, keepdim=True)
    raise ValueError(f"`pixel_values` has {channels} channels; the vision tower expects {num_channels} (or 1)")


def pool_text_output(outputs, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """One vector per text from a text tower's output.

    Args:
        outputs: the tower's `ModelOutput`; `hidden_states` (all layers) is needed for `"medclip"`.
        attention_mask: `(B, L)` with 1 on real tokens; `None` means no padding.
        pooling: `"cls"` (first token), `"mean"` / `"max"` (over real tokens only), or `"medclip"` (hidden states 1,
            2 and last, each averaged over all `L` positions, padding included, then averaged over the three layers:
            the released MedCLIP code, kept unmasked on purpose so its weights give identical embeddings).

    Returns:
        `(B, D)` pooled features.
    """
    if pooling == "medclip":
        hidden_states = outputs.hidden_states
        if hidden_states is None or len(hidden_states) < 3:
            raise ValueError("`medclip` pooling needs the hidden states of at least two layers")
        layers = torch.stack([hidden_states[1], hidden_states[2], hidden_states[-1]], dim=1)  # (B, 3, L, D)
        return layers.mean(dim=2).mean(dim=1)
    tokens = outputs.last_hidden_state  # (B, L, D)
    if pooling == "cls":
        return tokens[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
    if pooling == "mean":
        return (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    if pooling == "max":
        return tokens.masked_fill(mask == 0, torch.finfo(tokens.dtype).min).amax(dim=1)
    raise ValueError(f"unknown text pooling {pooling!r}; expected one of 'cls', 'mean', 'max', 'medclip'")


def build_projection_head(
    input_dim: int, output_dim: int, kind: str, hidden_dim: int | None = None, bias: bool = False
) -> nn.Module:
    """The projection head of a tower: `"linear"` (MedCLIP, CLIP) or `"mlp"` = Linear -> ReLU -> Linear (ConVIRT)."""
    if kind == "linear":
        return nn.Linear(input_dim, output_dim, bias=bias)
    if kind == "mlp":
        hidden_dim = hidden_dim or input_dim
        return nn.Sequential(
            nn.Linear(input_dim, hidden_dim, bias=bias), nn.ReLU(), nn.Linear(hidden_dim, output_dim, bias=bias)
        )
    raise ValueError(f"unknown projection head {kind!r}; expected 'linear' or 'mlp'")


@contextlib.contextmanager
def _frozen_batch_norm_statistics(block: nn.Module):
    """Lets the batch norms of `block` normalise with batch statistics without updating their running statistics.

    The backward pass of a checkpointed block runs its forward a second time; without this, every batch norm would
    fold the same batch into its running mean and variance twice.
    """
    norms = [module for module in block.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [(norm.momentum, None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone())
             for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if tracked is not None:
                norm.num_batches_tracked.copy_(tracked)


def _checkpointed_forward(self, *args, **kwargs):
    """`forward` of a block made checkpointable by [`add_block_checkpointing`] (bound to the block)."""
    forward = type(self).forward
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return checkpoint(
            forward,
            self,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _frozen_batch_norm_statistics(self)),
            **kwargs,
        )
    return forward(self, *args, **kwargs)


def add_block_checkpointing(tower: nn.Module) -> None:
    """Makes the repeated blocks of a tower without native activation checkpointing (ResNet, ...) checkpointable.

    Every child of every `nn.ModuleList` of the tower (ResNet: its stages) gets the `gradient_checkpointing` flag that
    transformers' `activation_checkpointing_enable()` / `_disable()` switch, so the dual encoder checkpoints these
    blocks like the layers of its text tower (always non-reentrant; batch-norm running statistics are updated once per
    step, not again by the recomputation). Parameter names and the state dict are unchanged. Towers that already
    support checkpointing (BERT, Swin, ViT, ...) are left alone.
    """
    if any(hasattr(module, "gradient_checkpointing") for module in tower.modules()):
        return
    for module_list in [module for module in tower.modules() if isinstance(module, nn.ModuleList)]:
        for block in module_list:
            block.gradient_checkpointing = False
            block.forward = types.MethodType(_checkpointed_forward, block)


def freeze_text_layers(text_model: nn.Module, num_layers: int) -> None:
    """Freezes the embeddings and the first `num_layers` encoder layers of a BERT-like text tower (ConVIRT: 6)."""
    if num_layers <= 0:
        return
    embeddings = getattr(text_model, "embeddings", None)
    layers = getattr(getattr(text_model, "encoder", None), "layer", None)
    if embeddings is None or layers is None:
        raise ValueError(
            f"cannot freeze layers of text tower {type(text_model).__name__}: it has no `embeddings` and "
            "`encoder.layer` (a BERT-like layout)"
        )
    if num_layers > len(layers):
        raise ValueError(f"cannot freeze {num_layers} layers: the text tower has {len(layers)}")
    for module in [embeddings, *layers[:num_layers]]:
        module.requires_grad_(False)


__all__ = [
    "add_block_checkpointing",
    "build_projection_head",
    "freeze_text_layers",
    "match_channels",
    "pool_text_output",
    "pool_vision_output",
    "vision_output_size",
]
