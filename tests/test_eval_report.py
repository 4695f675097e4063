"""Tests of `modeling_medclip.eval_report`: tables with confidence intervals and a valid results.json."""

import json
import math

import numpy as np
import pytest

from modeling_medclip.eval_report import (
    comparison_table,
    format_interval,
    label_efficiency_table,
    library_versions,
    write_results_json,
)
from modeling_medclip.metrics import ConfidenceInterval

CI = ConfidenceInterval(0.8123, 0.79, 0.8351, n_resamples=1000)


def test_format_interval():
    assert format_interval(CI) == "0.812 [0.790, 0.835]"
    assert format_interval(0.25) == "0.250"
    assert format_interval(math.nan) == format_interval(None) == "n/a"
    assert format_interval(ConfidenceInterval(math.nan, math.nan, math.nan)) == "n/a"


def test_comparison_table_has_one_column_per_model():
    table = comparison_table({"trained": {"macro_auc": CI, "accuracy": 0.5}, "random-init": {"macro_auc": 0.5}})
    assert table.splitlines() == [
        "| metric | trained | random-init |",
        "|---|---:|---:|",
        "| macro_auc | 0.812 [0.790, 0.835] | 0.500 |",
        "| accuracy | 0.500 | n/a |",
    ]
    with pytest.raises(ValueError, match="no model"):
        comparison_table({})


def test_label_efficiency_table_has_one_row_per_fraction():
    table = label_efficiency_table({"trained": {1.0: CI, 0.01: 0.6}, "random-init": {0.1: 0.55, 0.01: 0.5}})
    assert table.splitlines() == [
        "| labels (macro AUC) | trained | random-init |",
        "|---|---:|---:|",
        "| 1% | 0.600 | 0.500 |",
        "| 10% | n/a | 0.550 |",
        "| 100% | 0.812 [0.790, 0.835] | n/a |",
    ]


def test_results_json_is_valid_json_with_versions(tmp_path):
    path = write_results_json(
        tmp_path / "run" / "results.json",
        {"seed": np.int64(3), "fractions": (0.01, 1.0)},
        {"zero-shot": {"trained": {"macro_auc": CI, "auc/Edema": math.nan, "counts": np.array([1, 2]).tolist()}}},
    )
    payload = json.loads(path.read_text())
    assert payload["config"] == {"seed": 3, "fractions": [0.01, 1.0]}
    result = payload["results"]["zero-shot"]["trained"]
    assert result["macro_auc"] == {"value": 0.8123, "low": 0.79, "high": 0.8351, "confidence": 0.95,
                                   "n_resamples": 1000, "n_skipped": 0}
    assert result["auc/Edema"] is None
    versions = payload["versions"]
    assert versions == library_versions()
    assert versions["torch"].startswith("2.") and versions["evaluate"] != "not installed"
