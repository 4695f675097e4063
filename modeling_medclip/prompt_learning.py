"""Learned prompt context for zero-shot classes (CoOp, Zhou et al. 2022, *Learning to Prompt for Vision-Language
Models*).

Instead of hand-written prompts, every class is described by `n_ctx` learned context vectors followed by the
tokens of its name: `[start] v_1 ... v_n <class name tokens> [end]`. The vectors live in the text tower's word
embedding space and are shared by all classes; they are trained with cross-entropy on a few labelled images while
both towers (and the heads and the temperature) stay frozen, so the result is a few thousand numbers.

[`PromptContext`] holds the vectors and the class names, encodes the classes with any dual encoder and saves as
safetensors. [`train_prompt_context`] learns it from image embeddings (computed once: the vision tower is frozen).
[`ZeroShotClassifier`] accepts a `PromptContext` in place of prompts, and [`export_zero_shot_head`] then writes the
learned classes as a plain image classifier.
"""

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .modeling_medclip import DualEncoderModel

CONTEXT_FILE = "prompt_context.safetensors"
CONTEXT_FORMAT = "medclip-hf-prompt-context"


class PromptContext(nn.Module):
    r"""
    Learned context vectors shared by the prompts of every class.

    Args:
        context (`torch.Tensor` of shape `(n_ctx, hidden_size)`): the vectors, in the text tower's word embedding
            space.
        class_names (`list[str]`): the classes, in the order of the classifier's columns; each name's tokens follow
            the context.
    """

    def __init__(self, context: torch.Tensor, class_names: Sequence[str]):
        super().__init__()
        if context.dim() != 2 or context.shape[0] < 1:
            raise ValueError(f"`context` must have shape (n_ctx >= 1, hidden_size), got {tuple(context.shape)}")
        if not class_names or any(not isinstance(name, str) or not name.strip() for name in class_names):
            raise ValueError(f"`class_names` must be non-empty strings, got {class_names!r}")
        self.context = nn.Parameter(context.detach().clone())
        self.class_names = list(class_names)

    @classmethod
    def initialize(
        cls, model: DualEncoderModel, tokenizer, class_names: Sequence[str], init_text: str | None = None,
        n_ctx: int = 4, seed: int = 0,
    ) -> "PromptContext":
        """A context to train: the word embeddings of `init_text` (e.g. `"chest x-ray showing"`, so that training
        starts from that hand-written prompt), or `n_ctx` vectors drawn from N(0, 0.02^2) with `seed`."""
        embeddings = model.text_model.get_input_embeddings()
        if init_text is not None:
            ids = tokenizer(init_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if len(ids) == 0:
                raise ValueError(f"`init_text` {init_text!r} has no tokens")
            with torch.no_grad():
                context = embeddings(ids.to(embeddings.weight.device))
        else:
            generator = torch.Generator().manual_seed(seed)
            context = torch.randn(n_ctx, embeddings.embedding_dim, generator=generator) * 0.02
        return cls(context.to(embeddings.weight.device, embeddings.weight.dtype), class_names)

    @property
    def n_ctx(self) -> int:
        return self.context.shape[0]

    def class_inputs(self, model: DualEncoderModel, tokenizer) -> dict[str, torch.Tensor]:
        """Text-tower inputs of every class: `inputs_embeds` `(num_classes, L + n_ctx, hidden_size)` with the context
        inserted after the start token of `tokenizer(class_name)`, and the matching `attention_mask`."""
        tokens = tokenizer(self.class_names, padding=True, return_tensors="pt").to(self.context.device)
        words = model.text_model.get_input_embeddings()(tokens["input_ids"])  # (C, L, D)
        context = self.context.to(words.dtype).unsqueeze(0).expand(len(self.class_names), -1, -1)
        mask = tokens["attention_mask"]
        return {
            "inputs_embeds": torch.cat([words[:, :1], context, words[:, 1:]], dim=1),
            "attention_mask": torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]).expand(-1, self.n_ctx), mask[:, 1:]],
                                        dim=1),
        }

    def class_embeddings(self, model: DualEncoderModel, tokenizer) -> torch.Tensor:
        """`(num_classes, projection_dim)` L2-normalised class embeddings (differentiable in the context)."""
        features = model.get_text_features(input_ids=None, **self.class_inputs(model, tokenizer)).pooler_output
        return F.normalize(features, dim=-1)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Writes `prompt_context.safetensors` (the vectors; the class names as JSON in its metadata)."""
        path = Path(save_directory) / CONTEXT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"format": CONTEXT_FORMAT, "class_names": json.dumps(self.class_names)}
        save_file({"context": self.context.detach().cpu().contiguous()}, str(path), metadata=metadata)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PromptContext":
        """Loads what [`save_pretrained`] wrote (a folder or the file itself)."""
        path = Path(directory)
        path = path / CONTEXT_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no learned prompt context at {path}")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CONTEXT_FORMAT:
                raise ValueError(f"{path} is not a medclip-hf prompt context (metadata {metadata!r})")
            return cls(f.get_tensor("context"), json.loads(metadata["class_names"]))


def train_prompt_context(
    model: DualEncoderModel,
    tokenizer,
    context: PromptContext,
    image_embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 50,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Trains `context` in place with cross-entropy on labelled images; the model is left untouched.

    Args:
        model: the dual encoder, frozen and in eval mode for the whole run (its `requires_grad` flags are restored).
        tokenizer: its tokenizer.
        context: the [`PromptContext`] to train (e.g. from [`PromptContext.initialize`]).
        image_embeddings: `(N, projection_dim)` L2-normalised embeddings of the training images (from
            `modeling_medclip.retrieval.embed_images`).
        labels: `(N,)` class indices into `context.class_names`.
        epochs, batch_size, learning_rate, weight_decay: AdamW over shuffled mini-batches.
        seed: the shuffling seed.

    Returns:
        The mean loss of every epoch.
    """
    if image_embeddings.dim() != 2 or labels.shape != (image_embeddings.shape[0],):
        raise ValueError(
            f"`image_embeddings` must be (N, D) and `labels` (N,), got {tuple(image_embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if labels.min() < 0 or labels.max() >= len(context.class_names):
        raise ValueError(f"`labels` must be class indices in [0, {len(context.class_names)})")
    flags = [parameter.requires_grad for parameter in model.parameters()]
    was_training = model.training
    model.requires_grad_(False).eval()
    optimizer = torch.optim.AdamW([context.context], lr=learning_rate, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    logit_scale = model.get_logit_scale().detach()
    losses = []
    try:
        for _ in range(epochs):
            total = 0.0
            for batch in torch.randperm(len(labels), generator=generator).split(batch_size):
                logits = logit_scale * image_embeddings[batch] @ context.class_embeddings(model, tokenizer).T
                loss = F.cross_entropy(logits, labels[batch].to(logits.device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            losses.append(total / len(labels))
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        model.train(was_training)
    return losses


__all__ = ["CONTEXT_FILE", "PromptContext", "train_prompt_context"]
