"""Model cards: a filled-in template for a trained model, and evaluation results merged into an existing card.

The template (`model_card_template.md`, a Jinja template for `huggingface_hub.ModelCard.from_template`) is package
data, so a wheel install writes cards too. Results become Hub `model-index` eval results (task, dataset, metric,
value). [`write_model_card`] writes a new card (a training run's `final/README.md`); [`merge_evaluation`] adds an
evaluation to a card that exists (`run_eval.py` on a trained folder), keeping its training section and tables and
replacing only the results of the datasets it evaluated again.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


TEMPLATE_NAME = "model_card_template.md"
EVALUATION_HEADING = "## Evaluation"


def template_path() -> Path:
    """The card template shipped inside the package."""
    return Path(str(resources.files("modeling_medclip").joinpath(TEMPLATE_NAME)))


def eval_results(
    results: dict[str, float], dataset_name: str, task_type: str = "zero-shot-image-classification"
) -> list[EvalResult]:
    """Hub eval results of the finite float metrics of `results`, all on `dataset_name` and of `task_type` (a Hub
    task id: `zero-shot-image-classification`, `image-classification`, `image-to-text`, ...)."""
    return [
        EvalResult(
            task_type=task_type,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type=name,
            metric_value=round(float(value), 4),
        )
        for name, value in results.items()
        if isinstance(value, float) and not math.isnan(value)
    ]


def write_model_card(
    output_dir: str | os.PathLike,
    model,
    results: dict[str, dict[str, float]] | None = None,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    results_table: str | None = None,
    training_summary: str | None = None,
    evaluation_notes: str | None = None,
    limitations: str | None = None,
) -> Path:
    """Fills the template into `output_dir/README.md`.

    Args:
        results: `{dataset_name: {metric: value}}`, written as `model-index` eval results.
        repo_id, model_name: the model is named `model_name`, else after `repo_id`, else after `output_dir`.
        results_table, training_summary, evaluation_notes, limitations: Markdown sections of the card.
    """
    config = model.config
    architecture = {"medclip": "MedCLIP", "convirt": "ConVIRT"}.get(config.model_type, config.model_type)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else Path(output_dir).name)
    entries = [entry for dataset, values in (results or {}).items() for entry in eval_results(values, dataset)]
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        tags=["medical", "chest-x-ray", "radiology", architecture.lower(), "contrastive-learning"],
        model_name=model_name,
        eval_results=entries or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
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


def merge_evaluation(
    card_path: str | os.PathLike,
    results: dict[str, dict[str, float]],
    *,
    title: str,
    results_table: str,
    notes: str | None = None,
    task_type: str = "zero-shot-image-classification",
    images: Sequence[str] = (),
) -> Path:
    """Adds an evaluation to the card at `card_path`: its `model-index` results replace those of the same task type
    and dataset (an older evaluation of that dataset; other task types and datasets are kept), and a `### {title}`
    subsection (table, notes and the `images`, paths relative to the card's folder) is added under the card's
    Evaluation section, replacing a subsection of the same title."""
    card_path = Path(card_path)
    card = ModelCard.load(card_path)
    kept = [
        entry for entry in card.data.eval_results or []
        if not (entry.task_type == task_type and entry.dataset_name in results)
    ]  # fmt: skip
    card.data.eval_results = kept + [
        entry for dataset, values in results.items() for entry in eval_results(values, dataset, task_type)
    ]
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = card_path.parent.name
    figures = "".join(f"\n![{Path(image).stem}]({image})\n" for image in images)
    section = f"### {title}\n\n{results_table}\n" + (f"\n{notes}\n" if notes else "") + figures
    text = card.text
    existing = re.compile(rf"^### {re.escape(title)}\n.*?(?=^##|\Z)", flags=re.MULTILINE | re.DOTALL)
    if existing.search(text):
        text = existing.sub(lambda _: section + "\n", text, count=1)
    elif EVALUATION_HEADING + "\n" in text:
        start = text.index(EVALUATION_HEADING + "\n")
        following = re.search(r"^## ", text[start + len(EVALUATION_HEADING) :], flags=re.MULTILINE)
        end = start + len(EVALUATION_HEADING) + following.start() if following else len(text)
        text = text[:end].rstrip("\n") + "\n\n" + section + "\n" + text[end:]
    else:
        text = text.rstrip("\n") + f"\n\n{EVALUATION_HEADING}\n\n{section}"
    card.text = text
    card.save(card_path)
    return card_path


__all__ = ["eval_results", "merge_evaluation", "template_path", "write_model_card"]
