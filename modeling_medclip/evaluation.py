"""Evaluation of a pretrained dual encoder: zero-shot classification and retrieval, a results table, a model card.

The functions take a model, its processor and plain Python data (images as paths or PIL images, texts, class ids), so
the training loop (periodic validation), `run_eval.py` and the embedded default run share them. [`evaluate_split`]
runs both protocols on one labelled split:

- zero-shot classification with the prompt ensembles of [`generate_prompts`]: accuracy and macro ROC AUC;
- retrieval over the split's distinct texts, ConVIRT's protocol (a retrieved item is relevant when it shares the
  query's class): image->text and image->image Precision@k, plus exact-pair image->text retrieval (the image's own
  report) where pairs exist.
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image

from dataset_scripts.covid_cxr import COVID_CXR_CLASSES, build_covid_cxr

from .metrics import label_relevance, pair_relevance, retrieval_metrics, zero_shot_metrics
from .prompts import generate_prompts
from .retrieval import EmbeddingIndex, embed_images, embed_texts
from .zero_shot import ZeroShotClassifier

# The card template sits at the root of the source tree, beside run_pretrain.py and run_eval.py.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"


@dataclass
class EvaluationSplit:
    """A labelled evaluation split.

    Args:
        images: image file paths or PIL images.
        labels: `(N,)` class ids over `class_names`.
        class_names: the classes, in id order (the keys of the zero-shot prompt sets).
        texts: the report (or note) of each image; `None` or `""` where an image has none.
    """

    images: list
    labels: list[int]
    class_names: list[str]
    texts: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.texts and len(self.texts) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.texts)} texts")


def load_images(images: Sequence) -> list[Image.Image]:
    """Opens image paths (PIL images pass through); the processor decodes every mode, 16-bit and DICOM included."""
    return [image if isinstance(image, Image.Image) else Image.open(image) for image in images]


@torch.no_grad()
def evaluate_zero_shot(
    model, processor, split: EvaluationSplit, class_prompts: dict[str, list[str]], batch_size: int = 32,
    image_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot accuracy and macro AUC of `class_prompts` (one prompt list per class, in `split.class_names` order)."""
    if list(class_prompts) != list(split.class_names):
        raise ValueError(f"prompt classes {list(class_prompts)} differ from the split's {split.class_names}")
    classifier = ZeroShotClassifier(model, processor, class_prompts, batch_size=batch_size)
    if image_embeddings is None:
        image_embeddings = classifier.encode_images(load_images(split.images))
    probs = classifier.classify_embeddings(image_embeddings).probs
    metrics = zero_shot_metrics(probs, split.labels, split.class_names)
    return {"zero_shot_accuracy": metrics["accuracy"], "zero_shot_macro_auc": metrics["macro_auc"]}


