#!/usr/bin/env python
"""Evaluate ConVIRT / MedCLIP models side by side: zero-shot, retrieval, linear probe, fine-tune, or the labeler.

    python run_eval.py --task zero-shot --model_name_or_path outputs/cpu-demo/final random-init \\
        --eval_tasks pediatric-pneumonia nih-cxr14
    python run_eval.py --task retrieval --model_name_or_path outputs/cpu-demo/final --eval_tasks pediatric-pneumonia \\
        --retrieval_texts ../shared/data/chexpert-labeler-iu/sentences-dev.csv
    python run_eval.py --task linear-probe --model_name_or_path outputs/cpu-demo/final random-init \\
        --eval_tasks pediatric-pneumonia --update_model_card outputs/cpu-demo/final
    python run_eval.py --task labeler --reference_labels ../shared/data/chexpert-labeler-iu/reports-dev.csv

Tasks come from the registry in `dataset_scripts/tasks.py` (`--help` lists them); a task's corpus is read from the
path given as `NAME=PATH`, else from its folder in the shared data folder (`$MEDCLIP_SHARED_DATA`). `random-init` is
the first named model's architecture, untrained (seeded). Every headline metric carries a 95% bootstrap CI
(resampling patients where the task has patient ids). Writes to `--output_dir`: `results.json` (configuration,
library versions, seeds, every metric with its CI), `results.md` (the tables), `plots/*.png` and the split ids
(`eval_splits/`). `--update_model_card DIR` merges the results into `DIR/README.md` as Hub `model-index` results,
with the tables and plots; `--push_to_hub` uploads that folder. Thin CLI: the protocols live in
`modeling_medclip.protocols`, `modeling_medclip.linear_probe` and `modeling_medclip.training.fine_tune`.
"""

import json
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from accelerate import PartialState
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoProcessor, HfArgumentParser
from transformers.utils import logging as transformers_logging

from dataset_scripts.paths import shared_data_dir
from dataset_scripts.tasks import expand_tasks, tasks_help
from modeling_medclip.adapters import apply_adapters
from modeling_medclip.eval_report import comparison_table, label_efficiency_table, write_results_json
from modeling_medclip.hub import push_final
from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler
from modeling_medclip.linear_probe import LABEL_FRACTIONS, ProbeData, extract_features, run_linear_probe
from modeling_medclip.model_card import merge_evaluation, write_model_card
from modeling_medclip.plots import (
    plot_confusion_matrix,
    plot_label_efficiency,
    plot_precision_at_k,
    plot_retrieval_examples,
    plot_roc_curves,
)
from modeling_medclip.protocols import (
    autocast_dtype,
    embed_images_in_workers,
    fold_batch_norms,
    image_loader,
    labeler_protocol,
    load_prompt_file,
    read_prompt_file,
    retrieval_protocol,
    zero_shot_protocol,
)
from modeling_medclip.retrieval import embed_texts
from modeling_medclip.training.arguments import HelpFormatter
from modeling_medclip.training.fine_tune import FineTuneSettings, run_fine_tune

RANDOM_INIT = "random-init"
HUB_TASK_TYPES = {
    "zero-shot": "zero-shot-image-classification", "retrieval": "image-to-text", "linear-probe": "image-classification",
    "fine-tune": "image-classification",
}  # fmt: skip


