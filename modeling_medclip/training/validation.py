"""Validation of a run: the in-batch loss of held-out image-report pairs and the zero-shot / retrieval protocols of
`modeling_medclip.evaluation` on every evaluation task (`--eval_tasks`, from `dataset_scripts.tasks`).

Metric names: `eval_loss`, `eval_i2t_recall@{1,5}`, `eval_t2i_recall@{1,5}`, `eval_num_pairs` (held-out pairs: the
images of held-out patients of the training image sources that have a report, each with one of its sentences), and
`eval_<task>/<metric>` for every task (`eval_<task>/zero_shot_macro_auc`, ...; see [`evaluate_split`]).
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset_scripts.pairing import PairedBatches
from dataset_scripts.sources import has_report, image_stream, text_stream
from dataset_scripts.tasks import EvalTask, expand_tasks

from ..evaluation import EvaluationSplit, evaluate_split, format_results_table, load_images
from ..modeling_medclip import DualEncoderModel
from ..processing_medclip import MedCLIPProcessor
from ..retrieval import embed_images
from .arguments import OptimizationArguments, PretrainArguments
from .data import build_collator, held_out_patients, resolve_batching, training_sources
from .headline import SentenceGallery, format_headline_table, retrieval_headline, zero_shot_headline, zero_shot_scores
from .trainer import MODEL_INPUTS, to_device

# The rows of the results table (per task, then the held-out pairs'), when the run has them.
TASK_SUMMARY_METRICS = (
    "zero_shot_accuracy",
    "zero_shot_macro_auc",
    "image_to_text_precision@1",
    "image_to_text_precision@5",
    "image_to_text_precision@10",
    "image_to_image_precision@5",
    "image_to_own_text_recall@5",
)
PAIR_SUMMARY_METRICS = ("eval_i2t_recall@5", "eval_t2i_recall@5", "eval_loss")


@dataclass
class TaskEvaluation:
    """One evaluation task's held-out split, preprocessed once, and its prompt set."""

    task: EvalTask
    split: EvaluationSplit
    prompts: dict
    pixel_values: torch.Tensor  # (N, C, H, W) from the run's image processor


@dataclass
class Validation:
    """Everything a run validates on: collated held-out pairs (for the loss) and the evaluation tasks."""

    loss_batches: list[dict] = field(default_factory=list)
    tasks: list[TaskEvaluation] = field(default_factory=list)
    gallery: SentenceGallery | None = None  # report sentences of the text sources, for the retrieval rows
    bootstrap_resamples: int = 0
    bootstrap_seed: int = 0
    latest_scores: dict = field(default_factory=dict)  # task -> (N, C) zero-shot scores of the last evaluation

    def __bool__(self) -> bool:
        return bool(self.loss_batches or self.tasks)

    def write_split_ids(self, folder: str | Path) -> None:
        """Writes the ids of every task's held-out split to `folder/<task>.json`."""
        for evaluation in self.tasks:
            evaluation.task.write_split_ids(evaluation.split, folder)


def preprocess(processor: MedCLIPProcessor, images: list, batch_size: int = 32) -> torch.Tensor:
    """`(N, C, H, W)` pixel values of image paths / PIL images, decoded lazily (one batch of files at a time)."""
    lazy = load_images(images, processor.image_processor)
    return torch.cat(
        [
            processor(images=lazy[start : start + batch_size], return_tensors="pt")["pixel_values"]
            for start in range(0, len(images), batch_size)
        ]
    )


def build_task_evaluations(args: PretrainArguments, processor: MedCLIPProcessor) -> list[TaskEvaluation]:
    """The held-out split and prompts of every `--eval_tasks` task (with its companions)."""
    data_args = args.data
    evaluations = []
    for task, location in expand_tasks(data_args.eval_tasks):
        split = task.split(location, test_size=data_args.eval_split_size, seed=data_args.split_seed,
                           max_samples=data_args.max_eval_images)  # fmt: skip
        prompts = task.prompts_for(split.class_names, data_args.prompts_per_class, data_args.prompt_seed)
        evaluations.append(TaskEvaluation(task, split, prompts, preprocess(processor, split.images)))
    return evaluations


def build_loss_batches(args: PretrainArguments, config, processor: MedCLIPProcessor) -> list[dict]:
    """Collated held-out pairs: held-out patients' images of the training sources, each with a sentence of its
    report (none when no training image source has held-out patients with reports)."""
    data_args = args.data
    image_sources, _ = training_sources(data_args, resolve_batching(data_args, config))
    image_sources = [source for source in image_sources if source.builder is None or source.builder.has_text]
    held_out = held_out_patients(data_args, image_sources)
    images = image_stream(image_sources, seed=args.training.seed, uncertain=data_args.uncertain, held_out=held_out,
                          num_shards=1, only_held_out=True)  # fmt: skip
    if images is None:
        return []
    images = images.filter(has_report)
    if data_args.max_eval_samples:
        images = images.take(data_args.max_eval_samples)
    pairs = PairedBatches(images, batch_size=args.training.per_device_eval_batch_size, seed=args.training.seed,
                          drop_last=False, shuffle_buffer_size=None)  # fmt: skip
    collator = build_collator(args.model, processor, "none")
    return [batch for batch in (collator(pair) for pair in pairs) if "pixel_values" in batch and "input_ids" in batch]