@torch.no_grad()
def evaluate_retrieval(
    model, processor, split: EvaluationSplit, ks: Sequence[int] = (1, 5, 10), batch_size: int = 32,
    image_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image->text (class agreement and exact pair) and image->image (class agreement) retrieval metrics.

    The text gallery is the split's distinct non-empty texts, each labelled with the class of its images (texts shared
    by images of different classes are dropped from the class-agreement protocol's gallery).
    """
    if image_embeddings is None:
        image_embeddings = embed_images(model, processor, load_images(split.images), batch_size)
    labels = torch.as_tensor(split.labels)
    results = {}
    max_k = max(ks)

    gallery = EmbeddingIndex(image_embeddings, ids=[str(i) for i in range(len(labels))])
    if len(gallery) > 1:
        _, indices = gallery.search(image_embeddings, min(max_k + 1, len(gallery)))
        indices = indices[:, 1:]  # every query retrieves itself first
        relevant = label_relevance(labels, labels)
        for name, value in retrieval_metrics(indices, relevant, [k for k in ks if k < len(gallery)]).items():
            results[f"image_to_image_{name}"] = value

    if split.texts:
        text_classes: dict[str, set[int]] = {}
        for text, label in zip(split.texts, split.labels):
            if text and text.strip():
                text_classes.setdefault(text, set()).add(int(label))
        texts = list(text_classes)
        if len(texts) > 1:
            text_embeddings = embed_texts(model, processor, texts, batch_size)
            index = EmbeddingIndex(text_embeddings, ids=[str(i) for i in range(len(texts))])
            k = min(max_k, len(texts))
            _, indices = index.search(image_embeddings, k)
            usable_ks = [value for value in ks if value <= k]
            # class agreement: texts whose images all share one class
            text_labels = torch.tensor([next(iter(c)) if len(c) == 1 else -1 for c in text_classes.values()])
            relevant = label_relevance(labels, text_labels)
            for name, value in retrieval_metrics(indices, relevant, usable_ks).items():
                results[f"image_to_text_{name}"] = value
            # exact pair: the image's own report, for images that have one
            has_text = [i for i, text in enumerate(split.texts) if text and text.strip()]
            pair_ids = [split.texts[i] for i in has_text]
            relevant = pair_relevance(pair_ids, texts)
            for name, value in retrieval_metrics(indices[has_text], relevant, usable_ks).items():
                results[f"image_to_own_text_{name}"] = value
    return results


def evaluate_split(
    model, processor, split: EvaluationSplit, class_prompts: dict[str, list[str]], ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 32, pixel_values: torch.Tensor | None = None,
) -> dict[str, float]:
    """Zero-shot and retrieval metrics of one split, the images encoded once for both.

    `pixel_values` `(N, C, H, W)`: the split's images already preprocessed by `processor` (the training loop
    preprocesses its held-out split once and evaluates it many times); by default they are read from `split.images`.
    """
    model.eval()
    images = pixel_values if pixel_values is not None else load_images(split.images)
    image_embeddings = embed_images(model, processor, images, batch_size)
    results = evaluate_zero_shot(model, processor, split, class_prompts, batch_size, image_embeddings)
    results.update(evaluate_retrieval(model, processor, split, ks, batch_size, image_embeddings))
    results["num_images"] = len(split.images)
    return results


def covid_cxr_split(root: str | os.PathLike, split: str = "test", test_size: float = 0.2, seed: int = 0):
    """The patient-disjoint `split` of the COVID-19 collection (`shared/data/covid-cxr/` layout) as an
    [`EvaluationSplit`] over COVID-19 / other pneumonia / no finding, with the clinical notes as texts."""
    examples = list(build_covid_cxr(root, split=split, test_size=test_size, seed=seed))
    return EvaluationSplit(
        images=[example["image"] for example in examples],
        labels=[example["labels"] for example in examples],
        class_names=list(COVID_CXR_CLASSES),
        texts=[example["text"] for example in examples],
    )


def covid_prompts(class_names: Sequence[str], n_per_class: int = 10, seed: int = 0) -> dict[str, list[str]]:
    """The built-in COVID-19 / other pneumonia / no finding prompt ensembles, keyed by `class_names` (same order)."""
    prompts = generate_prompts("covid", n_per_class=n_per_class, seed=seed)
    if len(prompts) != len(class_names):
        raise ValueError(f"{len(prompts)} prompt classes for {len(class_names)} split classes")
    return dict(zip(class_names, prompts.values()))


def format_results_table(columns: dict[str, dict[str, float]], metrics: Sequence[str] | None = None) -> str:
    """A Markdown table with one row per metric and one column per run (e.g. `{"random init": ..., "trained": ...}`)."""
    names = list(columns)
    if metrics is None:
        metrics = [key for key in columns[names[0]] if isinstance(columns[names[0]][key], float)]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for metric in metrics:
        cells = []
        for name in names:
            value = columns[name].get(metric)
            cells.append("n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_model_card(
    output_dir: str | os.PathLike,
    model,
    results: dict[str, float] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    dataset_name: str = "covid-cxr",
    results_table: str | None = None,
    training_summary: str | None = None,
    evaluation_notes: str | None = None,
    limitations: str | None = None,
    template_path: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> Path:
    """Fills `model_card.md` (a Jinja template read by `huggingface_hub.ModelCard.from_template`) into
    `output_dir/README.md`, with the results as Hub `model-index` metadata. The model is named `model_name`, else
    after `repo_id`, else after `output_dir`."""
    config = model.config
    architecture = {"medclip": "MedCLIP", "convirt": "ConVIRT"}.get(config.model_type, config.model_type)
    eval_results = [
        EvalResult(
            task_type="zero-shot-image-classification",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type=name,
            metric_value=round(float(value), 4),
        )
        for name, value in (results or {}).items()
        if isinstance(value, float) and not math.isnan(value)
    ]
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else Path(output_dir).name)
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=["medical", "chest-x-ray", "radiology", architecture.lower(), "contrastive-learning"],
        model_name=model_name,
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        architecture=architecture,
        vision_tower=config.vision_config.model_type,
        text_tower=config.text_config.model_type,
        projection_dim=config.projection_dim,
        text_pooling=config.text_pooling,
        loss_type=config.loss_type,
        repo_id=repo_id or str(output_dir),
        results_table=results_table,
        training_summary=training_summary,
        evaluation_notes=evaluation_notes,
        limitations=limitations,
    )
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


__all__ = [
    "EvaluationSplit",
    "covid_cxr_split",
    "covid_prompts",
    "evaluate_retrieval",
    "evaluate_split",
    "evaluate_zero_shot",
    "format_results_table",
    "load_images",
    "write_model_card",
]