@dataclass
class EvalArguments:
    model_name_or_path: list[str] = field(
        default_factory=list,
        metadata={"help": "Saved model folders or Hub repo ids, compared side by side; `random-init`: the first "
                  "model's architecture, untrained (seed --seed). Not needed by --task labeler."},
    )
    task: Literal["zero-shot", "retrieval", "linear-probe", "fine-tune", "labeler"] = field(
        default="zero-shot", metadata={"help": "The protocol."}
    )
    eval_tasks: list[str] = field(
        default_factory=lambda: ["pediatric-pneumonia"],
        metadata={"help": "Evaluation tasks, NAME or NAME=PATH: " + tasks_help() + "."},
    )
    split: Literal["train", "test"] = field(
        default="test",
        metadata={"help": "zero-shot / retrieval: the patient-disjoint part evaluated (held-out or training patients)."},
    )
    test_size: float = field(default=0.2, metadata={"help": "Fraction of patients held out by the split."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient split (use the training run's)."})
    max_eval_images: int | None = field(
        default=None, metadata={"help": "Evaluate each task on at most this many test images (seeded subset)."}
    )
    max_train_images: int | None = field(
        default=None, metadata={"help": "linear-probe / fine-tune: at most this many training images (seeded)."}
    )
    prompts_per_class: int = field(default=10, metadata={"help": "Zero-shot prompts drawn per class."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the prompt draw (reproducible prompts)."})
    prompt_file: str | None = field(
        default=None,
        metadata={"help": "Your own prompts (JSON or YAML, {class: [prompts]}, multi-label {class: {positive, "
                  "negative}}), used for the tasks with exactly its classes."},
    )
    ensemble: Literal["mean_embedding", "mean_logits"] = field(
        default="mean_embedding", metadata={"help": "Prompt ensemble: mean of the embeddings or of the logits."}
    )
    retrieval_texts: str | None = field(
        default=None,
        metadata={"help": "Text gallery for image->text / text->image retrieval on tasks without reports of their "
                  "own: a CSV in the CheXpert labeler's format (a Reports column and the 14 CheXpert columns), e.g. "
                  "chexpert-labeler-iu/sentences-dev.csv; a text is relevant to a class it is positive for."},
    )
    max_retrieval_texts: int | None = field(
        default=None, metadata={"help": "Use at most this many distinct texts of --retrieval_texts (seeded)."}
    )
    label_fractions: list[float] = field(
        default_factory=lambda: list(LABEL_FRACTIONS),
        metadata={"help": "linear-probe / fine-tune: fractions of the training labels used."},
    )
    probe_features: Literal["pooled", "projection"] = field(
        default="pooled",
        metadata={"help": "linear-probe features: the vision tower's pooled output or the normalised projection."},
    )
    fine_tune_epochs: float = field(
        default=5.0, metadata={"help": "fine-tune: epochs over the drawn labels (more where --fine_tune_min_steps asks "
                               "for it), scored about this many times on the validation patients; the best is kept."},
    )
    fine_tune_min_steps: int = field(
        default=100, metadata={"help": "fine-tune: at least this many optimizer steps per run (in whole epochs), so "
                               "that a 1% draw trains its head too."},
    )
    fine_tune_batch_size: int = field(default=16, metadata={"help": "fine-tune: images per optimizer step."})
    fine_tune_learning_rate: float = field(default=1e-4, metadata={"help": "fine-tune: learning rate of the tower."})
    fine_tune_head_learning_rate: float = field(default=1e-3, metadata={"help": "fine-tune: that of the head."})
    peft: Literal["lora", "dora", "ia3"] | None = field(
        default=None,
        metadata={"help": "fine-tune: train adapters through peft on the vision tower (and the new head) instead of "
                  "the whole tower."},
    )
    peft_rank: int = field(default=8, metadata={"help": "fine-tune: LoRA / DoRA rank of --peft."})
    reference_labels: str | None = field(
        default=None,
        metadata={"help": "labeler: the reference labels (CheXpert CSV format). Default: the shared "
                  "chexpert-labeler-iu/reports-dev.csv."},
    )
    n_resamples: int = field(default=1000, metadata={"help": "Bootstrap resamples of every confidence interval."})
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap resampling."})
    seed: int = field(default=0, metadata={"help": "Seed of random-init weights and of fine-tuning."})
    batch_size: int = field(default=32, metadata={"help": "Images or texts per forward pass."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader workers decoding the images."})
    bf16: Literal["auto", "yes", "no"] = field(
        default="auto", metadata={"help": "bf16 autocast: auto = where the CPU (AVX512-BF16 / AMX) or GPU has it."}
    )
    channels_last: bool = field(
        default=True, metadata={"help": "Convolution weights and images channels-last (oneDNN's fast CPU layout)."}
    )
    fold_batch_norms: bool = field(
        default=True, metadata={"help": "Fold the BatchNorms of ResNet towers into their convolutions (inference only; "
                                "the same outputs up to rounding, faster)."},
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "Where results.json, results.md, plots/ and eval_splits/ go. Default: "
                                "eval/<first model's name>-<task>."},
    )
    update_model_card: str | None = field(
        default=None, metadata={"help": "Model folder whose README.md gets the results (model-index), tables, plots."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load with the code saved in the folder instead of the installed package."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the --update_model_card folder to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo to push to. Default: the first model."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to."})

    def __post_init__(self):
        if self.task != "labeler" and not [m for m in self.model_name_or_path if m != RANDOM_INIT]:
            raise ValueError(f"--task {self.task} needs --model_name_or_path with at least one saved model")
        if self.push_to_hub and not self.update_model_card:
            raise ValueError("--push_to_hub uploads the --update_model_card folder: give that folder")
        labels = [model_label(name) for name in self.model_name_or_path]
        if len(set(labels)) != len(labels):
            raise ValueError(f"--model_name_or_path {self.model_name_or_path} gives the same column name twice "
                             f"({labels}): the tables name models by their folder's last part")  # fmt: skip


def model_label(name: str) -> str:
    return name if name == RANDOM_INIT else Path(name).name or name


def load_models(args: EvalArguments, device: torch.device) -> tuple[dict, object]:
    """`{label: model}` in the order given (`random-init` from the first model's config) and the first processor."""
    first = next(m for m in args.model_name_or_path if m != RANDOM_INIT)
    processor = AutoProcessor.from_pretrained(first, trust_remote_code=args.trust_remote_code)
    models = {}
    for name in args.model_name_or_path:
        if name == RANDOM_INIT:
            torch.manual_seed(args.seed)
            config = AutoConfig.from_pretrained(first, trust_remote_code=args.trust_remote_code)
            model = AutoModel.from_config(config, trust_remote_code=args.trust_remote_code)
        else:
            model = AutoModel.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        model = model.to(device).eval()
        if args.fold_batch_norms:
            fold_batch_norms(model)
        models[model_label(name)] = model.to(memory_format=torch.channels_last) if args.channels_last else model
    return models, processor


def classifier_builder(args: EvalArguments, label: str, num_labels: int, multilabel: bool):
    """`seed -> ...ForImageClassification` for the model `label`: its vision tower with a new head (documented
    `from_pretrained(path, num_labels=...)`); `random-init` from the first model's config. transformers' load report
    (the new head's weights are missing by design) is shown for the first build only."""
    source = next(m for m in args.model_name_or_path if model_label(m) == label)
    first = next(m for m in args.model_name_or_path if m != RANDOM_INIT)
    problem_type = "multi_label_classification" if multilabel else "single_label_classification"
    kwargs = {"num_labels": num_labels, "problem_type": problem_type, "trust_remote_code": args.trust_remote_code}

    builds = []

    def build(seed: int):
        torch.manual_seed(seed)
        if source == RANDOM_INIT:
            config = AutoConfig.from_pretrained(first, **kwargs)
            model = AutoModelForImageClassification.from_config(config, trust_remote_code=args.trust_remote_code)
        else:
            verbosity = transformers_logging.get_verbosity()
            if builds:
                transformers_logging.set_verbosity_error()
            try:
                model = AutoModelForImageClassification.from_pretrained(source, **kwargs)
            finally:
                transformers_logging.set_verbosity(verbosity)
        builds.append(seed)
        return apply_adapters(model, method=args.peft, towers=("vision",), r=args.peft_rank) if args.peft else model

    return build


def _groups(split) -> np.ndarray | None:
    return np.asarray(split.patient_ids) if split.patient_ids else None


def _prompts(task, split, args: EvalArguments) -> dict:
    """The user's prompt file where its classes are the split's, else the task's built-in prompt set."""
    if args.prompt_file and sorted(read_prompt_file(args.prompt_file)) == sorted(split.class_names):
        return load_prompt_file(args.prompt_file, split.class_names, "multilabel" if split.multilabel else "multiclass")
    return task.prompts_for(split.class_names, args.prompts_per_class, args.prompt_seed)


def chexpert_columns(class_names) -> list[str | None]:
    """The CheXpert column of each task class (`Normal` is `No Finding`), `None` where CheXpert has none."""
    by_name = {name.lower(): name for name in CHEXPERT_CLASSES} | {"normal": "No Finding"}
    return [by_name.get(name.lower()) for name in class_names]


def text_gallery(split, args: EvalArguments) -> tuple[list[str], np.ndarray] | None:
    """`(texts, (M, C) 0/1 rows)`: the split's own distinct reports labelled by their images where it has some, else
    the `--retrieval_texts` file's positive labels mapped onto the task's classes; `None` without texts."""
    num_classes = len(split.class_names)
    labelled = {}
    for text, label in zip(split.texts or [], split.labels):
        if text and text.strip():
            row = np.asarray(label) > 0.5 if split.multilabel else np.eye(num_classes, dtype=bool)[label]
            labelled[text] = labelled.get(text, np.zeros(num_classes, bool)) | row
    if len(labelled) > 1:
        return list(labelled), np.stack(list(labelled.values())).astype(np.int32)
    if not args.retrieval_texts:
        return None
    table = pd.read_csv(args.retrieval_texts).dropna(subset=["Reports"]).drop_duplicates(subset="Reports")
    if args.max_retrieval_texts and len(table) > args.max_retrieval_texts:
        table = table.sample(n=args.max_retrieval_texts, random_state=args.seed)
    columns = chexpert_columns(split.class_names)
    rows = np.stack([(table[c].to_numpy() == 1.0) if c else np.zeros(len(table), bool) for c in columns], axis=1)
    return list(table["Reports"].str.strip()), rows.astype(np.int32)


def evaluate_zero_shot_task(task, split, models, processor, args, autocast, plots: Path) -> dict:
    prompts = _prompts(task, split, args)
    results, scores = {}, {}
    for name, model in models.items():
        embeddings = embed_images_in_workers(model, processor, split.images, args.batch_size, args.num_workers,
                                             autocast, args.channels_last)  # fmt: skip
        outcome = zero_shot_protocol(model, processor, embeddings, split.labels, split.class_names, prompts,
                                     groups=_groups(split), ensemble=args.ensemble, n_resamples=args.n_resamples,
                                     seed=args.bootstrap_seed)  # fmt: skip
        results[name], scores[name] = outcome["intervals"], outcome["scores"]
        if not split.multilabel:
            plot_confusion_matrix(split.labels, outcome["scores"].argmax(axis=1), split.class_names,
                                  plots / f"confusion-{task.name}-{name}.png",
                                  title=f"{task.name}, {name}: zero-shot confusion matrix")  # fmt: skip
    plot_roc_curves(scores, np.asarray(split.labels), split.class_names, plots / f"roc-{task.name}.png",
                    title=f"{task.name}: zero-shot ROC curves ({len(split.images)} test images)")  # fmt: skip
    return results


def evaluate_retrieval_task(task, split, models, processor, args, autocast, plots: Path) -> dict:
    gallery = text_gallery(split, args)
    results, curves = {}, {}
    for name, model in models.items():
        embeddings = embed_images_in_workers(model, processor, split.images, args.batch_size, args.num_workers,
                                             autocast, args.channels_last)  # fmt: skip
        text_embeddings = embed_texts(model, processor, gallery[0], args.batch_size) if gallery else None
        outcome = retrieval_protocol(
            embeddings, split.labels, len(split.class_names), text_embeddings=text_embeddings,
            text_labels=gallery[1] if gallery else None, groups=_groups(split), n_resamples=args.n_resamples,
            seed=args.bootstrap_seed,
        )  # fmt: skip
        results[name] = {f"{direction}/{metric}": ci for direction, scored in outcome.items()
                         for metric, ci in scored["intervals"].items()}  # fmt: skip
        for direction, scored in outcome.items():
            curves[f"{name}, {direction.replace('_to_', '->')}"] = {
                int(metric.split("@")[1]): ci for metric, ci in scored["intervals"].items() if metric.startswith("precision@")
            }  # fmt: skip
        if "image_to_text" in outcome and name == next(iter(models)):
            _plot_examples(task, split, gallery, outcome["image_to_text"]["indices"], name, plots)
    plot_precision_at_k(curves, plots / f"precision_at_k-{task.name}.png",
                        title=f"{task.name}: Precision@k by label agreement (shaded: 95% CI)")  # fmt: skip
    return results


def _plot_examples(task, split, gallery, indices, model_name, plots: Path, queries: int = 4, top: int = 3) -> None:
    texts, rows = gallery
    labels = np.asarray(split.labels)
    chosen = np.linspace(0, len(split.images) - 1, num=min(queries, len(split.images))).astype(int)
    image_rows = labels > 0.5 if split.multilabel else np.eye(len(split.class_names), dtype=bool)[labels]

    def describe(row) -> str:
        return ", ".join(c for c, on in zip(split.class_names, row) if on) or "none of the classes"

    retrieved = [[(texts[j], describe(rows[j]), bool((rows[j] & image_rows[i]).any())) for j in indices[i][:top]]
                 for i in chosen]  # fmt: skip
    plot_retrieval_examples([split.images[i] for i in chosen], [describe(image_rows[i]) for i in chosen], retrieved,
                            plots / f"retrieval-examples-{task.name}.png",
                            title=f"{task.name}, {model_name}: top {top} retrieved sentences (green: shares the "
                                  "query's label)")  # fmt: skip


def _label_efficiency(task, results_by_model: dict, plots: Path, protocol: str) -> dict:
    curves = {name: {f.fraction: f.metrics["macro_auc"] for f in result.fractions}
              for name, result in results_by_model.items()}  # fmt: skip
    plot_label_efficiency(curves, plots / f"label_efficiency-{task.name}.png", chance=0.5,
                          title=f"{task.name}: {protocol} test macro AUC vs training labels (shaded: 95% CI)")  # fmt: skip
    return curves


def evaluate_label_efficiency_task(task, train, test, models, processor, args, autocast, splits: Path) -> dict:
    results = {}
    class_names = test.class_names
    for name, model in models.items():
        if args.task == "linear-probe":
            def features(split):
                loader = image_loader(processor, split.images, args.batch_size, args.num_workers)
                return extract_features(model, loader, args.probe_features, autocast, args.channels_last)

            results[name] = run_linear_probe(
                ProbeData(features(train), train.labels, _groups(train), train.image_ids or None),
                ProbeData(features(test), test.labels, _groups(test), test.image_ids or None),
                fractions=args.label_fractions, split_seed=args.split_seed, class_names=class_names,
                n_resamples=args.n_resamples, ci_seed=args.bootstrap_seed,
            )  # fmt: skip
        else:
            results[name] = run_fine_tune(
                classifier_builder(args, name, len(class_names), test.multilabel),
                processor, train.images, train.labels, _groups(train), test.images, test.labels, _groups(test),
                settings=FineTuneSettings(
                    num_train_epochs=args.fine_tune_epochs, min_steps=args.fine_tune_min_steps,
                    per_device_train_batch_size=args.fine_tune_batch_size,
                    learning_rate=args.fine_tune_learning_rate, head_learning_rate=args.fine_tune_head_learning_rate,
                    num_workers=args.num_workers, bf16=autocast is not None,
                ),
                fractions=args.label_fractions, split_seed=args.split_seed, class_names=class_names,
                image_ids=train.image_ids or None, n_resamples=args.n_resamples, ci_seed=args.bootstrap_seed,
                autocast=autocast,
            )  # fmt: skip
        (splits / f"{task.name}-{args.task}-{name}.json").write_text(
            json.dumps({**results[name].split_ids, "label_draws": results[name].label_draws()}, indent=1) + "\n"
        )
    return results


def card_metrics(protocol: str, result) -> dict[str, float]:
    """The `model-index` values of one model on one task: every metric, or the macro AUC at each label fraction."""
    if hasattr(result, "fractions"):
        return {f"{protocol}_macro_auc@{100 * f.fraction:g}%": f.metrics["macro_auc"].value for f in result.fractions}
    return {f"{protocol}_{name}": interval.value for name, interval in result.items()}


def run_labeler(args: EvalArguments, output_dir: Path) -> dict:
    reference = args.reference_labels or str(shared_data_dir() / "chexpert-labeler-iu" / "reports-dev.csv")
    outcome = labeler_protocol(CheXpertLabeler(), reference, n_resamples=args.n_resamples, seed=args.bootstrap_seed)
    micro = outcome["metrics"]["micro"]
    rows = {value: {"precision": m["precision"], "recall": m["recall"], "f1": outcome["intervals"][f"micro_f1/{value}"],
                    "support": float(m["support"])} for value, m in micro.items()}  # fmt: skip
    table = comparison_table(rows, ["precision", "recall", "f1", "support"])
    per_class = comparison_table(
        {value: {name: outcome["metrics"]["per_class"][name][value]["f1"] for name in outcome["metrics"]["per_class"]}
         for value in micro}  # fmt: skip
    )
    markdown = (f"## labeler agreement with `{reference}` ({outcome['num_texts']} texts)\n\nmicro over the findings "
                f"(F1 with 95% CI):\n\n{table}\n\nF1 per class:\n\n{per_class}\n")  # fmt: skip
    (output_dir / "results.md").write_text(markdown)
    write_results_json(output_dir / "results.json", asdict(args), {"labeler": outcome})
    print(markdown)
    return outcome


def write_card(args, models, results, tables: str, plot_files: list[Path]) -> Path:
    """Merges the results of the model whose folder is `--update_model_card` (else the first model) into its card."""
    folder = Path(args.update_model_card)
    folder.mkdir(parents=True, exist_ok=True)
    card = folder / "README.md"
    labels = [model_label(m) for m in args.model_name_or_path]
    own = model_label(str(folder)) if model_label(str(folder)) in labels else next(l for l in labels if l != RANDOM_INIT)
    if not card.is_file():
        write_model_card(folder, models[own], repo_id=args.hub_model_id, training_summary=(
            "Training data: not recorded with this checkpoint (its folder had no model card of a training run)."
        ))  # fmt: skip
    figures = folder / "eval_plots"
    figures.mkdir(exist_ok=True)
    for path in plot_files:
        shutil.copy2(path, figures / path.name)
    entries = {task_name: card_metrics(args.task, by_model[own]) for task_name, by_model in results.items()}
    notes = (f"Evaluated with `run_eval.py --task {args.task}` on the patient-disjoint test patients (test size "
             f"{args.test_size}, split seed {args.split_seed}); 95% bootstrap CIs over patients ({args.n_resamples} "
             f"resamples). Research use only: not validated for clinical use.")  # fmt: skip
    return merge_evaluation(card, entries, title=f"{args.task} ({', '.join(results)})", results_table=tables,
                            notes=notes, task_type=HUB_TASK_TYPES[args.task],
                            images=[f"eval_plots/{p.name}" for p in plot_files])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvalArguments, formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    first = next((m for m in args.model_name_or_path if m != RANDOM_INIT), "labeler")
    output_dir = Path(args.output_dir or Path("eval") / f"{model_label(first)}-{args.task}")
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.task == "labeler":
        return run_labeler(args, output_dir)

    device = PartialState().device
    autocast = autocast_dtype(args.bf16, device)
    models, processor = load_models(args, device)
    plots, splits = output_dir / "plots", output_dir / "eval_splits"
    plots.mkdir(exist_ok=True)
    results, sections = {}, []
    for task, location in expand_tasks(args.eval_tasks):
        if args.task in ("zero-shot", "retrieval"):
            split = task.split(location, test_size=args.test_size, seed=args.split_seed, part=args.split,
                               max_samples=args.max_eval_images)  # fmt: skip
            task.write_split_ids(split, splits)
            protocol = evaluate_zero_shot_task if args.task == "zero-shot" else evaluate_retrieval_task
            results[task.name] = protocol(task, split, models, processor, args, autocast, plots)
            sections.append(f"### {task.name} ({len(split.images)} images)\n\n{comparison_table(results[task.name])}")
        else:
            train = task.split(location, test_size=args.test_size, seed=args.split_seed, part="train",
                               max_samples=args.max_train_images)  # fmt: skip
            test = task.split(location, test_size=args.test_size, seed=args.split_seed, part="test",
                              max_samples=args.max_eval_images)  # fmt: skip
            task.write_split_ids(test, splits)
            results[task.name] = evaluate_label_efficiency_task(task, train, test, models, processor, args, autocast,
                                                                splits)  # fmt: skip
            curves = _label_efficiency(task, results[task.name], plots, args.task)
            sections.append(f"### {task.name} ({len(train.images)} training / {len(test.images)} test images)\n\n"
                            f"{label_efficiency_table(curves, 'test macro AUC')}")  # fmt: skip

    tables = "\n\n".join(sections)
    (output_dir / "results.md").write_text(f"## {args.task}\n\n{tables}\n")
    serialisable = {task: {name: value.to_dict(with_ids=False) if hasattr(value, "fractions") else value
                           for name, value in by_model.items()} for task, by_model in results.items()}  # fmt: skip
    write_results_json(output_dir / "results.json", {**asdict(args), "autocast": str(autocast)}, serialisable)
    print(tables)
    if args.update_model_card:
        write_card(args, models, results, tables, sorted(plots.glob("*.png")))
        if args.push_to_hub:
            push_final(args.update_model_card, args.hub_model_id or first, revision=args.hub_revision,
                       commit_message=f"Add {args.task} evaluation results, tables and plots")  # fmt: skip
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
