"""Parameter-efficient adaptation of ConVIRT / MedCLIP models through `peft`: LoRA, DoRA and IA3 on either tower.

[`build_peft_config`] picks the modules to adapt from the tower types (the table below; any `target_modules` given
overrides it) and returns a plain `peft` config; [`apply_adapters`] wraps a model with `peft.get_peft_model` and keeps
its frozen batch norms in eval mode. The result is an ordinary `PeftModel`: `save_pretrained` writes only the
adapter, `PeftModel.from_pretrained(base, path_or_repo)` and transformers' `base.load_adapter(path_or_repo)` load
it back, and `merge_and_unload()` gives a plain model whose `save_pretrained` folder the stock pipelines serve.

Default modules per tower type (names relative to the tower, matched as regular expressions):

| tower                      | LoRA / DoRA                                          | IA3 (feed-forward: input scaled)   |
|----------------------------|------------------------------------------------------|------------------------------------|
| BERT, RoBERTa, XLM-RoBERTa | attention query / key / value / output, MLP (both)   | key, value, MLP output (ff)        |
| Swin, ViT                  | attention q / k / v / o projections, MLP fc1 / fc2   | k, v projections, MLP fc2 (ff)     |
| ResNet                     | every convolution of the residual blocks             | the same convolutions              |

The ResNet stem and shortcut convolutions are left out, as are all normalisation layers.

Batch norm: a ResNet tower normalises with batch statistics in train mode and updates its running mean and
variance, which belong to the frozen base model and are not part of the adapter; an adapter trained that way gives
other outputs once reloaded onto the original base. [`keep_frozen_batch_norms_in_eval`] (applied by
[`apply_adapters`]) makes every batch norm without trainable parameters stay in eval mode, so training changes only
the adapter.

[`adapter_model_card`] writes the card of an adapter repo (its base model and evaluation results as `model-index`);
[`push_adapter_to_hub`] uploads the adapter with that card.
"""

import math
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from peft import IA3Config, LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from .modeling_medclip import DualEncoderForImageClassification, DualEncoderModel

METHODS = ("lora", "dora", "ia3")
TOWERS = ("vision", "text")
_TOWER_PREFIXES = {"vision": "vision_model", "text": "text_model"}
_PROJECTIONS = {"vision": "visual_projection", "text": "text_projection"}


@dataclass(frozen=True)
class TowerTargets:
    """Regular expressions over module names inside one tower type.

    Args:
        lora: the modules LoRA and DoRA adapt.
        ia3: the modules IA3 rescales.
        ia3_feedforward: the part of `ia3` whose input (not output) IA3 rescales; `None` for none.
    """

    lora: str
    ia3: str
    ia3_feedforward: str | None = None


_BERT_LIKE = TowerTargets(
    lora=r"attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|layer\.\d+\.output\.dense",
    ia3=r"attention\.self\.(key|value)|layer\.\d+\.output\.dense",
    ia3_feedforward=r"layer\.\d+\.output\.dense",
)
_VIT_LIKE = TowerTargets(
    lora=r"attention\.(q|k|v|o)_proj|mlp\.fc(1|2)", ia3=r"attention\.(k|v)_proj|mlp\.fc2", ia3_feedforward=r"mlp\.fc2"
)
_RESNET = TowerTargets(lora=r"layers\.\d+\.layer\.\d+\.convolution", ia3=r"layers\.\d+\.layer\.\d+\.convolution")

DEFAULT_TARGETS: dict[str, TowerTargets] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "swin": _VIT_LIKE,
    "vit": _VIT_LIKE,
    "resnet": _RESNET,
}


def _check_towers(model: nn.Module, towers: Sequence[str]) -> tuple[str, ...]:
    towers = (towers,) if isinstance(towers, str) else tuple(towers)
    if not towers or any(tower not in TOWERS for tower in towers):
        raise ValueError(f"`towers` must be a non-empty subset of {TOWERS}, got {towers!r}")
    if isinstance(model, DualEncoderForImageClassification) and "text" in towers:
        raise ValueError("an image classifier has no text tower: use towers=('vision',)")
    return towers


