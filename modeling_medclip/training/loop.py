"""The run: state, loop, validate, save, finish.

[`train`] works the same under `python` (one process) and `accelerate launch` (one per device) and resumes exactly from
a checkpoint (`resume_from_checkpoint`) with the same number of processes and DataLoader workers. Outputs in
`output_dir`: `checkpoint-<step>/` (see [`modeling_medclip.checkpointing`]), `best/` (best model by
`metric_for_best_model`), `final/` (model, processor and model card: loads with `AutoModel.from_pretrained` and
`AutoProcessor.from_pretrained`; with `--peft`, only the adapter, processor and an adapter card naming the base model:
it loads with `PeftModel.from_pretrained(base, final)`), `metrics.jsonl` (one JSON object per logging or validation step),
`eval_splits/<task>.json` (the held-out ids of every evaluation task), `roc_<task>.png` (the zero-shot ROC curves of
every task before and after training) and `train_results.json`.
"""

import json
import logging
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from dataset_scripts.sources import parse_sources

from ..adapters import adapter_model_card
from ..checkpointing import (
    check_checkpoint_settings,
    read_checkpoint,
    resolve_checkpoint,
    rotate_checkpoints,
    save_pretrained_atomic,
    settings_fingerprint,
    sorted_checkpoints,
    write_checkpoint,
)
from ..hub import UPLOAD_RECORD_NAME, BackgroundUploader
from ..model_card import write_model_card
from ..processing_medclip import MedCLIPProcessor
from .arguments import (
    SECRET_ARGUMENTS,
    OptimizationArguments,
    PretrainArguments,
    check_arguments,
    public_arguments,
    run_settings,
)
from .data import MicroBatches, SeededCollate, build_collator, build_train_stream, count_batches, resolve_batching
from .factory import build_model_and_processor
from .headline import save_roc_curves
from .trainer import ContrastiveTrainer, StepOutput
from .validation import Validation, best_metric, build_validation, evaluate, is_better, results_table

logger = logging.getLogger(__name__)

RUN_ARTEFACTS = ("best", "final", "eval_splits", "metrics.jsonl", "train_results.json")


@dataclass
class TrainResult:
    """What [`train`] returns."""

    output_dir: Path
    final_model_dir: Path
    best_model_dir: Path | None
    global_step: int
    metrics: dict[str, float]  # the last validation metrics (main process), train_loss / train_runtime / skipped_images
    initial_metrics: dict[str, float] = field(default_factory=dict)  # validation of the model before step 1
    hub_errors: list[str] = field(default_factory=list)


@dataclass
class RunState:
    """What changes during a run (and is saved in its checkpoints)."""

    max_steps: int
    global_step: int = 0
    best_metric: float | None = None
    initial_metrics: dict = field(default_factory=dict)
    last_metrics: dict = field(default_factory=dict)
    train_losses: list[float] = field(default_factory=list)


@dataclass
class Run:
    """What stays the same during a run: the trainer, the data, validation, outputs."""

    args: PretrainArguments
    accelerator: Accelerator
    trainer: ContrastiveTrainer
    processor: MedCLIPProcessor
    stream: object
    batches: MicroBatches
    validation: Validation
    output_dir: Path
    uploader: BackgroundUploader | None = None
    settings: dict = field(default_factory=dict)  # run_settings(args): recorded in every checkpoint
    scores: dict = field(default_factory=dict)  # "before" / "after" -> task -> zero-shot scores, for the ROC curves

    def log(self, state: RunState, values: dict) -> None:
        """Appends `values` to `metrics.jsonl` (main process) and sends them to the trackers."""
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as file:
                file.write(json.dumps({"step": state.global_step, **values}) + "\n")
        if self.args.training.report_to != "none":
            self.accelerator.log(values, step=state.global_step)


