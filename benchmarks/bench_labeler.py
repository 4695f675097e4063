"""Benchmark the rule-based CheXpert labeler on the real IU X-ray reports.

Quality: per-class precision / recall / F1 of the labeler's positive labels against the MeSH-derived ``mesh_<class>``
columns of ``iu-xray-reports/reports.csv`` (reports with empty text and ``No Indexing`` reports excluded; MeSH lists
only positives, so only positive mentions can be scored). Two variants: uncertain counted as not positive (main
table), and uncertain counted as positive. A naive baseline measured in the same run (a mention phrase anywhere in
the report = positive, no negation or uncertainty) is scored next to it.

Speed: reports/s of `CheXpertLabeler.label_report` over all 3,851 reports (empty ones skipped), next to the bare cost
of `split_sentences` + `tokenize` and the naive labeler, as ratios.

Usage::

    python benchmarks/bench_labeler.py [--data /path/to/iu-xray-reports] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from modeling_medclip.labeler import (
    CHEXPERT_CLASSES,
    PHRASES_DIR,
    CheXpertLabeler,
    read_phrase_file,
    split_sentences,
    tokenize,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    shared = Path(os.environ.get("MEDCLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return shared / "iu-xray-reports"


def mesh_column(name: str) -> str:
    return "mesh_" + name.lower().replace(" ", "_")


def load_iu_reports(data_dir: Path) -> tuple[list[str], list[str], np.ndarray]:
    """All report texts, and the (text, MeSH label matrix) of the scorable ones.

    Returns:
        all_texts (`list[str]`): every row's text (3,851, some empty).
        texts (`list[str]`): texts of indexed reports with non-empty text.
        mesh (`np.ndarray` of shape `(len(texts), 14)`): MeSH-derived 0/1 labels in `CHEXPERT_CLASSES` order.
    """
    path = data_dir / "reports.csv"
    with path.open(newline="", encoding="utf-8") as source:
        rows = list(csv.DictReader(source))
    all_texts = [row["text"] for row in rows]
    scorable = [row for row in rows if row["text"].strip() and row[mesh_column("No Finding")] != ""]
    mesh = np.array([[int(row[mesh_column(name)]) for name in CHEXPERT_CLASSES] for row in scorable])
    return all_texts, [row["text"] for row in scorable], mesh


class NaiveLabeler:
    """Baseline: an observation is positive when one of its mention phrases occurs anywhere in the lowercased
    report (wildcards become prefix matches); no negation, uncertainty or sentence splitting."""

    def __init__(self):
        sections = read_phrase_file(PHRASES_DIR / "mentions.txt")
        patterns = {}
        for section, phrases in sections.items():
            name = section.split(":")[0].strip()
            if name in CHEXPERT_CLASSES and ":" not in section:
                alternatives = [re.escape(phrase).replace(r"\*", r"\w*") for phrase in phrases]
                patterns[name] = re.compile(r"\b(?:" + "|".join(alternatives) + r")\b")
        self.patterns = patterns

    def label_vector(self, text: str) -> list[float]:
        lowered = text.lower()
        found = {name: bool(pattern.search(lowered)) for name, pattern in self.patterns.items()}
        no_finding = not any(found[name] for name in found if name != "Support Devices")
        return [float(no_finding)] + [float(found.get(name, False)) for name in CHEXPERT_CLASSES[1:]]


def score_table(predicted: np.ndarray, mesh: np.ndarray) -> list[tuple[str, float, float, float, int]]:
    precision, recall, f1, support = precision_recall_fscore_support(mesh, predicted, average=None, zero_division=0)
    return list(zip(CHEXPERT_CLASSES, precision, recall, f1, support))


def print_table(title: str, rows, baseline_rows=None) -> None:
    print(f"\n{title}")
    header = f"{'class':28s} {'support':>7s} {'P':>6s} {'R':>6s} {'F1':>6s}"
    if baseline_rows is not None:
        header += f" {'naive F1':>9s}"
    print(header)
    for index, (name, precision, recall, f1, support) in enumerate(rows):
        line = f"{name:28s} {support:7d} {precision:6.3f} {recall:6.3f} {f1:6.3f}"
        if baseline_rows is not None:
            line += f" {baseline_rows[index][3]:9.3f}"
        print(line)
    supported = [row for row in rows if row[4] >= 50]
    print(f"{'macro F1 (support >= 50)':28s} {'':7s} {'':6s} {'':6s} {np.mean([row[3] for row in supported]):6.3f}")


def time_per_report(function, texts: list[str], repeats: int) -> float:
    """Best-of-``repeats`` seconds per pass of ``function`` over ``texts``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            function(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(), help="the iu-xray-reports folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    all_texts, texts, mesh = load_iu_reports(args.data)
    labeler = CheXpertLabeler()
    naive = NaiveLabeler()

    labels = [labeler.label_report(text) for text in texts]
    raw = np.array([[np.nan if label[name] is None else label[name] for name in CHEXPERT_CLASSES] for label in labels])
    strict = (raw == 1.0).astype(int)
    lenient = np.isin(raw, (1.0, -1.0)).astype(int)
    naive_predicted = np.array([naive.label_vector(text) for text in texts], dtype=int)

    print(f"IU X-ray reports: {len(all_texts)} rows, {len(texts)} scored (non-empty text, MeSH-indexed)")
    naive_rows = score_table(naive_predicted, mesh)
    print_table("Positive mentions vs MeSH (uncertain counted as NOT positive)", score_table(strict, mesh), naive_rows)
    print_table("Positive mentions vs MeSH (uncertain counted as positive)", score_table(lenient, mesh), naive_rows)

    non_empty = [text for text in all_texts if text.strip()]
    seconds = time_per_report(labeler.label_report, non_empty, args.repeats)
    split_seconds = time_per_report(lambda text: [tokenize(s) for s in split_sentences(text)], non_empty, args.repeats)
    naive_seconds = time_per_report(naive.label_vector, non_empty, args.repeats)
    print(f"\nSpeed over {len(non_empty)} non-empty reports of {len(all_texts)} (best of {args.repeats}, 1 process):")
    print(f"  CheXpertLabeler.label_report : {len(non_empty) / seconds:9.0f} reports/s")
    print(
        f"  split_sentences + tokenize   : {len(non_empty) / split_seconds:9.0f} reports/s "
        f"(labeler takes {seconds / split_seconds:.1f}x its time)"
    )
    print(
        f"  naive substring labeler      : {len(non_empty) / naive_seconds:9.0f} reports/s "
        f"(labeler takes {seconds / naive_seconds:.1f}x its time)"
    )


if __name__ == "__main__":
    main()