def _tower_pattern(model: nn.Module, tower: str, method: str) -> str:
    tower_config = getattr(model.config, f"{tower}_config")
    targets = DEFAULT_TARGETS.get(tower_config.model_type)
    if targets is None:
        raise ValueError(
            f"no default adapter modules for {tower} tower type `{tower_config.model_type}` (known: "
            f"{sorted(DEFAULT_TARGETS)}): pass `target_modules`"
        )
    fragment = targets.ia3 if method == "ia3" else targets.lora
    return rf"{_TOWER_PREFIXES[tower]}\.(.*\.)?({fragment})"


def default_target_modules(model: nn.Module, towers: Sequence[str] = TOWERS, method: str = "lora") -> str:
    """The default `target_modules` of `method` on `towers` of `model`: one regular expression over full module
    names (peft matches a string with `re.fullmatch`)."""
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {METHODS}")
    return "|".join(f"({_tower_pattern(model, tower, method)})" for tower in _check_towers(model, towers))


def _ia3_feedforward_modules(model: nn.Module, towers: Sequence[str]) -> str | list[str]:
    patterns = []
    for tower in towers:
        feedforward = DEFAULT_TARGETS[getattr(model.config, f"{tower}_config").model_type].ia3_feedforward
        if feedforward is not None:
            patterns.append(rf"({_TOWER_PREFIXES[tower]}\.(.*\.)?({feedforward}))")
    return "|".join(patterns) or []  # peft takes an empty list as "none of them"


def _modules_to_save(model: nn.Module, towers: Sequence[str], train_heads: bool) -> list[str] | None:
    """The projection heads of `towers` when `train_heads`; an image classifier's head always (it is new)."""
    modules = []
    if train_heads:
        modules += [_PROJECTIONS[tower] for tower in towers if getattr(model, _PROJECTIONS[tower], None) is not None]
    if isinstance(model, DualEncoderForImageClassification):
        modules.append("classifier")
    return modules or None


