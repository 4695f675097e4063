"""Fine-tuning a dual encoder's image tower end to end as a classifier, with a fraction of the training labels.

The data-efficiency protocol of ConVIRT's fine-tuning experiments, beside the linear probe
([`modeling_medclip.linear_probe`]), on the same patient split and the same label draws: for every label fraction
and seed, a `...ForImageClassification` model (the pretrained vision tower, or the untrained architecture for
`random-init`, and a new linear head) is trained on `fraction` of the fit part's images and scores the test images.
Every run takes at least `min_steps` optimizer steps (a 1% draw of a few dozen images would otherwise train its new
head for a handful of steps), in whole epochs. About `num_train_epochs` times per run, evenly spaced, the model
scores the validation patients (macro ROC AUC); the weights of the best of those epochs are kept, as the probe keeps
its best regularisation, so the length of a run is an upper bound rather than a guess.

The training loop is transformers' `Trainer` (which runs on Accelerate), with this package's optimizer and schedule
([`build_optimizer`]: AdamW groups with the head at `head_learning_rate`; [`build_scheduler`]:
`transformers.get_scheduler`); images are decoded in DataLoader workers; no checkpoint is written (the best epoch's
weights are held in memory).
"""

import math
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import PartialState
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from ..evaluation import load_images
from ..linear_probe import (
    DEFAULT_SEEDS,
    LABEL_FRACTIONS,
    LabelEfficiencyResult,
    ProbeRun,
    label_fraction,
    patient_split,
    summarise_fraction,
    validation_score,
)
from ..metrics import classification_metrics
from ..protocols import image_loader
from .arguments import OptimizationArguments
from .optim import build_optimizer, build_scheduler


@dataclass
class FineTuneSettings:
    """Training settings of every fine-tuning run (the optimizer fields keep [`OptimizationArguments`]' names)."""

    num_train_epochs: float = 5.0
    min_steps: int = 100
    per_device_train_batch_size: int = 16
    learning_rate: float = 1e-4
    head_learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    num_workers: int = 2
    bf16: bool = False

    def steps_per_epoch(self, num_images: int) -> int:
        return math.ceil(num_images / self.per_device_train_batch_size)

    def epochs(self, num_images: int) -> float:
        """Epochs a run over `num_images` images trains: `num_train_epochs`, or enough whole epochs for
        `min_steps` optimizer steps."""
        return max(self.num_train_epochs, math.ceil(self.min_steps / self.steps_per_epoch(num_images)))

    def optimization_arguments(self) -> OptimizationArguments:
        return OptimizationArguments(
            learning_rate=self.learning_rate, head_learning_rate=self.head_learning_rate,
            weight_decay=self.weight_decay, lr_scheduler_type=self.lr_scheduler_type, warmup_steps=self.warmup_steps,
            num_train_epochs=self.num_train_epochs, per_device_train_batch_size=self.per_device_train_batch_size,
        )  # fmt: skip


class _LabelledImages(torch.utils.data.Dataset):
    def __init__(self, images: Sequence, labels: np.ndarray):
        self.images, self.labels = list(images), labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": self.labels[index]}


class _Collate:
    """Decodes and preprocesses a batch in the DataLoader worker; labels as class ids or float multi-hot rows."""

    def __init__(self, processor):
        self.image_processor = getattr(processor, "image_processor", processor)

    def __call__(self, examples: list[dict]) -> dict:
        images = list(load_images([e["image"] for e in examples], self.image_processor))
        pixel_values = self.image_processor(images=images, return_tensors="pt")
        labels = np.stack([e["label"] for e in examples])
        labels = torch.as_tensor(labels, dtype=torch.float32 if labels.ndim == 2 else torch.long)
        return {"pixel_values": pixel_values["pixel_values"], "labels": labels}


class _KeepBestEpoch(TrainerCallback):
    """Every `every` epochs and after the last one, scores the validation images and keeps a copy of the weights of
    the best epoch so far."""

    def __init__(self, score: Callable[[torch.nn.Module], float], every: int, last: int):
        self.score, self.every, self.last = score, every, last
        self.best_epoch, self.best_score, self.best_state = None, -math.inf, None

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(state.epoch)
        if epoch % self.every and epoch != self.last:
            return
        score = self.score(model.eval())
        model.train()
        if score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            self.best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def train_classifier(classifier, processor, images: Sequence, labels: np.ndarray, settings: FineTuneSettings,
                     seed: int = 0, validation: tuple[Sequence, np.ndarray] | None = None) -> dict:
    """Trains `classifier` on `images` / `labels` for `settings.epochs(len(images))` with the package's optimizer
    and schedule and leaves it in eval mode. With `validation` (images, labels), it ends with the weights of the
    scored epoch (see the module docstring) that did best on them ([`validation_score`]).

    Returns:
        `{"epoch": the kept epoch, "validation_score": its score}` (the last epoch and `None` without validation).
    """
    epochs = settings.epochs(len(images))
    num_steps = max(1, math.ceil(settings.steps_per_epoch(len(images)) * epochs))
    optimization = settings.optimization_arguments()
    optimizer = build_optimizer(classifier, optimization)
    scheduler = build_scheduler(optimizer, optimization, num_steps)
    callbacks = []
    if validation is not None:
        val_labels = np.asarray(validation[1])
        loader = image_loader(processor, validation[0], num_workers=settings.num_workers)
        val_pixels = [batch["pixel_values"] for batch in loader]
        every = max(1, math.ceil(epochs / math.ceil(settings.num_train_epochs)))
        callbacks.append(_KeepBestEpoch(lambda model: validation_score(
            _probabilities(model, val_pixels, val_labels.ndim == 2), val_labels
        ), every, math.ceil(epochs)))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="medclip-fine-tune-") as scratch:
        arguments = TrainingArguments(
            output_dir=scratch, num_train_epochs=epochs,
            per_device_train_batch_size=settings.per_device_train_batch_size, seed=seed, data_seed=seed,
            dataloader_num_workers=settings.num_workers, bf16=settings.bf16, save_strategy="no", report_to="none",
            logging_strategy="no", disable_tqdm=True, remove_unused_columns=False, max_grad_norm=1.0,
            dataloader_pin_memory=False, use_cpu=PartialState().device.type == "cpu",
        )  # fmt: skip
        trainer = Trainer(
            model=classifier, args=arguments, train_dataset=_LabelledImages(images, labels),
            data_collator=_Collate(processor), optimizers=(optimizer, scheduler), callbacks=callbacks,
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)  # no summary line per run (logging_strategy="no" logs nothing else)
        trainer.train()
    if not callbacks:
        return {"epoch": math.ceil(epochs), "validation_score": None}
    keeper = callbacks[0]
    classifier.load_state_dict(keeper.best_state)
    classifier.eval()
    return {"epoch": keeper.best_epoch, "validation_score": float(keeper.best_score)}


