"""The arguments of a pretraining run (three dataclasses) and their parsing: defaults < preset < config file < flags."""

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

from dataset_scripts.registry import builders_help
from dataset_scripts.sources import sources_help
from dataset_scripts.tasks import expand_tasks, tasks_help

from .presets import DEFAULT_PRESET, PRESETS


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
    normalize_label_vectors: bool | None = field(
        default=None,
        metadata={"help": "Semantic loss: L2-normalise the label vectors before their similarity (MedCLIP: no; with "
                  "binary vectors and scale 1 its targets are nearly uniform, normalised vectors at scale ~10 train)."},
    )
    image_size: int = field(default=224, metadata={"help": "Side of the square training and evaluation images."})
    max_length: int = field(default=77, metadata={"help": "Texts are truncated to this many tokens."})
    peft: Literal["lora", "dora", "ia3"] | None = field(
        default=None,
        metadata={"help": "Train adapters through peft instead of the whole model (continued pretraining of "
                  "--model_name_or_path on a new corpus): checkpoints and final/ hold only the adapter."},
    )
    peft_rank: int = field(default=8, metadata={"help": "LoRA / DoRA rank of --peft."})
    peft_towers: list[str] = field(
        default_factory=lambda: ["vision", "text"], metadata={"help": "The towers --peft adapts: vision, text or both."}
    )
    peft_train_heads: bool = field(
        default=False, metadata={"help": "With --peft, also train (and save with the adapter) the projection heads."}
    )