class LogWindow:
    """The training loss and throughput since the last log line."""

    def __init__(self):
        self.loss, self.steps, self.images, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, output: StepOutput, num_processes: int) -> None:
        self.loss += output.loss
        self.steps += 1
        self.images += output.num_images * num_processes

    def values(self, run: Run, output: StepOutput) -> dict:
        elapsed = time.perf_counter() - self.start
        values = {
            "loss": self.loss / self.steps,
            "learning_rate": run.trainer.scheduler.get_last_lr()[0],
            "images_per_second": self.images / elapsed if elapsed > 0 else float("nan"),
            "logit_scale": run.trainer.unwrapped.get_logit_scale().item(),
            "epoch": run.stream.epoch,
            "skipped_images": run.batches.skipped_images,
        }
        if output.grad_norm is not None:
            values["grad_norm"] = output.grad_norm
        return values


def build_accelerator(args: OptimizationArguments) -> Accelerator:
    """The run's Accelerator: precision from the flag, else from `accelerate launch` / the Accelerate config."""
    return Accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps if args.accumulation_mode == "plain" else 1,
        dynamo_backend="inductor" if args.torch_compile else "no",
        log_with=None if args.report_to == "none" else args.report_to.split(","),
        project_dir=args.output_dir,
    )


def prepare_output_dir(args: OptimizationArguments, accelerator: Accelerator) -> Path:
    """`output_dir`, created. A non-empty one is refused unless the run resumes or `overwrite_output_dir` is set
    (which deletes the previous run's checkpoints, best/, final/, eval_splits/ and metrics)."""
    output_dir = Path(args.output_dir)
    taken = output_dir.is_dir() and any(output_dir.iterdir()) and not args.resume_from_checkpoint
    accelerator.wait_for_everyone()  # every process has looked before the main one writes anything
    if taken and not args.overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} is not empty: pass --overwrite_output_dir to train into it anyway (deleting its "
            "checkpoints, best/, final/ and metrics) or --resume_from_checkpoint latest to go on from its last checkpoint"
        )
    if taken and accelerator.is_main_process:
        artefacts = [*(output_dir / name for name in RUN_ARTEFACTS), *output_dir.glob("roc_*.png")]
        for path in [*sorted_checkpoints(output_dir), *artefacts]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return output_dir


def start_run(args: PretrainArguments, accelerator: Accelerator, output_dir: Path) -> tuple[Run, RunState]:
    """Builds the model, data, trainer and validation, and restores a checkpoint's state when resuming."""
    model_args, training_args = args.model, args.training
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, output_dir)
    if checkpoint is not None:
        check_checkpoint_settings(checkpoint, run_settings(args), training_args.ignore_settings_mismatch)
    parse_sources(args.data.image_dataset, args.data.image_dataset_weights)  # bad data flags fail before any download
    set_seed(training_args.seed)
    if checkpoint is not None and not model_args.peft:  # with --peft a checkpoint holds only the adapter
        model_args = type(model_args)(**{**asdict(model_args), "model_name_or_path": str(checkpoint)})
    model, processor = build_model_and_processor(model_args, checkpoint if model_args.peft else None)
    positions = getattr(model.config.text_config, "max_position_embeddings", None)
    if positions is not None and model_args.max_length > positions:
        too_long = f"--max_length {model_args.max_length} is beyond the text tower's {positions} positions"
        check_arguments(args, [too_long])
    stream = build_train_stream(args, model.config, accelerator.process_index, accelerator.num_processes)
    max_steps = training_args.max_steps
    if max_steps <= 0:
        batches_per_epoch = count_batches(stream) // training_args.gradient_accumulation_steps
        counts = accelerator.gather(torch.tensor([batches_per_epoch], device=accelerator.device))
        max_steps = max(1, math.ceil(training_args.num_train_epochs * int(counts.min())))
    trainer = ContrastiveTrainer(accelerator, model, training_args, max_steps)
    state, skipped_images = RunState(max_steps), 0
    if checkpoint is not None:
        trainer_state, data_state = read_checkpoint(
            accelerator, checkpoint, optimizer=trainer.optimizer, scheduler=trainer.scheduler
        )
        stream.load_state_dict(data_state)
        state.global_step, state.best_metric = trainer_state["global_step"], trainer_state.get("best_metric")
        state.initial_metrics = trainer_state.get("initial_metrics", {})
        skipped_images = trainer_state.get("skipped_images", 0)
        logger.info("Resumed from %s at step %d", checkpoint, state.global_step)
    augmentation = args.data.augmentation or ("convirt" if model_args.model_type == "convirt" else "medclip")
    collate = SeededCollate(build_collator(model_args, processor, augmentation), training_args.seed,
                            accelerator.process_index)  # fmt: skip
    batches = MicroBatches(stream, collate, args.data.dataloader_num_workers, training_args.seed, skipped_images)
    validation = build_validation(args, model.config, processor) if accelerator.is_main_process else Validation()
    run = Run(args, accelerator, trainer, processor, stream, batches, validation, output_dir,
              settings=run_settings(args))  # fmt: skip
    if accelerator.is_main_process:
        validation.write_split_ids(output_dir / "eval_splits")
        _truncate_metrics(output_dir / "metrics.jsonl", state.global_step)
        if training_args.push_to_hub:
            run.uploader = BackgroundUploader(training_args.hub_model_id, revision=training_args.hub_revision,
                                              private=training_args.hub_private_repo, token=training_args.hub_token)
            run.uploader.upload_pending(output_dir)  # what an earlier run into this folder could not upload
        elif (output_dir / UPLOAD_RECORD_NAME).is_file():
            logger.warning("%s lists folders not yet on the Hub; a run with --push_to_hub uploads them.",
                           output_dir / UPLOAD_RECORD_NAME)  # fmt: skip
    if training_args.report_to != "none":
        accelerator.init_trackers(output_dir.name, config=_flat_config(args))
    return run, state