@torch.no_grad()
def classifier_scores(classifier, processor, images: Sequence, multilabel: bool, batch_size: int = 32,
                      num_workers: int = 2, autocast: torch.dtype | None = None) -> np.ndarray:
    """`(N, C)` class probabilities (softmax, or sigmoid per class when multi-label) of `images`."""
    batches = (batch["pixel_values"] for batch in image_loader(processor, images, batch_size, num_workers))
    return _probabilities(classifier, batches, multilabel, autocast)


@torch.no_grad()
def _probabilities(classifier, batches: Iterable[torch.Tensor], multilabel: bool,
                   autocast: torch.dtype | None = None) -> np.ndarray:
    """`(N, C)` class probabilities of batches of pixel values (the validation images are decoded once per run)."""
    device = next(classifier.parameters()).device
    chunks = []
    for pixel_values in batches:
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = classifier(pixel_values=pixel_values.to(device)).logits.float()
        chunks.append(logits.sigmoid() if multilabel else logits.softmax(dim=-1))
    return torch.cat(chunks).cpu().numpy()


def run_fine_tune(
    build_classifier: Callable[[int], torch.nn.Module],
    processor,
    train_images: Sequence, train_labels, train_groups,
    test_images: Sequence, test_labels, test_groups,
    *,
    settings: FineTuneSettings | None = None,
    fractions: Sequence[float] = LABEL_FRACTIONS,
    seeds: Mapping[float, int] | None = None,
    validation_size: float = 0.2,
    split_seed: int = 0,
    class_names: Sequence[str] | None = None,
    image_ids: Sequence[str] | None = None,
    n_resamples: int = 1000,
    ci_seed: int = 0,
    autocast: torch.dtype | None = None,
) -> LabelEfficiencyResult:
    """Fine-tuning at every label fraction, with the linear probe's split and label draws.

    Args:
        build_classifier: `seed -> classifier` (a fresh `...ForImageClassification` model per run).
        processor: the image processor (or a processor holding one).
        train_images, train_labels, train_groups: the training patients' images, `(N,)` class ids or `(N, C)` 0/1
            rows, and patient ids. Split like the probe's: labels are drawn from the fit part, and the validation
            patients choose each run's epoch.
        test_images, test_labels, test_groups: the test patients, scored with patient-level bootstrap CIs.
        settings: the training settings of every run (`num_train_epochs` and `min_steps`: how long a run trains).
        fractions, seeds, validation_size, split_seed: as [`run_linear_probe`].
        class_names, image_ids: class names for the per-class keys; ids of the training images for the split ids.
        n_resamples, ci_seed, autocast: bootstrap settings; autocast dtype of the test scoring.

    Returns:
        [`LabelEfficiencyResult`], its `split_ids` holding the fit and validation image ids.
    """
    settings = settings or FineTuneSettings()
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    ids = [str(i) for i in (image_ids if image_ids is not None else range(len(train_images)))]
    seeds = {**DEFAULT_SEEDS, **(seeds or {})}
    fit, validation = patient_split(train_labels, train_groups, validation_size, split_seed)
    results = []
    for fraction in fractions:
        runs, seed_scores = [], []
        for seed in range(seeds.get(fraction, 1)):
            chosen = fit[label_fraction(train_labels[fit], fraction, seed)]
            torch.manual_seed(seed)
            classifier = build_classifier(seed)
            kept = train_classifier(
                classifier, processor, [train_images[i] for i in chosen], train_labels[chosen], settings, seed,
                validation=([train_images[i] for i in validation], train_labels[validation]),
            )  # fmt: skip
            scores = classifier_scores(classifier, processor, test_images, test_labels.ndim == 2,
                                       num_workers=settings.num_workers, autocast=autocast)  # fmt: skip
            metrics = classification_metrics(scores, test_labels, class_names)
            runs.append(ProbeRun(fraction, seed, {"epoch": kept["epoch"]}, len(chosen), kept["validation_score"],
                                 metrics, [ids[i] for i in chosen]))  # fmt: skip
            seed_scores.append(scores)
        results.append(summarise_fraction(
            fraction, runs, seed_scores, test_labels, test_groups, class_names, n_resamples, ci_seed
        ))  # fmt: skip
    split_ids = {"fit": [ids[i] for i in fit], "validation": [ids[i] for i in validation]}
    return LabelEfficiencyResult(results, split_ids)


__all__ = ["FineTuneSettings", "classifier_scores", "run_fine_tune", "train_classifier"]