@dataclass
class DataArguments:
    """Where the training images and texts come from, how batches are formed, and what validation evaluates."""

    image_dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Training image sources (and their reports, for paired batches); required unless the preset "
                  "names them. " + sources_help()
                  + " Builders: " + builders_help() + "."},
    )
    image_dataset_weights: list[float] | None = field(
        default=None,
        metadata={"help": "Sampling weight of each image source (interleaved, every source seen once per epoch). "
                  "Default: the sources are concatenated, each image once per epoch."},
    )
    text_dataset: list[str] = field(
        default_factory=list,
        metadata={"help": "Text sources of decoupled batches (NAME=PATH, NAME or hub:org/name, as --image_dataset): "
                  "their report sentences, each labelled by the CheXpert labeler. Paired batches use the image "
                  "sources' own reports instead."},
    )
    text_dataset_weights: list[float] | None = field(
        default=None, metadata={"help": "Sampling weight of each text source. Default: concatenated."}
    )
    eval_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "Evaluation tasks validated before training, every --eval_steps and at the end (zero-shot "
                  "and retrieval on their held-out patients; training leaves those patients out of sources of the "
                  "same corpus): NAME or NAME=PATH. Tasks: " + tasks_help() + "."},
    )
    batching: Literal["paired", "decoupled"] | None = field(
        default=None,
        metadata={"help": "`paired` (ConVIRT: each image with a sentence of its own report) or `decoupled` (MedCLIP: "
                  "unrelated image and text batches). Default: decoupled for the semantic loss, else paired."},
    )
    text_sampling: Literal["uniform", "label_matched"] = field(
        default="uniform",
        metadata={"help": "Texts of decoupled batches: `uniform` (the text stream in order: most report sentences are "
                  "normal) or `label_matched` (drawn in proportion to the image batch's labels, see "
                  "dataset_scripts.pairing)."},
    )
    per_device_text_batch_size: int | None = field(
        default=None, metadata={"help": "Texts per decoupled batch. Default: --per_device_train_batch_size."}
    )
    augmentation: Literal["medclip", "convirt", "none"] | None = field(
        default=None, metadata={"help": "Image augmentation. Default: the model type's recipe."}
    )
    eval_split_size: float = field(
        default=0.2, metadata={"help": "Fraction of each evaluation corpus's patients held out."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient-disjoint held-out split (not --seed)."})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Compute the validation loss on at most this many held-out pairs."}
    )
    bootstrap_resamples: int = field(
        default=1000,
        metadata={"help": "Patient-bootstrap resamples of the 95%% confidence intervals of the tasks' headline "
                  "zero-shot and retrieval numbers (seeded by --split_seed; 0: no intervals)."},
    )
    max_eval_images: int | None = field(
        default=None, metadata={"help": "Evaluate each task on at most this many held-out images (seeded subset)."}
    )
    prompts_per_class: int = field(default=10, metadata={"help": "Zero-shot prompts drawn per class."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the prompt draw."})
    shuffle_buffer_size: int = field(default=256, metadata={"help": "Examples in the streaming shuffle buffer."})
    uncertain: Literal["positive", "negative", "ignore"] = field(
        default="positive",
        metadata={
            "help": "How uncertain findings enter label vectors (labeler and corpora): 1 (positive), 0 (negative) "
            "or NaN (ignore: the semantic matching loss masks the pairs that depend on them)."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})

    def __post_init__(self):
        for name in ("image_dataset", "text_dataset"):
            weights = getattr(self, f"{name}_weights")
            if weights and len(weights) != len(getattr(self, name)):
                raise ValueError(f"--{name}_weights has {len(weights)} weights for {len(getattr(self, name))} sources")


@dataclass
class OptimizationArguments:
    """The optimisation, logging, checkpointing and Hub settings (transformers' names where they exist)."""

    output_dir: str = field(default="outputs/medclip-pretrain", metadata={"help": "Where checkpoints and outputs go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty output_dir, deleting the checkpoints, best/ and final/ folders and "
                  "metrics of the run that was there (without it, a non-empty output_dir is refused)."},
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
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = field(
        default="cosine",
        metadata={"help": "Learning-rate schedule of transformers.get_scheduler (after --warmup_steps of linear "
                  "warmup; `constant` has no warmup, `constant_with_warmup` does)."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (<= 0: no clipping)."})
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None,
        metadata={"help": "Autocast precision through Accelerate. Default: what `accelerate launch "
                  "--mixed_precision` or the Accelerate config chose (else no autocast)."},
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
    metric_for_best_model: str | None = field(
        default=None,
        metadata={"help": "Validation metric that picks the model kept in output_dir/best, e.g. eval_loss or "
                  "eval_<task>/zero_shot_macro_auc. Default: eval_loss when validation has held-out pairs, else "
                  "the first evaluation task's zero_shot_macro_auc."},
    )
    greater_is_better: bool | None = field(
        default=None, metadata={"help": "Whether a larger metric is better. Default: False for *loss, else True."}
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
    hub_token: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "Hub token (default: HF_TOKEN / the saved one). Used only for Hub calls: never written to "
                  "training_args.json, checkpoints, logs or the trackers' config."},
    )
    hub_upload_timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds the end of the run waits, in total, for uploads still running. What is not on the "
                  "Hub by then stays listed in output_dir/hub_uploads.json and is uploaded by the next run into that "
                  "folder (e.g. --resume_from_checkpoint latest)."},
    )
    ignore_settings_mismatch: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint written with other settings (refused by default; see "
                  "RESUMABLE_CHANGES for the settings a resumed run may change)."},
    )

    def __post_init__(self):
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")


@dataclass
class PretrainArguments:
    """All the arguments of a run: what [`train`] takes."""

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: OptimizationArguments = field(default_factory=OptimizationArguments)


ARGUMENT_CLASSES = (ModelArguments, DataArguments, OptimizationArguments)
SECRET_ARGUMENTS = ("hub_token",)
RESUMABLE_CHANGES = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ignore_settings_mismatch", "max_steps",
    "num_train_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to", "disable_tqdm",
    "push_to_hub", "hub_model_id", "hub_revision", "hub_private_repo", "hub_token", "hub_upload_timeout",
    "metric_for_best_model", "greater_is_better", "per_device_eval_batch_size", "max_eval_samples", "max_eval_images",
    "prompts_per_class", "prompt_seed",
)  # fmt: skip
"""Settings a resumed run may change (where it stops, what it logs and evaluates, where it uploads); any other
change makes `--resume_from_checkpoint` refuse the checkpoint unless `--ignore_settings_mismatch`."""
PAIRED_LOSSES = ("infonce", "convirt", "sigmoid")


def public_arguments(args: PretrainArguments) -> dict[str, Any]:
    """All arguments as JSON-able nested dicts (`training_args.json`), without secrets (the Hub token)."""
    arguments = json.loads(json.dumps(asdict(args), default=str))
    for group in arguments.values():
        for name in SECRET_ARGUMENTS:
            group.pop(name, None)
    return arguments


def run_settings(args: PretrainArguments) -> dict[str, Any]:
    """The settings that decide a run's trajectory (all but `RESUMABLE_CHANGES`), flat: what checkpoints record."""
    return {
        name: value
        for group in public_arguments(args).values()
        for name, value in group.items()
        if name not in RESUMABLE_CHANGES
    }