def validate(run: Run, state: RunState) -> dict:
    """Evaluates on the main process (the training RNG untouched), logs, and keeps `best/` up to date."""
    metrics = {}
    if run.accelerator.is_main_process and run.validation:
        with torch.random.fork_rng(devices=[]):
            metrics = evaluate(run.trainer.unwrapped, run.validation, run.accelerator.device, run.processor)
        run.log(state, metrics)
        name, greater = best_metric(run.args.training, run.validation)
        if name not in metrics:
            raise ValueError(f"--metric_for_best_model {name} is not among the validation metrics {sorted(metrics)}")
        if state.global_step > 0 and is_better(metrics[name], state.best_metric, greater):
            state.best_metric = metrics[name]
            save_pretrained_atomic(run.output_dir / "best", run.trainer.unwrapped, run.processor,
                                   {"best_metric.json": {"step": state.global_step, name: metrics[name]}})  # fmt: skip
    run.accelerator.wait_for_everyone()
    return metrics


def save_checkpoint(run: Run, state: RunState) -> None:
    """Writes `checkpoint-<step>/` (every process), uploads it in the background and rotates old ones."""
    trainer = run.trainer
    folder = write_checkpoint(
        run.accelerator, run.output_dir, state.global_step, model=trainer.unwrapped, processor=run.processor,
        optimizer=trainer.optimizer, scheduler=trainer.scheduler, data_state=run.stream.state_dict(),
        trainer_state={"global_step": state.global_step, "best_metric": state.best_metric,
                       "max_steps": state.max_steps, "initial_metrics": state.initial_metrics,
                       "skipped_images": run.batches.skipped_images, "settings": run.settings,
                       "settings_fingerprint": settings_fingerprint(run.settings)},
    )  # fmt: skip
    if run.accelerator.is_main_process:
        keep = set()
        if run.uploader is not None:
            run.uploader.upload(folder, path_in_repo=folder.name)  # returns at once: training never waits
            keep = run.uploader.pending_folders()  # rotation spares folders until they are on the Hub
        rotate_checkpoints(run.output_dir, run.args.training.save_total_limit, keep=keep)
    run.accelerator.wait_for_everyone()


