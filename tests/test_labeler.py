"""Tests for the rule-based CheXpert-style labeler, on real IU X-ray report sentences."""

import csv
import math
import shutil
import subprocess
import sys

import pytest
from sklearn.metrics import f1_score

from modeling_medclip.labeler import (
    CHEXPERT_CLASSES,
    CheXpertLabeler,
    add_label_column,
    agreement_f1,
    escape_formula,
    labels_to_vector,
    main,
    read_labeled_csv,
    split_sentences,
    tokenize,
)
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def labeler():
    return CheXpertLabeler()


def test_classes_are_chexperts_in_order():
    assert CHEXPERT_CLASSES == (
        "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Lesion", "Lung Opacity", "Edema",
        "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
        "Fracture", "Support Devices",
    )  # fmt: skip


# Real sentences from iu-xray-reports/reports.csv, with the labels a reader gives them (only the listed
# observations may be mentioned; every other one must be None, No Finding excepted).
REAL_SENTENCES = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0.0, "Pneumothorax": 0.0}),
    (
        "No displaced rib fractures, pneumothorax, or pleural effusion identified.",
        {"Fracture": 0.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0},
    ),
    (
        "No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or pneumothorax is identified.",
        {"Consolidation": 0.0, "Lung Opacity": 0.0, "Pleural Effusion": 0.0, "Pneumothorax": 0.0},
    ),
    ("There are no XXXX of a pleural effusion.", {"Pleural Effusion": 0.0}),
    ("The lungs are free of focal airspace disease.", {"Lung Opacity": 0.0}),
    (
        "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
        {"Lung Opacity": 0.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0},
    ),
    ("The left apical pneumothorax has resolved.", {"Pneumothorax": 0.0}),
    ("Previously seen left pleural effusion has resolved.", {"Pleural Effusion": 0.0}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"Lung Opacity": 0.0, "Pneumonia": 0.0}),
    # uncertainty
    ("A subtle infiltrate cannot be excluded.", {"Lung Opacity": -1.0}),
    ("Cannot exclude small pleural effusions.", {"Pleural Effusion": -1.0}),
    ("This may represent atelectasis.", {"Atelectasis": -1.0}),
    ("Bibasilar atelectasis versus scarring.", {"Atelectasis": -1.0, "Lung Opacity": -1.0}),  # scarring: an opacity
    # positives
    ("Basilar atelectasis.", {"Atelectasis": 1.0}),
    ("Borderline cardiomegaly.", {"Cardiomegaly": 1.0}),  # "borderline" is no uncertainty (CheXpert)
    ("Stable appearance of pacemaker.", {"Support Devices": 1.0}),
    ("There is biapical pleural thickening, unchanged from prior.", {"Pleural Other": 1.0}),
    # attribute mentions: "heart size" is a mention only with a qualifier
    ("Heart size and mediastinal contour are within normal limits.", {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": 0.0}),
    ("The cardiac silhouette is not enlarged.", {"Cardiomegaly": 0.0}),
    # a stable anatomical mention is uncertain (CheXpert); a stable finding stays positive
    ("Heart size is stable.", {"Cardiomegaly": -1.0}),
    ("Stable enlarged cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1.0}),
    ("Stable mild cardiomegaly.", {"Cardiomegaly": 1.0}),
    # scope: the negation stops at the clause boundary
    (
        "Patchy subsegmental atelectasis is seen bibasilar region, no evidence of pneumothorax or pleural effusion is present.",
        {"Atelectasis": 1.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0},
    ),
    (
        "Mild cardiomegaly as before with no effusions or overt evidence of CHF.",
        {"Cardiomegaly": 1.0, "Pleural Effusion": 0.0, "Edema": 0.0},
    ),
    (
        "No evidence of acute pneumonia,XXXX opacities in the lung bases are slightly worse XXXX compared to prior study.",
        {"Pneumonia": 0.0, "Lung Opacity": 1.0},
    ),
]


@pytest.mark.parametrize("sentence,expected", REAL_SENTENCES, ids=[s[:40] for s, _ in REAL_SENTENCES])
def test_real_sentences(labeler, sentence, expected):
    labels = labeler.label_sentence(sentence)
    assert list(labels) == list(CHEXPERT_CLASSES)
    assert {name: label for name, label in labels.items() if name != "No Finding" and label is not None} == expected


def test_negation_scope_ends_at_but(labeler):
    labels = labeler.label_sentence("No pleural effusion but there is cardiomegaly.")
    assert labels["Pleural Effusion"] == 0.0
    assert labels["Cardiomegaly"] == 1.0
    labels = labeler.label_sentence("No pleural effusion, there is mild cardiomegaly.")
    assert labels["Pleural Effusion"] == 0.0
    assert labels["Cardiomegaly"] == 1.0


def test_strong_uncertainty_beats_negation_and_negation_beats_uncertainty(labeler):
    # "not excluded" contains a negation but is uncertain; "no ... to suggest" is a negation.
    assert labeler.label_sentence("Definite infiltrate is not excluded.")["Lung Opacity"] == -1.0
    assert labeler.label_sentence("No focal consolidation to suggest pneumonia.")["Pneumonia"] == 0.0


def test_report_aggregation(labeler):
    # Real report (uid 2), labelled 1.0 for Cardiomegaly by the CheXpert labeler; No Finding blank.
    report = (
        "Borderline cardiomegaly. Midline sternotomy XXXX. Enlarged pulmonary arteries. Clear lungs. "
        "Inferior XXXX XXXX XXXX. No acute pulmonary findings."
    )
    labels = labeler.label_report(report)
    assert labels["Cardiomegaly"] == 1.0
    assert labels["No Finding"] is None  # a positive finding blocks No Finding

    # CheXpert's aggregation: negative + uncertain -> uncertain (even next to a positive); else positive wins.
    labels = labeler.label_report("No atelectasis. This may represent atelectasis. Basilar atelectasis.")
    assert labels["Atelectasis"] == -1.0
    labels = labeler.label_report("This may represent atelectasis. Basilar atelectasis.")
    assert labels["Atelectasis"] == 1.0
    labels = labeler.label_report("No atelectasis. Basilar atelectasis.")
    assert labels["Atelectasis"] == 1.0
    labels = labeler.label_report("No atelectasis. This may represent atelectasis.")
    assert labels["Atelectasis"] == -1.0
    labels = labeler.label_report("No atelectasis. No pleural effusion or pneumothorax.")
    assert labels["Atelectasis"] == 0.0
    assert labels["No Finding"] == 1.0


def test_no_finding_with_support_devices(labeler):
    # Real report: a pacemaker and otherwise normal findings -> No Finding stays positive.
    report = (
        "No pneumothorax. Pacemaker defibrillator tips in the right atrium, right ventricle and a coronary vein. "
        "Heart size normal. Lungs are clear."
    )
    labels = labeler.label_report(report)
    assert labels["Support Devices"] == 1.0
    assert labels["Pneumothorax"] == 0.0
    assert labels["Cardiomegaly"] == 0.0
    assert labels["No Finding"] == 1.0
    assert labeler.label_report(report + " Mild cardiomegaly.")["No Finding"] is None


def test_label_vector_policies(labeler):
    report = "Cannot exclude small pleural effusions. Mild cardiomegaly. No pneumothorax."
    index = CHEXPERT_CLASSES.index
    positive = labeler.label_vector(report, uncertain="positive")
    negative = labeler.label_vector(report, uncertain="negative")
    ignore = labeler.label_vector(report, uncertain="ignore")
    assert len(positive) == 14
    assert positive[index("Pleural Effusion")] == 1.0
    assert negative[index("Pleural Effusion")] == 0.0
    assert math.isnan(ignore[index("Pleural Effusion")])  # masked by the semantic loss, not a negative
    assert sum(math.isnan(value) for value in ignore) == 1
    for vector in (positive, negative, ignore):
        assert vector[index("Cardiomegaly")] == 1.0
        assert vector[index("Pneumothorax")] == 0.0  # negative
        assert vector[index("Fracture")] == 0.0  # not mentioned
        assert vector[index("No Finding")] == 0.0
    sentence_vector = labeler.label_vector("Mild cardiomegaly.", level="sentence")
    assert sentence_vector == labels_to_vector(labeler.label_sentence("Mild cardiomegaly."))
    with pytest.raises(ValueError, match="uncertain"):
        labeler.label_vector(report, uncertain="maybe")


def test_label_reports_levels(labeler):
    texts = ["No pneumothorax. Mild cardiomegaly.", "Basilar atelectasis."]
    assert labeler.label_reports(texts) == [labeler.label_report(text) for text in texts]
    sentences = labeler.label_reports(texts, level="sentence")
    assert len(sentences) == 3
    assert sentences[1]["Cardiomegaly"] == 1.0
    with pytest.raises(ValueError, match="text #1"):
        labeler.label_reports(["Mild cardiomegaly.", "  "])
    assert labeler.label_reports(["Mild cardiomegaly.", ""], skip_empty=True)[1] == dict.fromkeys(CHEXPERT_CLASSES)


def test_empty_and_bad_text(labeler):
    for method in (labeler.label_report, labeler.label_sentence, labeler.label_vector):
        with pytest.raises(ValueError, match="empty"):
            method("   ")
        with pytest.raises(ValueError, match="string"):
            method(None)


def test_split_sentences_real_text():
    # uid 4 has a missing space ("apex.There") and a numbered impression; others "Dr. XXXX", decimals, "p.m.".
    assert split_sentences(
        "There are irregular opacities in the left lung apex, that could represent a cavitary lesion in the left "
        "lung apex.There are streaky opacities in the right upper lobe, XXXX scarring. 1. Bullous emphysema and "
        "interstitial fibrosis. 2. Probably scarring in the left apex."
    ) == [
        "There are irregular opacities in the left lung apex, that could represent a cavitary lesion in the left lung apex.",
        "There are streaky opacities in the right upper lobe, XXXX scarring.",
        "Bullous emphysema and interstitial fibrosis.",
        "Probably scarring in the left apex.",
    ]
    assert split_sentences(
        "These findings and recommendations were discussed XXXX. XXXX by Dr. XXXX XXXX telephone at XXXX p.m. "
        "XXXX/XXXX. Tracheostomy tube tip 6.4 cm above the carina. Midline sternotomy XXXX. Enlarged pulmonary arteries."
    ) == [
        "These findings and recommendations were discussed XXXX.",
        "XXXX by Dr. XXXX XXXX telephone at XXXX p.m. XXXX/XXXX.",
        "Tracheostomy tube tip 6.4 cm above the carina.",
        "Midline sternotomy XXXX.",
        "Enlarged pulmonary arteries.",
    ]
    assert split_sentences("   ") == []


def _write_csv(path, header, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _write_reports(tmp_path):
    source = tmp_path / "reports.csv"
    _write_csv(
        source,
        ["uid", "TEXT"],
        [
            ["1", "No pleural effusion or pneumothorax. Mild cardiomegaly."],
            ["2", "This may represent atelectasis."],
        ],
    )
    return source


def _read_rows(path):
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def test_cli_report_and_sentence_level(tmp_path):
    source = _write_reports(tmp_path)
    target = tmp_path / "out" / "labeled.csv"
    main(["--input", str(source), "--text_column", "TEXT", "--output", str(target)])
    rows = _read_rows(target)
    assert rows[0] == ["Reports", *CHEXPERT_CLASSES]
    first = dict(zip(rows[0], rows[1]))
    assert first["Reports"] == "No pleural effusion or pneumothorax. Mild cardiomegaly."
    assert (first["Cardiomegaly"], first["Pleural Effusion"], first["Pneumothorax"]) == ("1.0", "0.0", "0.0")
    assert first["No Finding"] == "" and first["Fracture"] == ""
    second = dict(zip(rows[0], rows[2]))
    assert second["Atelectasis"] == "-1.0" and second["No Finding"] == ""

    sentence_target = tmp_path / "sentences.csv"
    main(["--input", str(source), "--text_column", "TEXT", "--output", str(sentence_target), "--level", "sentence",
          "--uncertain", "positive"])  # fmt: skip
    rows = _read_rows(sentence_target)
    assert rows[0] == ["Reports", *CHEXPERT_CLASSES]
    named = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert [row["Reports"] for row in named] == [
        "No pleural effusion or pneumothorax.",
        "Mild cardiomegaly.",
        "This may represent atelectasis.",
    ]
    assert named[0]["No Finding"] == "1.0" and named[0]["Pneumothorax"] == "0.0"
    assert named[1]["Cardiomegaly"] == "1.0" and named[2]["Atelectasis"] == "1.0"


@pytest.mark.slow  # the subprocess imports the whole package (transformers, torch)
def test_cli_subprocess(tmp_path):
    source = _write_reports(tmp_path)
    target = tmp_path / "labeled.csv"
    command = [sys.executable, "-m", "modeling_medclip.labeler", "--input", str(source), "--text_column", "TEXT"]
    result = subprocess.run(
        [*command, "--output", str(target)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    rows = _read_rows(target)
    assert rows[0] == ["Reports", *CHEXPERT_CLASSES]
    assert rows[1] == ["No pleural effusion or pneumothorax. Mild cardiomegaly.", "", "", "1.0", "", "", "", "", "",
                       "", "0.0", "0.0", "", "", ""]  # fmt: skip
    result = subprocess.run(
        [*command[:-1], "MISSING", "--output", str(target)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and "'MISSING'" in result.stderr and "reports.csv" in result.stderr


def test_cli_missing_column_and_empty_text(tmp_path):
    source = tmp_path / "reports.csv"
    _write_csv(source, ["uid", "findings"], [["1", "Mild cardiomegaly."], ["2", ""]])
    with pytest.raises(ValueError, match=r"'TEXT'.*reports\.csv"):
        main(["--input", str(source), "--text_column", "TEXT", "--output", str(tmp_path / "x.csv")])
    with pytest.raises(ValueError, match="line 3.*empty"):
        main(["--input", str(source), "--text_column", "findings", "--output", str(tmp_path / "x.csv")])
    main(["--input", str(source), "--text_column", "findings", "--output", str(tmp_path / "x.csv"), "--skip_empty"])
    with (tmp_path / "x.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[2] == ["", *[""] * 14]


def test_add_label_column(labeler):
    datasets = pytest.importorskip("datasets")
    texts = ["No pneumothorax. Mild cardiomegaly.", "Cannot exclude small pleural effusions."]
    dataset = datasets.Dataset.from_dict({"report": texts})
    labelled = add_label_column(dataset, text_column="report", uncertain="negative", labeler=labeler)
    assert labelled["labels"] == [labeler.label_vector(text, uncertain="negative") for text in texts]
    streamed = add_label_column(dataset.to_iterable_dataset(), text_column="report", column="y", labeler=labeler)
    assert [row["y"] for row in streamed] == [labeler.label_vector(text) for text in texts]
    with pytest.raises(ValueError, match="'text'"):
        add_label_column(dataset)


def test_phrase_files_are_validated(tmp_path):
    copy = tmp_path / "phrases"
    shutil.copytree(REPO_ROOT / "modeling_medclip" / "labeler_phrases", copy)
    with (copy / "mentions.txt").open("a") as handle:
        handle.write("\n[Cardiomegally]\nbig heart\n")
    with pytest.raises(ValueError, match="Cardiomegally"):
        CheXpertLabeler(phrases_dir=copy)
    shutil.copytree(REPO_ROOT / "modeling_medclip" / "labeler_phrases", copy, dirs_exist_ok=True)
    with (copy / "negation.txt").open("a") as handle:
        handle.write("\n[sideways]\nnope\n")
    with pytest.raises(ValueError, match=r"negation\.txt.*sideways"):
        CheXpertLabeler(phrases_dir=copy)
    (copy / "scope.txt").unlink()
    with pytest.raises(ValueError, match="scope.txt"):
        CheXpertLabeler(phrases_dir=copy)


def test_f1_against_mesh_on_iu_reports(iu_reports_dir, labeler):
    """F1 against the MeSH-derived labels over all indexed IU reports with text, for the findings whose MeSH coding
    and CheXpert's conventions roughly agree. MeSH codes hedged findings ("likely atelectasis") as present, so
    uncertain counts as positive here."""
    with (iu_reports_dir / "reports.csv").open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["text"].strip() and row["mesh_cardiomegaly"] != ""]
    assert len(rows) > 3000
    predicted = [labeler.label_report(row["text"]) for row in rows]
    floors = {"Cardiomegaly": 0.85, "Pleural Effusion": 0.8, "Atelectasis": 0.85, "Lung Opacity": 0.8, "Edema": 0.7}
    for name, floor in floors.items():
        column = "mesh_" + name.lower().replace(" ", "_")
        truth = [int(row[column]) for row in rows]
        guess = [int(labels[name] in (1.0, -1.0)) for labels in predicted]
        f1 = f1_score(truth, guess)
        assert f1 > floor, f"{name}: F1 {f1:.3f} <= {floor}"


def test_label_report_with_evidence(labeler):
    report = "No pleural effusion or pneumothorax. Heart size is normal. Mild Cardiomegaly. Basilar atelectasis."
    result = labeler.label_report_with_evidence(report)
    assert list(result) == list(CHEXPERT_CLASSES)
    labels = labeler.label_report(report)
    assert {name: label for name, (label, _) in result.items()} == labels
    assert result["Cardiomegaly"] == (1.0, "Cardiomegaly")  # the positive mention wins over "Heart size" (normal)
    assert result["Pleural Effusion"][0] == 0.0 and result["Pleural Effusion"][1].endswith("effusion")
    assert result["Atelectasis"] == (1.0, "atelectasis")
    assert result["Fracture"] == (None, None)
    assert result["No Finding"] == (None, None)
    for name, (label, evidence) in result.items():
        assert (evidence is None) == (label is None or name == "No Finding")
        assert evidence is None or evidence in report
    assert labeler.label_report_with_evidence("No pneumothorax.")["No Finding"] == (1.0, None)
    with pytest.raises(ValueError, match="empty"):
        labeler.label_report_with_evidence("  ")


# One small case per rule family, with the answer the CheXpert labeler's conventions give.
RULE_CASES = {
    "mention": [
        ("The cardiac silhouette is enlarged.", {"Cardiomegaly": 1.0}),  # an anatomical mention is positive
        ("Small right hydropneumothorax.", {"Pneumothorax": 1.0}),
        ("Right upper lobe nodular opacity.", {"Lung Lesion": 1.0, "Lung Opacity": 1.0}),
        ("Sternotomy wires.", {}),  # wires are no Support Devices mention
    ],
    "unmention": [
        ("Calcified nodule in the right upper lobe.", {}),
        ("Small pericardial effusion.", {}),
        ("Pacemaker leads project over the heart.", {"Support Devices": 1.0}),
        ("Mild plate-like atelectasis.", {"Atelectasis": 1.0}),
        # whole words, not substrings: an uncalcified nodule is no calcified one (a listed disagreement)
        ("Uncalcified nodule in the lingula.", {"Lung Lesion": 1.0}),
    ],
    "pre-negation uncertainty": [
        ("Cannot exclude a small left pleural effusion.", {"Pleural Effusion": -1.0}),
        ("No new consolidation.", {"Consolidation": -1.0}),
        ("Pneumothorax is not excluded.", {"Pneumothorax": -1.0}),
    ],
    "negation": [
        ("No pneumothorax.", {"Pneumothorax": 0.0}),
        ("The heart is normal in size.", {"Cardiomegaly": 0.0}),
        ("The left pleural effusion has resolved.", {"Pleural Effusion": 0.0}),
        (
            "The lungs are clear of focal airspace disease, pneumothorax, or pleural effusion.",
            {"Lung Opacity": 0.0, "Pneumothorax": 0.0, "Pleural Effusion": 0.0},
        ),
        ("No effusion, there is cardiomegaly.", {"Pleural Effusion": 0.0, "Cardiomegaly": 1.0}),  # clause ends scope
    ],
    "post-negation uncertainty": [
        ("Possible left lower lobe pneumonia.", {"Pneumonia": -1.0}),
        ("Minimal atelectasis or effusion.", {"Atelectasis": -1.0, "Pleural Effusion": -1.0}),
        ("Pulmonary vascular congestion.", {"Edema": -1.0}),
        ("Stable cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1.0}),
        ("Pneumothorax is not well visualized.", {"Pneumothorax": -1.0}),
        ("Pneumonia is possible.", {"Pneumonia": -1.0}),
    ],
    # "or" / "versus" join the two alternatives next to them, not the rest of the sentence
    "conjunction scope": [
        ("Basilar opacities may represent atelectasis versus scarring.", {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
        ("Lung base scarring with possible small effusions.", {"Lung Opacity": 1.0, "Pleural Effusion": -1.0}),
        ("Opacities, atelectasis versus airspace disease.", {"Lung Opacity": 1.0, "Atelectasis": -1.0}),
        (
            "Opacities representing an infectious etiology versus chronic lung disease.",
            {"Lung Opacity": 1.0, "Pneumonia": 1.0},
        ),
        # "or" joins two modifiers, not two findings; after a mention it reaches over a modifier
        ("Appearance of acute or subacute rib fracture.", {"Fracture": 1.0}),
        ("Atelectasis or focal consolidation.", {"Atelectasis": -1.0, "Consolidation": -1.0}),
    ],
    # an attributive "normal" negates its own noun; a predicative one what it describes, not a following "with"
    "attributive normal": [
        ("Mild cardiomegaly with normal pulmonary vasculature.", {"Cardiomegaly": 1.0}),
        ("Cardiomediastinal silhouette demonstrates normal heart size.", {"Enlarged Cardiomediastinum": 1.0, "Cardiomegaly": 0.0}),
        (
            "The heart size is normal with stable appearance of the cardiomediastinal silhouette.",
            {"Cardiomegaly": 0.0, "Enlarged Cardiomediastinum": -1.0},
        ),
    ],
    # "upper limits of normal" negates only "at" / "within" the limits, or the noun it qualifies
    "upper limits of normal": [
        ("Heart size is upper limits of normal.", {"Cardiomegaly": 1.0}),
        ("Heart size is at the upper limits of normal.", {"Cardiomegaly": 0.0}),
        ("Upper limits of normal heart size.", {"Cardiomegaly": 0.0}),
    ],
    # "stable" / "unchanged" qualify an anatomical mention only within its own noun phrase
    "anatomy noun phrase": [
        ("Stable widening of the upper mediastinum.", {"Enlarged Cardiomediastinum": 1.0}),
        ("Stable appearance of the cardiomediastinal silhouette.", {"Enlarged Cardiomediastinum": -1.0}),
    ],
}


@pytest.mark.parametrize(
    "sentence,expected",
    [case for cases in RULE_CASES.values() for case in cases],
    ids=[f"{family}: {sentence[:30]}" for family, cases in RULE_CASES.items() for sentence, _ in cases],
)
def test_rule_families(labeler, sentence, expected):
    labels = labeler.label_sentence(sentence)
    assert {name: label for name, label in labels.items() if name != "No Finding" and label is not None} == expected


def test_heart_failure_implies_uncertain_cardiomegaly(labeler):
    labels = labeler.label_report("Findings consistent with congestive heart failure.")
    assert (labels["Edema"], labels["Cardiomegaly"]) == (1.0, -1.0)
    assert labeler.label_report_with_evidence("Mild CHF.")["Cardiomegaly"] == (-1.0, "CHF")
    labels = labeler.label_report("No CHF.")
    assert (labels["Edema"], labels["Cardiomegaly"]) == (0.0, None)
    labels = labeler.label_report("Mild CHF. Moderate cardiomegaly.")
    assert labels["Cardiomegaly"] == 1.0


def test_no_finding_phrases(labeler):
    labels = labeler.label_report("Emphysema. No pleural effusion.")
    assert labels["No Finding"] is None and labels["Pleural Effusion"] == 0.0
    assert all(labels[name] is None for name in CHEXPERT_CLASSES if name not in ("No Finding", "Pleural Effusion"))
    assert labeler.label_report("No emphysema. No pleural effusion.")["No Finding"] == 1.0
    assert labeler.label_report("Possible emphysema.")["No Finding"] is None
    assert labeler.label_report("Heart size is normal.")["No Finding"] == 1.0
    assert labeler.label_report("Left chest pacemaker. Lungs are clear.")["No Finding"] == 1.0


def test_text_cleaning():
    assert tokenize("Atelectasis and/or effusion") == ["atelectasis", "or", "effusion"]
    assert tokenize("Scarring/atelectasis, 1/2 cm") == ["scarring", "or", "atelectasis", ",", "1", "2", "cm"]


def _cli_rows(tmp_path, texts, *flags):
    source = tmp_path / "in.csv"
    _write_csv(source, ["text"], [[text] for text in texts])
    target = tmp_path / "out.csv"
    main(["--input", str(source), "--output", str(target), *flags])
    return [row[0] for row in _read_rows(target)[1:]]


def test_cli_escapes_formulas(tmp_path):
    texts = ["=HYPERLINK(\"http://x\") cardiomegaly", "+1 effusion", "-2 effusion", "@SUM(A1) edema",
             "\tTab pneumothorax", "\rCR atelectasis", "No pneumothorax. -3 is fine inside."]  # fmt: skip
    escaped = _cli_rows(tmp_path, texts)
    assert escaped == ["'" + text for text in texts[:-1]] + [texts[-1]]
    assert _cli_rows(tmp_path, texts, "--no_escape_formulas") == texts
    assert escape_formula("Mild cardiomegaly.") == "Mild cardiomegaly."


def test_cli_reads_bom_long_fields_and_names_bad_encoding(tmp_path):
    source = tmp_path / "excel.csv"
    source.write_bytes("text,uid\r\nMild cardiomegaly.,1\r\n".encode("utf-8-sig"))
    target = tmp_path / "out.csv"
    main(["--input", str(source), "--output", str(target)])
    header, row = _read_rows(target)
    assert header[0] == "Reports" and dict(zip(header, row))["Cardiomegaly"] == "1.0"

    long_text = "No pneumothorax. " + "Mild cardiomegaly. " * 10_000  # about 190,000 characters in one field
    assert len(long_text) > 131_072
    _write_csv(source, ["text"], [[long_text]])
    main(["--input", str(source), "--output", str(target)])
    limit = csv.field_size_limit(1_000_000)  # only to read the check file back
    try:
        row = _read_rows(target)[1]
    finally:
        csv.field_size_limit(limit)
    assert row[0] == long_text and row[1 + CHEXPERT_CLASSES.index("Cardiomegaly")] == "1.0"

    source.write_bytes("text\nMild cardiomegaly.\n\"Small effusion,\nna\xefve\"\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"excel\.csv is not valid UTF-8: record 3 \(line 4.*xef"):
        main(["--input", str(source), "--output", str(target)])


# Targets of micro-F1 over the 13 findings against the CheXpert labeler's output, per value (positive, negative,
# uncertain), on the development part of chexpert-labeler-iu/.
AGREEMENT_TARGETS = {
    "sentences-dev.csv": {1.0: 0.90, 0.0: 0.92, -1.0: 0.75},
    "reports-dev.csv": {1.0: 0.85, 0.0: 0.95, -1.0: 0.75},
}


@pytest.mark.parametrize("file_name", sorted(AGREEMENT_TARGETS))
def test_agreement_with_chexpert_labeler(shared_data, labeler, file_name):
    path = shared_data / "chexpert-labeler-iu" / file_name
    if not path.is_file():
        pytest.skip(f"{path} not found: the CheXpert labeler's IU labels are needed to score agreement")
    rows = read_labeled_csv(path)
    assert len(rows) > 1000
    scores = agreement_f1([labels for _, labels in rows], [labeler.label_report(text) for text, _ in rows])
    for value, target in AGREEMENT_TARGETS[file_name].items():
        assert scores[value]["micro"] >= target, f"{file_name} value {value}: micro-F1 {scores[value]['micro']:.3f}"