def argument_problems(args: PretrainArguments) -> list[str]:
    """Every argument value that makes no sense, one message each (empty when all are fine)."""
    model, data, training = args.model, args.data, args.training
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    loss = model.loss_type or {"convirt": "convirt", "medclip": "semantic"}[model.model_type]
    check(data.batching != "decoupled" or loss not in PAIRED_LOSSES,
          f"--batching decoupled pairs unrelated images and texts, but --loss_type {loss} trains each image with "
          "its own text as the positive: use --batching paired or --loss_type semantic")
    for name, value in (("learning_rate", training.learning_rate), ("head_learning_rate", training.head_learning_rate),
                        ("label_similarity_scale", model.label_similarity_scale),
                        ("num_train_epochs", training.num_train_epochs if training.max_steps <= 0 else None),
                        ("hub_upload_timeout", training.hub_upload_timeout)):  # fmt: skip
        check(value is None or value > 0, f"--{name} must be > 0, got {value}")
    for name, value in (("weight_decay", training.weight_decay), ("warmup_steps", training.warmup_steps),
                        ("save_steps", training.save_steps), ("eval_steps", training.eval_steps),
                        ("save_total_limit", training.save_total_limit), ("adam_epsilon", training.adam_epsilon),
                        ("dataloader_num_workers", data.dataloader_num_workers),
                        ("num_frozen_text_layers", model.num_frozen_text_layers)):  # fmt: skip
        check(value is None or value >= 0, f"--{name} must be >= 0, got {value}")
    for name, value in (("logging_steps", training.logging_steps), ("image_size", model.image_size),
                        ("max_length", model.max_length), ("projection_dim", model.projection_dim),
                        ("per_device_train_batch_size", training.per_device_train_batch_size),
                        ("per_device_eval_batch_size", training.per_device_eval_batch_size),
                        ("per_device_text_batch_size", data.per_device_text_batch_size),
                        ("shuffle_buffer_size", data.shuffle_buffer_size),
                        ("prompts_per_class", data.prompts_per_class), ("max_eval_samples", data.max_eval_samples),
                        ("max_eval_images", data.max_eval_images)):  # fmt: skip
        check(value is None or value >= 1, f"--{name} must be >= 1, got {value}")
    for name, value in (("adam_beta1", training.adam_beta1), ("adam_beta2", training.adam_beta2)):
        check(0 <= value < 1, f"--{name} must be in [0, 1), got {value}")
    check(0 < data.eval_split_size < 1, f"--eval_split_size must be in (0, 1), got {data.eval_split_size}")
    metric = training.metric_for_best_model
    if metric is not None:
        try:
            tasks = {task.name for task, _ in expand_tasks(data.eval_tasks)}
        except ValueError as error:
            problems.append(f"--eval_tasks: {error}")
            tasks = set()
        task = metric.removeprefix("eval_").split("/", 1)[0] if "/" in metric else None
        check(metric.startswith("eval_") and (task is None or task in tasks),
              f"--metric_for_best_model {metric} is not a validation metric: expected eval_loss, "
              "eval_i2t_recall@1/5, eval_t2i_recall@1/5 or eval_<task>/<metric> of an --eval_tasks task "
              f"({', '.join(sorted(tasks)) or 'none given'})")
    return problems


def check_arguments(args: PretrainArguments, more_problems: list[str] = ()) -> None:
    """Raise one `ValueError` naming every bad argument (see [`argument_problems`]) and `more_problems`."""
    problems = [*argument_problems(args), *more_problems]
    if problems:
        raise ValueError(f"{len(problems)} bad argument(s):\n" + "\n".join(f"  - {problem}" for problem in problems))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default once: not when it is None or the help already says what the default is."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def read_config_file(path: str) -> dict[str, Any]:
    """The arguments of a JSON or YAML file, as a mapping."""
    text = Path(path).read_text()
    if path.endswith((".yaml", ".yml")):
        content = yaml.safe_load(text) or {}
    elif path.endswith(".json"):
        content = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end with .json, .yaml or .yml")
    if not isinstance(content, dict):
        raise ValueError(f"config file {path} must hold a mapping of argument names to values")
    return content


def _check_keys(values: dict[str, Any], source: str) -> None:
    known = {f.name for cls in ARGUMENT_CLASSES for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown argument(s) {unknown}")


def build_parser() -> HfArgumentParser:
    """The `run_pretrain.py` parser: every dataclass field, plus `--preset` and `--config`."""
    parser = HfArgumentParser(
        ARGUMENT_CLASSES,
        description="Contrastive pretraining of ConVIRT / MedCLIP. Defaults < --preset < --config file < flags.",
        formatter_class=HelpFormatter,
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
    file_values = read_config_file(known.config) if known.config else {}
    preset = known.preset or file_values.pop("preset", None) or DEFAULT_PRESET
    file_values.pop("preset", None)
    preset_values = {} if preset == "none" else dict(PRESETS[preset])
    _check_keys(file_values, f"config file {known.config}")
    parser.set_defaults(**{**preset_values, **file_values})
    namespace = parser.parse_args(argv)
    model_args, data_args, training_args = (
        cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if f.init}) for cls in ARGUMENT_CLASSES
    )
    return PretrainArguments(model_args, data_args, training_args)
