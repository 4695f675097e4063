"""Parameter groups, the optimizer and the learning-rate schedule (`transformers.get_scheduler`)."""

import torch
from transformers import get_scheduler

from ..modeling_medclip import DualEncoderModel
from .arguments import OptimizationArguments

HEAD_PREFIXES = ("visual_projection.", "text_projection.", "logit_scale", "logit_bias")


def _no_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    return parameter.ndim < 2 or name.startswith(("logit_scale", "logit_bias")) or "norm" in name.lower()


def parameter_groups(model: DualEncoderModel, args: OptimizationArguments) -> list[dict]:
    """AdamW groups: towers / heads (own learning rates) x decay / no decay (norms, biases, logit scale and bias).

    Frozen parameters (`requires_grad=False`, e.g. ConVIRT's first text layers) are left out of the optimizer.
    """
    head_lr = args.head_learning_rate if args.head_learning_rate is not None else args.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((name.startswith(HEAD_PREFIXES), _no_decay(name, parameter)), []).append(parameter)
    return [
        {
            "params": params,
            "lr": head_lr if is_head else args.learning_rate,
            "weight_decay": 0.0 if no_decay else args.weight_decay,
            "group_name": f"{'head' if is_head else 'tower'}_{'no_decay' if no_decay else 'decay'}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: DualEncoderModel, args: OptimizationArguments) -> torch.optim.Optimizer:
    """AdamW (optionally fused) or SGD over [`parameter_groups`]."""
    groups = parameter_groups(model, args)
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    return torch.optim.AdamW(
        groups,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=args.optim == "adamw_torch_fused",
    )


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimizationArguments, num_training_steps: int):
    """`transformers.get_scheduler(lr_scheduler_type)` with `warmup_steps` over `num_training_steps`."""
    return get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=num_training_steps
    )