def build_peft_config(
    model: DualEncoderModel | DualEncoderForImageClassification,
    method: str = "lora",
    towers: Sequence[str] = TOWERS,
    r: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    target_modules: str | Sequence[str] | None = None,
    train_heads: bool = False,
    **kwargs,
) -> PeftConfig:
    """A `peft` config adapting `towers` of `model` with `method`.

    Args:
        model: a [`ConVIRTModel`] / [`MedCLIPModel`], or a `...ForImageClassification` (vision tower only; its
            classification head is always trained and saved with the adapter).
        method: `"lora"`, `"dora"` (LoRA with weight decomposition, `use_dora=True`) or `"ia3"`.
        towers: `("vision",)`, `("text",)` or both.
        r, lora_alpha, lora_dropout: LoRA / DoRA rank, scaling (default `2 * r`) and dropout; unused by IA3.
        target_modules: overrides the defaults of the module docstring: module name suffixes or one regular
            expression, as `peft` takes them. For IA3 with overridden targets no module is feed-forward unless
            `feedforward_modules` is passed in `kwargs`.
        train_heads: also train (and save with the adapter) the projection heads of `towers`. The logit scale is a
            bare parameter, which `peft` cannot save, so it stays as in the base model.
        kwargs: any other argument of `LoraConfig` / `IA3Config`.

    Returns:
        A `LoraConfig` or `IA3Config`, ready for `get_peft_model` or [`apply_adapters`].
    """
    if method not in METHODS:
        raise ValueError(f"unknown adapter method {method!r}; expected one of {METHODS}")
    towers = _check_towers(model, towers)
    modules_to_save = _modules_to_save(model, towers, train_heads)
    if method == "ia3":
        if target_modules is None:
            kwargs.setdefault("feedforward_modules", _ia3_feedforward_modules(model, towers))
        return IA3Config(
            target_modules=target_modules or default_target_modules(model, towers, method),
            modules_to_save=modules_to_save,
            **kwargs,
        )
    return LoraConfig(
        r=r,
        lora_alpha=2 * r if lora_alpha is None else lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules or default_target_modules(model, towers, method),
        use_dora=method == "dora",
        modules_to_save=modules_to_save,
        **kwargs,
    )


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train` of a frozen batch norm (bound by [`keep_frozen_batch_norms_in_eval`]): always eval mode."""
    return nn.Module.train(self, False)


def keep_frozen_batch_norms_in_eval(model: nn.Module) -> list[str]:
    """Makes every batch norm of `model` without trainable parameters ignore `model.train()`.

    Such a layer normalises with its stored running statistics in training too and never updates them, so training
    an adapter leaves the frozen base model exactly as it was. Call it after freezing (as [`apply_adapters`] does).

    Returns:
        The names of the batch norms now kept in eval mode.
    """
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            parameter.requires_grad for parameter in module.parameters()
        ):
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
            names.append(name)
    return names


def apply_adapters(
    model: DualEncoderModel | DualEncoderForImageClassification, config: PeftConfig | None = None, **kwargs
) -> PeftModel:
    """Wraps `model` with adapters: `peft.get_peft_model(model, config)`, then
    [`keep_frozen_batch_norms_in_eval`].

    Args:
        model: the base model (its weights are frozen; only the adapter and `modules_to_save` train).
        config: a `peft` config; built by [`build_peft_config`]`(model, **kwargs)` when omitted.

    Example:

    ```python
    >>> peft_model = apply_adapters(model, method="lora", towers=("vision",), r=4)
    >>> peft_model.print_trainable_parameters()
    ```"""
    if config is None:
        config = build_peft_config(model, **kwargs)
    elif kwargs:
        raise ValueError(f"pass either a peft `config` or arguments of build_peft_config, not both: {sorted(kwargs)}")
    peft_model = get_peft_model(model, config)
    keep_frozen_batch_norms_in_eval(peft_model)
    return peft_model


def adapter_model_card(
    base_model: str,
    eval_results: dict[str, dict[str, float]],
    *,
    task_type: str = "image-classification",
    model_name: str | None = None,
    description: str = "",
) -> ModelCard:
    """The model card of an adapter repo: `base_model` and the evaluation results as `model-index` metadata.

    Args:
        base_model: the Hub id (or folder) of the model the adapter applies to.
        eval_results: `{dataset name: {metric name: value}}` measured with the adapter; non-finite values are left
            out.
        task_type: the Hub task of the results (`"image-classification"`, `"zero-shot-image-classification"`).
        model_name: the name in the card (defaults to "<base_model> adapter").
        description: a paragraph on how the adapter was trained.
    """
    model_name = model_name or f"{base_model} adapter"
    entries = [
        EvalResult(
            task_type=task_type,
            dataset_type=re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-"),
            dataset_name=dataset,
            metric_type=name,
            metric_value=float(value),
        )
        for dataset, values in eval_results.items()
        for name, value in values.items()
        if math.isfinite(value)
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        tags=["medclip-hf", "peft", "medical-imaging"],
        model_name=model_name,
        eval_results=entries or None,
    )
    rows = "\n".join(f"| {entry.dataset_name} | {entry.metric_type} | {entry.metric_value:.4f} |" for entry in entries)
    results = f"## Evaluation\n\n| data | metric | value |\n|---|---|---:|\n{rows}\n\n" if entries else ""
    content = (
        f"---\n{card_data.to_yaml()}\n---\n\n# {model_name}\n\n"
        f"An adapter for `{base_model}`, trained with medclip-hf and `peft`. {description}\n\n{results}"
        "## Usage\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModel\n\n"
        f'base = AutoModel.from_pretrained("{base_model}", trust_remote_code=True)\n'
        'model = PeftModel.from_pretrained(base, "<this repo>")\n```\n'
    )
    return ModelCard(content)


def push_adapter_to_hub(
    model: PeftModel, repo_id: str, card: ModelCard, *, private: bool | None = None, revision: str | None = None
) -> str:
    """Uploads the adapter of `model` (only its weights and config) and `card` as the repo's README.

    Returns:
        The URL of the card's commit.
    """
    model.push_to_hub(repo_id, private=private, revision=revision)
    return card.push_to_hub(repo_id, revision=revision)


__all__ = [
    "DEFAULT_TARGETS",
    "METHODS",
    "TOWERS",
    "TowerTargets",
    "adapter_model_card",
    "apply_adapters",
    "build_peft_config",
    "default_target_modules",
    "keep_frozen_batch_norms_in_eval",
    "push_adapter_to_hub",
]