def build_gallery(args: PretrainArguments, config) -> SentenceGallery | None:
    """The report sentences of the run's text sources (decoupled batches), without held-out patients."""
    data_args = args.data
    _, text_sources = training_sources(data_args, resolve_batching(data_args, config))
    if not text_sources:
        return None
    sentences = text_stream(text_sources, uncertain=data_args.uncertain,
                            held_out=held_out_patients(data_args, text_sources))  # fmt: skip
    return SentenceGallery.from_stream(sentences, seed=data_args.split_seed)


def build_validation(args: PretrainArguments, config, processor: MedCLIPProcessor) -> Validation:
    """The run's [`Validation`]: nothing without `--eval_tasks`."""
    if not args.data.eval_tasks:
        return Validation()
    return Validation(
        build_loss_batches(args, config, processor),
        build_task_evaluations(args, processor),
        gallery=build_gallery(args, config),
        bootstrap_resamples=args.data.bootstrap_resamples,
        bootstrap_seed=args.data.split_seed,
    )


def _pair_metrics(model: DualEncoderModel, batches: list[dict], device: torch.device) -> dict[str, float]:
    losses, images, texts = [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        outputs = model(**{key: batch[key] for key in MODEL_INPUTS if key in batch})
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
    return metrics


@torch.no_grad()
def evaluate(
    model: DualEncoderModel, validation: Validation, device: torch.device, processor: MedCLIPProcessor
) -> dict[str, float]:
    """Validation loss and image<->text retrieval of the held-out pairs (image `i`'s positive is text `i`), and the
    zero-shot / retrieval protocols of [`evaluate_split`] on every task, as `eval_<task>/<metric>`."""
    was_training = model.training
    model.eval()
    metrics = _pair_metrics(model, validation.loss_batches, device) if validation.loss_batches else {}
    validation.latest_scores = {}
    for evaluation in validation.tasks:
        results = evaluate_split(
            model, processor, evaluation.split, evaluation.prompts, pixel_values=evaluation.pixel_values.to(device)
        )
        results.update(_headline(model, processor, validation, evaluation, device))
        metrics.update({f"eval_{evaluation.task.name}/{name}": value for name, value in results.items()})
    model.train(was_training)
    return metrics


def _headline(model, processor, validation: Validation, evaluation: TaskEvaluation, device) -> dict[str, float]:
    """The task's headline zero-shot (and retrieval) numbers with their intervals; keeps its zero-shot scores."""
    image_embeddings = embed_images(model, processor, evaluation.pixel_values.to(device))
    scores = zero_shot_scores(model, processor, evaluation, image_embeddings)
    validation.latest_scores[evaluation.task.name] = scores
    resamples, seed = validation.bootstrap_resamples, validation.bootstrap_seed
    results = zero_shot_headline(evaluation, scores, resamples, seed)
    if validation.gallery is not None:
        results.update(retrieval_headline(model, processor, evaluation, image_embeddings, validation.gallery,
                                          resamples, seed))  # fmt: skip
    return results


def best_metric(args: OptimizationArguments, validation: Validation) -> tuple[str, bool]:
    """The metric that picks `best/` and whether larger is better (see `--metric_for_best_model`)."""
    name = args.metric_for_best_model
    if name is None:
        name = "eval_loss" if validation.loss_batches else f"eval_{validation.tasks[0].task.name}/zero_shot_macro_auc"
    greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
    return name, greater


def summary_metrics(metrics: dict[str, float]) -> list[str]:
    """The table rows present in `metrics`: every task's headline metrics, then the held-out pairs'."""
    tasks = list(dict.fromkeys(name.split("/")[0] for name in metrics if "/" in name))
    names = [f"{task}/{metric}" for task in tasks for metric in TASK_SUMMARY_METRICS]
    return [name for name in [*names, *PAIR_SUMMARY_METRICS] if name in metrics]


def results_table(result) -> str:
    """The held-out metrics of the model before training (random init, or the towers it started from) next to the
    trained model's, as a Markdown table."""
    columns = {}
    if result.initial_metrics:
        columns["before training"] = result.initial_metrics
    columns[f"after {result.global_step} steps"] = result.metrics
    headline = format_headline_table(columns)
    if headline.count("\n") > 1:  # the tasks' headline numbers with their intervals
        return headline
    return format_results_table(columns, summary_metrics(result.metrics))


def is_better(value: float, best: float | None, greater_is_better: bool) -> bool:
    return best is None or (not math.isnan(value) and (value > best if greater_is_better else value < best))
