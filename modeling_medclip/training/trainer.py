"""The training step: [`ContrastiveTrainer`] holds the prepared model, optimizer and scheduler and runs one optimizer
step on `gradient_accumulation_steps` micro-batches.

Each process encodes its shard of the batch through the (DDP-wrapped) model, the L2-normalised embeddings (and the
label vectors of the semantic loss) are gathered across processes with gradient to the local shard
([`gather_with_grad`]), and every process computes the model's own loss (`model.compute_loss`) on the logits of the
whole global batch, so every example sees the negatives of every process.

Gradient accumulation (`gradient_accumulation_steps > 1`) has two modes:

- `global_negatives` (open_clip's): the embeddings of every micro-batch are first computed without gradient; then
  each micro-batch is encoded again with gradient and substituted into the cached set, so the loss of every
  backward pass spans the whole accumulated batch. The update equals a single step on the concatenated batch (the
  dropout masks of both passes are the same: the RNG is replayed). The gradients of the logit scale and bias, which
  every one of the `K` backward passes sees in full, are divided by `K`. Costs one extra forward pass.
- `plain` (`accelerator.accumulate`): each micro-batch is its own contrastive problem and the gradients are
  averaged; cheaper, but fewer negatives.

After every optimizer step the logit scale parameter is clamped to `[0, log(max_logit_scale)]`, outside the forward
pass, as open_clip does.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from ..losses import gather_with_grad
from ..modeling_medclip import DualEncoderModel
from .arguments import OptimizationArguments
from .optim import build_optimizer, build_scheduler

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The tensors of `batch` on `device` (images channels-last when asked)."""
    moved = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if channels_last and "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].contiguous(memory_format=torch.channels_last)
    return moved
def _check_batch(batch: dict, needs_labels: bool) -> None:
    missing = [key for key in ("pixel_values", "input_ids") if key not in batch]
    if needs_labels:
        missing += [key for key in ("image_labels", "text_labels") if key not in batch]
    if missing:
        raise ValueError(f"training batch has no {missing} (keys: {sorted(batch)})")