@contextmanager
def transformers_progress_bars_disabled():
    """No "Writing model shards" / "Loading weights" bars for every save and load of a run (restored afterwards)."""
    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def train(args: PretrainArguments, accelerator: Accelerator | None = None) -> TrainResult:
    """Runs a pretraining described by `args` (see [`parse_args`]) and returns where the results are."""
    with transformers_progress_bars_disabled():
        return run_training(args, accelerator)


def run_training(args: PretrainArguments, accelerator: Accelerator | None) -> TrainResult:
    """The outline of a run: state, loop, validate, save, finish."""
    training_args = args.training
    check_arguments(args)  # every bad value named at once, before anything is built or deleted
    accelerator = accelerator or build_accelerator(training_args)
    run, state = start_run(args, accelerator, prepare_output_dir(training_args, accelerator))
    if state.global_step == 0:  # the same protocols on the untrained model, so the reader sees what training bought
        state.initial_metrics = validate(run, state)
        run.scores["before"] = run.validation.latest_scores
    progress = tqdm(total=state.max_steps, initial=state.global_step, desc="pretraining",
                    disable=training_args.disable_tqdm or not accelerator.is_local_main_process)  # fmt: skip
    start, window = time.perf_counter(), LogWindow()
    while state.global_step < state.max_steps:
        output = run.trainer.training_step(
            [run.batches.next() for _ in range(training_args.gradient_accumulation_steps)]
        )
        if not math.isfinite(output.loss):
            raise FloatingPointError(f"training loss is {output.loss} at step {state.global_step + 1}")
        state.global_step += 1
        state.train_losses.append(output.loss)
        window.add(output, accelerator.num_processes)
        progress.update(1)
        last = state.global_step == state.max_steps
        if state.global_step % training_args.logging_steps == 0 or last:
            values = window.values(run, output)
            run.log(state, values)
            progress.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}")
            window = LogWindow()
        if last or (training_args.eval_steps and state.global_step % training_args.eval_steps == 0):
            state.last_metrics = validate(run, state)  # before saving, so the checkpoint knows the best metric
        if training_args.save_steps and state.global_step % training_args.save_steps == 0:
            save_checkpoint(run, state)
    progress.close()
    if not state.train_losses:  # resumed from the last checkpoint: nothing left to train (the same on every process)
        state.last_metrics = validate(run, state)
    return finish(run, state, time.perf_counter() - start)


def finish(run: Run, state: RunState, runtime: float) -> TrainResult:
    """Saves `final/` with its model card and `train_results.json`, pushes to the Hub, closes the trackers."""
    output_dir, training_args = run.output_dir, run.args.training
    metrics = {
        **state.last_metrics,
        "global_step": state.global_step,
        "train_loss": float(np.mean(state.train_losses)) if state.train_losses else float("nan"),
        "train_runtime": runtime,
        "skipped_images": run.batches.skipped_images,
    }
    best_dir = output_dir / "best"
    result = TrainResult(output_dir, output_dir / "final", best_dir if best_dir.is_dir() else None, state.global_step,
                         metrics, state.initial_metrics)  # fmt: skip
    if run.accelerator.is_main_process:
        extra = {"train_results.json": metrics, "training_args.json": public_arguments(run.args)}
        save_pretrained_atomic(result.final_model_dir, run.trainer.unwrapped, run.processor, extra)
        write_run_card(run, result)
        if run.validation.tasks:
            save_roc_curves({**run.scores, f"after {state.global_step} steps": run.validation.latest_scores},
                            run.validation, output_dir)  # fmt: skip
        (output_dir / "train_results.json").write_text(
            json.dumps({**metrics, "before_training": state.initial_metrics}, indent=2) + "\n"
        )
        if run.uploader is not None:
            result.hub_errors += upload_final(run, result)
    run.accelerator.wait_for_everyone()
    if training_args.report_to != "none":
        run.accelerator.end_training()
    return result


