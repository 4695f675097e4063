"""Results of an evaluation run as files people read: `results.json`, Markdown tables with confidence intervals.

- [`comparison_table`]: one row per metric, one column per model (the side-by-side table);
- [`label_efficiency_table`]: one row per label fraction, one column per model (linear probe, fine-tune);
- [`write_results_json`]: the run's configuration, library versions, seeds and every metric with its interval, with
  [`ConfidenceInterval`]s as `{value, low, high, ...}` objects and nan as `null` (valid JSON).
"""

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from .metrics import ConfidenceInterval

VERSIONED_PACKAGES = (
    "medclip-hf", "torch", "transformers", "datasets", "accelerate", "evaluate", "scikit-learn", "numpy",
    "huggingface-hub",
)  # fmt: skip


def format_interval(value) -> str:
    """`0.812 [0.790, 0.835]` for a [`ConfidenceInterval`] (`0.812 [CI n/a]` without bounds), `0.812` for a float,
    `n/a` for a missing or nan value."""
    if isinstance(value, ConfidenceInterval):
        if math.isnan(value.value):
            return "n/a"
        bounds = "CI n/a" if math.isnan(value.low) else f"{value.low:.3f}, {value.high:.3f}"
        return f"{value.value:.3f} [{bounds}]"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(columns: Mapping[str, Mapping[str, object]], metrics: Sequence[str] | None = None) -> str:
    """Markdown table, one row per metric and one column per model, e.g. `{"random-init": {"macro_auc": ci}, ...}`;
    the metrics default to those of the first model, in its order."""
    names = list(columns)
    if not names:
        raise ValueError("`columns` is empty: no model to tabulate")
    metrics = list(metrics or columns[names[0]])
    rows = [[metric] + [format_interval(columns[name].get(metric)) for name in names] for metric in metrics]
    return _markdown(["metric", *names], rows)


def label_efficiency_table(columns: Mapping[str, Mapping[float, object]], metric: str = "macro AUC") -> str:
    """Markdown table, one row per label fraction (in %) and one column per model, e.g.
    `{"pretrained": {0.01: ci, 0.1: ci, 1.0: ci}, "random-init": {...}}`."""
    names = list(columns)
    if not names:
        raise ValueError("`columns` is empty: no model to tabulate")
    fractions = sorted({fraction for points in columns.values() for fraction in points})
    rows = [
        [f"{100 * fraction:g}%"] + [format_interval(columns[name].get(fraction)) for name in names]
        for fraction in fractions
    ]
    return _markdown([f"labels ({metric})", *names], rows)


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries a result depends on (`"not installed"` for a missing one)."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _jsonable(value):
    if isinstance(value, ConfidenceInterval):
        return _jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_results_json(path: str | os.PathLike, config: Mapping, results: Mapping) -> Path:
    """Writes `{"config": ..., "versions": ..., "results": ...}` to `path` (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": _jsonable(config), "versions": library_versions(), "results": _jsonable(results)}
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path


__all__ = [
    "comparison_table",
    "format_interval",
    "label_efficiency_table",
    "library_versions",
    "write_results_json",
]
