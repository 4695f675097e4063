"""Benchmark the rule-based CheXpert labeler: agreement with the Stanford CheXpert labeler, MeSH F1 and speed.

Agreement: `CheXpertLabeler.label_report` is run on every row of the development part of
``chexpert-labeler-iu/`` (the Stanford labeler's own output on IU X-ray text; ``sentences-dev.csv``, one sentence a
row, and ``reports-dev.csv``, one report a row; each row is labelled as the Stanford labeler labelled it, as one
report) and scored as that folder's README says: per value (positive / negative / uncertain) F1 per finding and
micro-F1 over the 13 findings, No Finding left out. The rows are also split by a hash of their text into a tuning
part and a held-out part (``md5(text) % 4 == 0``, about a quarter) to show that the rules generalise: the two
micro-F1s should be within 0.02.

MeSH: per-class F1 of the positive labels against the MeSH-derived ``mesh_<class>`` columns of
``iu-xray-reports/reports.csv`` (MeSH follows other conventions: a sanity check, not a target).

Speed: reports/s of `CheXpertLabeler.label_report` over all non-empty IU reports on one process, next to the bare
cost of `split_sentences` + `tokenize` measured in the same run, as a ratio.

Usage::

    python benchmarks/bench_labeler.py [--data /path/to/shared/data] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import platform
import time
from pathlib import Path

from sklearn.metrics import f1_score

from dataset_scripts.paths import shared_data_dir
from modeling_medclip.labeler import (
    CHEXPERT_CLASSES,
    CheXpertLabeler,
    agreement_f1,
    read_labeled_csv,
    split_sentences,
    tokenize,
)


FINDINGS = CHEXPERT_CLASSES[1:]
VALUES = ((1.0, "positive"), (0.0, "negative"), (-1.0, "uncertain"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def is_held_out(text: str) -> bool:
    """The own held-out part used while tuning: about a quarter of the rows, chosen by a hash of the text."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % 4 == 0


def print_agreement(title: str, rows, predicted) -> None:
    reference = [labels for _, labels in rows]
    scores = agreement_f1(reference, predicted)
    print(f"\n{title}: {len(rows)} distinct rows")
    print(f"{'finding':28s} " + " ".join(f"{name:>9s} {'n':>4s}" for _, name in VALUES))
    for name in (*FINDINGS, "micro"):
        cells = []
        for value, _ in VALUES:
            support = sum(labels[name] == value for labels in reference) if name != "micro" else sum(
                labels[finding] == value for labels in reference for finding in FINDINGS
            )
            cells.append(f"{scores[value][name]:9.3f} {support:4d}")
        print(f"{name:28s} " + " ".join(cells))
    held = [index for index, (text, _) in enumerate(rows) if is_held_out(text)]
    tune = [index for index, (text, _) in enumerate(rows) if not is_held_out(text)]
    for part, indices in (("tune", tune), ("own held-out", held)):
        part_scores = agreement_f1([reference[i] for i in indices], [predicted[i] for i in indices])
        micro = " / ".join(f"{part_scores[value]['micro']:.3f}" for value, _ in VALUES)
        print(f"  micro-F1 pos / neg / unc on {part:12s} ({len(indices):4d} rows): {micro}")


def print_mesh_table(labeler: CheXpertLabeler, reports_csv: Path) -> None:
    with reports_csv.open(newline="", encoding="utf-8") as source:
        rows = [row for row in csv.DictReader(source) if row["text"].strip() and row["mesh_no_finding"] != ""]
    predicted = [labeler.label_report(row["text"]) for row in rows]
    print(f"\nPositive labels vs IU MeSH ({len(rows)} indexed reports; uncertain counted as not positive)")
    print(f"{'class':28s} {'support':>7s} {'F1':>6s}")
    for name in CHEXPERT_CLASSES:
        column = "mesh_" + name.lower().replace(" ", "_")
        truth = [int(row[column]) for row in rows]
        guess = [int(labels[name] == 1.0) for labels in predicted]
        print(f"{name:28s} {sum(truth):7d} {f1_score(truth, guess, zero_division=0):6.3f}")


def best_seconds(function, texts: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for text in texts:
            function(text)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=shared_data_dir(), help="the shared data folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    labeler = CheXpertLabeler()
    print(f"CPU: {cpu_model()} (one process)")
    for level, file_name in (("Sentences", "sentences-dev.csv"), ("Reports", "reports-dev.csv")):
        rows = read_labeled_csv(args.data / "chexpert-labeler-iu" / file_name)
        predicted = [labeler.label_report(text) for text, _ in rows]
        print_agreement(f"{level} vs the CheXpert labeler (F1 per value)", rows, predicted)

    reports_csv = args.data / "iu-xray-reports" / "reports.csv"
    print_mesh_table(labeler, reports_csv)

    with reports_csv.open(newline="", encoding="utf-8") as source:
        texts = [row["text"] for row in csv.DictReader(source) if row["text"].strip()]
    seconds = best_seconds(labeler.label_report, texts, args.repeats)
    baseline = best_seconds(lambda text: [tokenize(s) for s in split_sentences(text)], texts, args.repeats)
    print(f"\nSpeed over {len(texts)} non-empty IU reports (best of {args.repeats}):")
    print(f"  CheXpertLabeler.label_report : {len(texts) / seconds:8.0f} reports/s")
    print(f"  split_sentences + tokenize   : {len(texts) / baseline:8.0f} reports/s "
          f"(the labeler takes {seconds / baseline:.1f}x its time)")


if __name__ == "__main__":
    main()