def upload_final(run: Run, result: TrainResult) -> list[str]:
    """Queues `final/` after the checkpoints and waits at most `--hub_upload_timeout` seconds in total; returns what
    is not on the Hub (still listed in `hub_uploads.json` for the next run; the local folders stay intact)."""
    training_args = run.args.training
    run.uploader.upload(result.final_model_dir, path_in_repo="",
                        commit_message=f"Final model after {result.global_step} steps")  # fmt: skip
    errors = [str(failure) for failure in run.uploader.close(training_args.hub_upload_timeout, raise_on_failure=False)]
    # checkpoints spared while their upload was pending go now, if they made it
    rotate_checkpoints(run.output_dir, training_args.save_total_limit, keep=run.uploader.pending_folders())
    for error in errors:
        logger.error("Not uploaded to the Hub yet: %s", error)
    return errors


def write_run_card(run: Run, result: TrainResult) -> None:
    """The model card of `final/`: what was trained on what, and the before/after table of the tasks."""
    args, data_args = run.args, run.args.data
    sources = ", ".join(f"`{source}`" for source in data_args.image_dataset)
    texts = ", ".join(f"`{source}`" for source in data_args.text_dataset)
    batching = resolve_batching(data_args, run.trainer.unwrapped.config)
    summary = (
        f"Pretrained for {result.global_step} optimizer steps ({args.training.per_device_train_batch_size} images per "
        f"device per step, {batching} batches) on the images of {sources}"
        + (f" and the report sentences of {texts}, labelled by the project's CheXpert labeler" if batching ==
           "decoupled" else " with sentences of their own reports")
        + ". Patients held out by the evaluation tasks were left out. All arguments are in `training_args.json`."
    )  # fmt: skip
    results = {task.task.name: {name.split("/", 1)[1]: value for name, value in result.metrics.items()
                                if name.startswith(f"eval_{task.task.name}/")} for task in run.validation.tasks}  # fmt: skip
    notes = "\n".join(
        f"- `{task.task.name}`: {task.task.description}; {len(task.split.images)} held-out images of "
        f"{len(set(task.split.patient_ids))} patients ({data_args.eval_split_size:.0%} of the corpus's patients, split "
        f"seed {data_args.split_seed}; ids in `eval_splits/{task.task.name}.json`)."
        for task in run.validation.tasks
    )
    if args.model.peft:  # final/ holds an adapter: its card names the base model
        card = adapter_model_card(args.model.model_name_or_path or "a randomly initialised dual encoder", results,
                                  task_type="zero-shot-image-classification",
                                  model_name=args.training.hub_model_id or run.output_dir.name,
                                  description=f"{args.model.peft} adapters on the {' and '.join(args.model.peft_towers)} "
                                  f"tower(s). {summary}")  # fmt: skip
        card.save(result.final_model_dir / "README.md")
        return
    write_model_card(
        result.final_model_dir, run.trainer.unwrapped, results, repo_id=args.training.hub_model_id,
        model_name=None if args.training.hub_model_id else run.output_dir.name,
        results_table=results_table(result) if run.validation else None, training_summary=summary,
        evaluation_notes=notes or None,
    )  # fmt: skip


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the lines of `metrics.jsonl` up to `step` (a resumed run rewrites what came after its checkpoint).

    A torn last line (what a kill or a full disk leaves) is dropped with a warning; a bad line elsewhere is an error.
    """
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines, start=1):
        try:
            entries.append((json.loads(line), line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}, is not JSON ({error}): fix or remove it to resume") from error
            logger.warning("Ignoring the torn last line of %s (a run stopped while writing it): %r", path, line[:200])
    path.write_text("".join(line + "\n" for entry, line in entries if entry["step"] <= step))


def _flat_config(args: PretrainArguments) -> dict:
    """Tracker-friendly hyperparameters: scalars only."""
    values = {}
    for group in (args.model, args.data, args.training):
        for name, value in asdict(group).items():
            if isinstance(value, (int, float, str, bool)) and name not in SECRET_ARGUMENTS:
                values[name] = value
    return values