def _embed(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised `(B_img, D)` image and `(B_txt, D)` text embeddings, through the (DDP-wrapped) model."""
    outputs = model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
    return outputs.image_embeds.float(), outputs.text_embeds.float()


def _rng_snapshot(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_restore(snapshot: tuple, device: torch.device) -> None:
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


@dataclass
class StepOutput:
    """What one optimizer step reports."""

    loss: float
    num_images: int  # images of this process in the step (all micro-batches)
    grad_norm: float | None


class ContrastiveTrainer:
    """The model, optimizer and scheduler of a run, prepared by Accelerate, and the optimizer step.

    Args:
        accelerator: an `accelerate.Accelerator` (`gradient_accumulation_steps` must be set for the `plain` mode).
        model: the (unprepared) dual encoder.
        args: the [`OptimizationArguments`].
        num_training_steps: optimizer steps of the run (for the LR schedule).
    """

    def __init__(self, accelerator: Accelerator, model: DualEncoderModel, args: OptimizationArguments, num_training_steps):
        self.accelerator = accelerator
        self.args = args
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, args)
        # The scheduler is not prepared: Accelerate would step it once per process.
        self.scheduler = build_scheduler(optimizer, args, num_training_steps)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.model.train()

    @property
    def unwrapped(self) -> DualEncoderModel:
        return self.accelerator.unwrap_model(self.model)

    def global_loss(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        image_labels: torch.Tensor | None = None,
        text_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's loss over the global batch: local `(B_img, D)` / `(B_txt, D)` embeddings gathered with
        gradient across processes, scaled by `get_logit_scale()` and passed to `compute_loss`."""
        unwrapped = self.unwrapped
        all_images = gather_with_grad(image_embeds)
        all_texts = gather_with_grad(text_embeds)
        if unwrapped.config.loss_type == "semantic":
            image_labels = gather_with_grad(image_labels.float())
            text_labels = gather_with_grad(text_labels.float())
        logits_per_image = unwrapped.get_logit_scale().float() * all_images @ all_texts.T
        return unwrapped.compute_loss(logits_per_image, logits_per_image.T, image_labels, text_labels)

    def _labels(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return batch.get("image_labels"), batch.get("text_labels")

    def _step_global_negatives(self, micro_batches: list[dict]) -> float:
        """Cache every micro-batch's embeddings without gradient, then backpropagate each through the full set."""
        device = self.accelerator.device
        cached_images, cached_texts, snapshots = [], [], []
        with torch.no_grad():
            for batch in micro_batches:
                snapshots.append(_rng_snapshot(device))
                image_embeds, text_embeds = _embed(self.model, batch)
                cached_images.append(image_embeds)
                cached_texts.append(text_embeds)
        after = _rng_snapshot(device)
        image_labels = _cat_or_none([b.get("image_labels") for b in micro_batches])
        text_labels = _cat_or_none([b.get("text_labels") for b in micro_batches])
        last = len(micro_batches) - 1
        loss = None
        for index, batch in enumerate(micro_batches):
            _rng_restore(snapshots[index], device)  # the same dropout masks as the cached pass
            with self.accelerator.no_sync(self.model) if index < last else nullcontext():
                image_embeds, text_embeds = _embed(self.model, batch)
                images = torch.cat([*cached_images[:index], image_embeds, *cached_images[index + 1 :]])
                texts = torch.cat([*cached_texts[:index], text_embeds, *cached_texts[index + 1 :]])
                loss = self.global_loss(images, texts, image_labels, text_labels)
                self.accelerator.backward(loss)
        _rng_restore(after, device)
        if last > 0:  # every backward pass saw the whole loss's dependence on the logit scale / bias
            for parameter in (self.unwrapped.logit_scale, self.unwrapped.logit_bias):
                if parameter is not None and parameter.grad is not None:
                    parameter.grad.div_(len(micro_batches))
        return loss.item()

    def _step_plain(self, micro_batches: list[dict]) -> float:
        losses = []
        for batch in micro_batches:
            with self.accelerator.accumulate(self.model):
                image_embeds, text_embeds = _embed(self.model, batch)
                loss = self.global_loss(image_embeds, text_embeds, *self._labels(batch))
                self.accelerator.backward(loss)  # divided by gradient_accumulation_steps by Accelerate
                losses.append(loss.item())
        return sum(losses) / len(losses)

    def training_step(self, micro_batches: list[dict]) -> StepOutput:
        """One optimizer step on `gradient_accumulation_steps` micro-batches of this process.

        Each micro-batch holds `pixel_values (B_img, C, H, W)`, `input_ids` / `attention_mask (B_txt, L)` and, for
        the semantic loss, `image_labels (B_img, C)` / `text_labels (B_txt, C)`.

        Returns:
            [`StepOutput`] with the loss of the global batch (the mean over micro-batches in `plain` mode).
        """
        if len(micro_batches) != self.args.gradient_accumulation_steps:
            raise ValueError(
                f"training_step got {len(micro_batches)} micro-batches, expected "
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps}"
            )
        needs_labels = self.unwrapped.config.loss_type == "semantic"
        for batch in micro_batches:
            _check_batch(batch, needs_labels)
        device = self.accelerator.device
        micro_batches = [to_device(batch, device, self.args.channels_last) for batch in micro_batches]
        if self.args.accumulation_mode == "plain" or len(micro_batches) == 1:
            loss = self._step_plain(micro_batches)
        else:
            loss = self._step_global_negatives(micro_batches)
        grad_norm = None
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm))
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule where it was
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.clamp_logit_scale()
        return StepOutput(loss=loss, num_images=sum(len(b["pixel_values"]) for b in micro_batches), grad_norm=grad_norm)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamps the logit scale parameter to `[0, log(max_logit_scale)]` (open_clip's post-step clamp)."""
        unwrapped = self.unwrapped
        unwrapped.logit_scale.clamp_(0.0, math.log(unwrapped.config.max_logit_scale))


def _cat_or_none(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors)
