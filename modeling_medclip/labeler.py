# Copyright 2026 The medclip-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Rule-based CheXpert-style labeler for chest X-ray reports.

The labeler follows the approach of the Stanford CheXpert labeler (Irvin et al., 2019): it finds *mentions* of the
14 CheXpert observations in each sentence, then classifies every mention as negative or uncertain when it falls in
the scope of a negation or uncertainty trigger, and positive otherwise. Sentence labels are aggregated into a report
label (positive beats uncertain beats negative) and *No Finding* is derived from the other observations.

It is written from scratch in plain Python: the phrase lists live in ``labeler_phrases/`` (see the README.md there),
are compiled into token tries and matched leftmost-longest over a simple word tokenization. Scopes are bounded
windows of tokens cut at scope terminators ("but", "however", "which", ";", a comma that does not separate list
items...), in place of the dependency-graph patterns of the original. No spaCy / medspacy / negspacy is needed, and
the labeler processes thousands of reports per second on one CPU core.

Labels follow CheXpert's convention: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain and ``None`` not
mentioned (blank in the CSV output).

Command line, writing the CheXpert labeler's own CSV format (``Reports`` then the 14 observations)::

    python -m modeling_medclip.labeler --input reports.csv --text_column text --output labeled.csv
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import f1_score


CHEXPERT_CLASSES: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Lesion",
    "Lung Opacity",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
"""The 14 CheXpert observations, in the order of the CheXpert labeler's output columns."""

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
UNCERTAIN_POLICIES = ("positive", "negative", "ignore")

PHRASES_DIR = Path(__file__).resolve().parent / "labeler_phrases"

# Observations that have mention phrases, and those that can make "No Finding" blank.
_FINDING_CLASSES = CHEXPERT_CLASSES[1:]
_NO_FINDING_BLOCKERS = tuple(name for name in _FINDING_CLASSES if name != "Support Devices")
# Aggregation priority: positive beats uncertain beats negative beats not mentioned.
_PRIORITY = {None: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}

# Words are runs of letters / digits ("x-ray" -> "x", "ray"); a few punctuation marks are kept as scope tokens.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[,;:()?]")
_PHRASE_TOKEN_RE = re.compile(r"[a-z0-9]+\*?|[,;:()?]")
# Tokens that start a new clause: a comma followed by one of them before any "or" / "and" ends a scope.
_CLAUSE_VERBS = frozenset(
    {"is", "are", "was", "were", "has", "have", "had", "there", "be", "been", "appears", "appear", "seen", "noted"}
)
_LIST_CONJUNCTIONS = frozenset({"or", "and", "nor"})
_COORDINATORS = frozenset({"or", "and", ","})

# Sentence splitting: a sentence ends at ".", "!" or "?" followed by whitespace, or at a "." glued to a capitalized
# word ("apex.There"). Pieces ending in a title / common abbreviation are joined back; list markers are dropped.
_SENTENCE_BREAK_RE = re.compile(r"(?<=[.!?])\s+|(?<=[a-z]\.)(?=[A-Z][a-z])")
_ABBREVIATION_RE = re.compile(
    r"(?:\b(?:dr|mr|mrs|ms|prof|st|vs|approx|fig|no|e\.g|i\.e|cf|etc)|\b[A-Za-z])\.$", re.IGNORECASE
)
_LIST_MARKER_RE = re.compile(r"^\(?\d{1,2}[.)]$")
_LEADING_LIST_MARKER_RE = re.compile(r"^\(?\d{1,2}[.)]\s+")
_HAS_WORD_RE = re.compile(r"[A-Za-z0-9]")


def split_sentences(text: str) -> list[str]:
    """Split a radiology report into sentences.

    Copes with titles and abbreviations ("Dr. XXXX", "vs."), decimals ("1.5 cm"), de-identification tokens
    ("... sternotomy XXXX. Enlarged ..."), numbered impressions ("1. Cardiomegaly. 2. ...": the markers are dropped)
    and a missing space after a period ("apex.There").

    Args:
        text (`str`): the report.

    Returns:
        `list[str]`: the non-empty sentences, stripped, in order.
    """
    sentences: list[str] = []
    pending = ""
    for piece in _SENTENCE_BREAK_RE.split(text.strip()):
        piece = piece.strip()
        if not piece or _LIST_MARKER_RE.match(piece):
            continue
        pending = f"{pending} {piece}" if pending else piece
        if not _ABBREVIATION_RE.search(pending):
            sentences.append(_LEADING_LIST_MARKER_RE.sub("", pending))
            pending = ""
    if pending:
        sentences.append(_LEADING_LIST_MARKER_RE.sub("", pending))
    return [sentence for sentence in sentences if _HAS_WORD_RE.search(sentence)]


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens of ``text`` plus the punctuation that bounds scopes (``, ; : ( ) ?``)."""
    return _TOKEN_RE.findall(text.lower())


def tokenize_with_offsets(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """`tokenize` plus each token's ``(start, end)`` character offsets in ``text``."""
    matches = list(_TOKEN_RE.finditer(text.lower()))
    return [match.group() for match in matches], [match.span() for match in matches]


def read_phrase_file(path: str | Path) -> dict[str, list[str]]:
    """Read a phrase file: ``[section]`` headers, one phrase per line, ``#`` comments and blank lines ignored.

    Returns:
        `dict[str, list[str]]`: the phrases of each section, in file order, lowercased.
    """
    path = Path(path)
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line_number, raw_line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1].strip(), [])
        elif current is None:
            raise ValueError(f"{path}:{line_number}: phrase {line!r} appears before any [section] header")
        else:
            current.append(line.lower())
    return sections


class _PhraseTrie:
    """Token trie over phrases; a phrase word ending in ``*`` matches any token starting with it.

    Each phrase carries a payload (a set of tags); `find` scans a token list leftmost-longest and returns
    non-overlapping ``(start, end, tags)`` spans, ``end`` exclusive.
    """

    def __init__(self):
        self._root = self._new_node()

    @staticmethod
    def _new_node() -> dict[str, Any]:
        # "words": exact token -> child; "prefixes": first 3 chars -> [(prefix, child)]; "tags": set or None.
        return {"words": {}, "prefixes": {}, "tags": None}

    def add(self, phrase: str, tag: Any, source: str = "phrase list") -> None:
        words = _PHRASE_TOKEN_RE.findall(phrase)
        if not words or " ".join(words) != " ".join(phrase.split()):
            raise ValueError(f"{source}: cannot parse phrase {phrase!r} (use lowercase words, optional trailing '*')")
        node = self._root
        for word in words:
            if word.endswith("*"):
                prefix = word[:-1]
                if len(prefix) < 3:
                    raise ValueError(f"{source}: wildcard prefix {word!r} in {phrase!r} needs at least 3 characters")
                bucket = node["prefixes"].setdefault(prefix[:3], [])
                child = next((child for known, child in bucket if known == prefix), None)
                if child is None:
                    child = self._new_node()
                    bucket.append((prefix, child))
            else:
                child = node["words"].setdefault(word, self._new_node())
            node = child
        if node["tags"] is None:
            node["tags"] = set()
        node["tags"].add(tag)

    def _longest_from(self, tokens: Sequence[str], start: int) -> tuple[int, frozenset | None]:
        best_end, best_tags = start, None
        frontier = [self._root]
        position = start
        while frontier and position < len(tokens):
            token = tokens[position]
            next_frontier = []
            for node in frontier:
                child = node["words"].get(token)
                if child is not None:
                    next_frontier.append(child)
                if node["prefixes"]:
                    for prefix, child in node["prefixes"].get(token[:3], ()):
                        if token.startswith(prefix):
                            next_frontier.append(child)
            position += 1
            for node in next_frontier:
                if node["tags"] is not None:
                    best_end, best_tags = position, node["tags"]
                    break
            frontier = next_frontier
        return best_end, best_tags

    def find(self, tokens: Sequence[str]) -> list[tuple[int, int, frozenset]]:
        spans = []
        start = 0
        while start < len(tokens):
            end, tags = self._longest_from(tokens, start)
            if tags is None:
                start += 1
            else:
                spans.append((start, end, tags))
                start = end
        return spans


@dataclass(frozen=True)
class _Trigger:
    start: int
    end: int
    kinds: frozenset


class CheXpertLabeler:
    """Rule-based CheXpert-style labeler (mention extraction, then negation / uncertainty classification).

    Args:
        phrases_dir (`str` or `Path`, *optional*):
            Folder with ``mentions.txt``, ``negation.txt`` and ``uncertainty.txt`` (default: the packaged
            ``labeler_phrases/``). See the README.md of that folder for the format.
        pre_window (`int`, *optional*, defaults to 8):
            How many words after a pre-trigger ("no", "possible") its scope reaches (commas are not counted).
        post_window (`int`, *optional*, defaults to 6):
            How many words before a post-trigger ("is not seen", "cannot be excluded") its scope reaches.
        attribute_window (`int`, *optional*, defaults to 8):
            How far from an attribute mention ("heart size") its qualifier ("enlarged", "normal") may be.

    Example:

    ```python
    >>> labeler = CheXpertLabeler()
    >>> labeler.label_report("No pleural effusion or pneumothorax. Mild cardiomegaly.")["Cardiomegaly"]
    1.0
    ```
    """

    def __init__(
        self,
        phrases_dir: str | Path | None = None,
        pre_window: int = 8,
        post_window: int = 6,
        attribute_window: int = 8,
    ):
        phrases_dir = Path(phrases_dir) if phrases_dir is not None else PHRASES_DIR
        self.pre_window = pre_window
        self.post_window = post_window
        self.attribute_window = attribute_window

        files = {name: phrases_dir / f"{name}.txt" for name in ("mentions", "negation", "uncertainty")}
        for path in files.values():
            if not path.is_file():
                raise ValueError(f"phrase file {path} not found (phrases_dir={phrases_dir})")
        mentions = read_phrase_file(files["mentions"])
        negation = read_phrase_file(files["negation"])
        uncertainty = read_phrase_file(files["uncertainty"])

        self._mentions = _PhraseTrie()
        for section, phrases in mentions.items():
            if section == "abnormal":
                continue
            if section == "ignore":  # phrases that shadow a shorter mention but name no observation
                for phrase in phrases:
                    self._mentions.add(phrase, None, source=str(files["mentions"]))
                continue
            name, _, kind = section.partition(":")
            name, kind = name.strip(), kind.strip()
            if name not in _FINDING_CLASSES or kind not in ("", "attribute"):
                raise ValueError(
                    f"{files['mentions']}: unknown section [{section}]; expected one of {_FINDING_CLASSES}, "
                    "optionally followed by ': attribute', or [abnormal] or [ignore]"
                )
            for phrase in phrases:
                self._mentions.add(phrase, (name, kind == "attribute"), source=str(files["mentions"]))

        self._qualifiers = _PhraseTrie()
        qualifier_sections = {
            "abnormal": (mentions, files["mentions"]),
            "normal": (negation, files["negation"]),
            "borderline": (uncertainty, files["uncertainty"]),
        }
        for kind, (sections, path) in qualifier_sections.items():
            for phrase in self._section(sections, kind, path):
                self._qualifiers.add(phrase, kind, source=str(path))

        self._triggers = _PhraseTrie()
        trigger_sections = {
            "neg_pre": (negation, "pre", files["negation"]),
            "neg_post": (negation, "post", files["negation"]),
            "pseudo": (negation, "pseudo", files["negation"]),
            "scope_end": (negation, "scope_end", files["negation"]),
            "unc_pre": (uncertainty, "pre", files["uncertainty"]),
            "unc_post": (uncertainty, "post", files["uncertainty"]),
            "strong_pre": (uncertainty, "strong_pre", files["uncertainty"]),
            "strong_post": (uncertainty, "strong_post", files["uncertainty"]),
        }
        for kind, (sections, section, path) in trigger_sections.items():
            for phrase in self._section(sections, section, path):
                self._triggers.add(phrase, kind, source=str(path))

    @staticmethod
    def _section(sections: dict[str, list[str]], name: str, path: Path) -> list[str]:
        if name not in sections:
            raise ValueError(f"phrase file {path} has no [{name}] section")
        return sections[name]

    # ------------------------------------------------------------------------------------------------------------
    # Sentence-level labelling
    # ------------------------------------------------------------------------------------------------------------

    def _scope_breaks(self, tokens: list[str], triggers: list[_Trigger]) -> list[bool]:
        """``breaks[i]`` is True when token ``i`` ends any scope that crosses it."""
        breaks = [False] * len(tokens)
        for trigger in triggers:
            if "scope_end" in trigger.kinds:
                for index in range(trigger.start, trigger.end):
                    breaks[index] = True
        for index, token in enumerate(tokens):
            if token == "," and not self._is_list_comma(tokens, index, breaks):
                breaks[index] = True
        return breaks

    @staticmethod
    def _is_list_comma(tokens: list[str], comma: int, breaks: list[bool]) -> bool:
        """A comma separates list items ("no effusion, pneumothorax, or consolidation", "no effusion, pneumothorax.")
        unless a verb ("is", "there", ...) or a scope terminator comes before the next "or" / "and" / "nor"; then it
        starts a new clause ("no effusion, there is cardiomegaly") and ends a scope."""
        for index in range(comma + 1, len(tokens)):
            token = tokens[index]
            if token in _LIST_CONJUNCTIONS:
                return True
            if token in _CLAUSE_VERBS or breaks[index]:
                return False
        return True

    @staticmethod
    def _distance(tokens: list[str], breaks: list[bool], start: int, end: int) -> int | None:
        """Words between ``start`` and ``end``, counted from the last list comma (each list item gets the full
        window), or None when a scope break lies between."""
        words = 0
        for index in range(start, end):
            if breaks[index]:
                return None
            words = 0 if tokens[index] == "," else words + 1
        return words

    def _resolve_attribute(
        self,
        tokens: list[str],
        breaks: list[bool],
        start: int,
        end: int,
        qualifiers: list[tuple[int, int, frozenset]],
        mentions: list[tuple[int, int, frozenset]],
    ) -> tuple[str, int, int] | None:
        """Nearest qualifier of an attribute mention: (kind, span start, span end), or None when unqualified.

        A qualifier after the attribute counts within ``attribute_window`` words ("heart size and mediastinal
        contours are normal"); one before it within ``attribute_window // 2`` words, and across another mention
        only when that mention is coordinated with the attribute ("normal heart size and mediastinum", but
        "heart size enlarged, stable mediastinal contours" qualifies the heart only). Both must be in the same
        scope."""
        best = None
        priority = {"borderline": 0, "abnormal": 1, "normal": 2}
        for q_start, q_end, kinds in qualifiers:
            if q_end <= start:
                if not self._coordinated(tokens, q_end, start, mentions):
                    continue
                window, distance = self.attribute_window // 2, self._distance(tokens, breaks, q_end, start)
            elif q_start >= end:
                window, distance = self.attribute_window, self._distance(tokens, breaks, end, q_start)
            else:
                continue
            if distance is None or distance > window:
                continue
            kind = min(kinds, key=priority.__getitem__)
            key = (distance, priority[kind])
            if best is None or key < best[0]:
                best = (key, kind, min(start, q_start), max(end, q_end))
        return None if best is None else best[1:]

    @staticmethod
    def _coordinated(tokens: list[str], start: int, end: int, mentions: list[tuple[int, int, frozenset]]) -> bool:
        """True when tokens ``[start, end)`` hold no mention, or only mentions joined by "and" / "or" / commas."""
        inside = [False] * (end - start)
        for m_start, m_end, _ in mentions:
            if start <= m_start and m_end <= end:
                inside[m_start - start : m_end - start] = [True] * (m_end - m_start)
        if not any(inside):
            return True
        first = inside.index(True)
        return all(inside[i] or tokens[start + i] in _COORDINATORS for i in range(first, end - start))

    def _classify(
        self, tokens: list[str], breaks: list[bool], triggers: list[_Trigger], start: int, end: int
    ) -> float:
        """Label one mention spanning tokens ``[start, end)`` from the triggers whose scope covers it."""
        in_scope: set[str] = set()
        for trigger in triggers:
            if trigger.end <= start:
                distance = self._distance(tokens, breaks, trigger.end, start)
                if distance is not None and distance <= self.pre_window:
                    in_scope.update(kind for kind in trigger.kinds if kind.endswith("_pre"))
            elif trigger.start >= end:
                distance = self._distance(tokens, breaks, end, trigger.start)
                if distance is not None and distance <= self.post_window:
                    in_scope.update(kind for kind in trigger.kinds if kind.endswith("_post"))
            else:  # inside the span of an attribute mention: "heart is not enlarged"
                in_scope.update(trigger.kinds)
        if "strong_pre" in in_scope or "strong_post" in in_scope:
            return UNCERTAIN
        if "neg_pre" in in_scope or "neg_post" in in_scope:
            return NEGATIVE
        if "unc_pre" in in_scope or "unc_post" in in_scope:
            return UNCERTAIN
        return POSITIVE

    def _label_tokens(self, tokens: list[str]) -> dict[str, float | None]:
        return self._label_tokens_with_spans(tokens)[0]

    def _label_tokens_with_spans(
        self, tokens: list[str]
    ) -> tuple[dict[str, float | None], dict[str, tuple[int, int]]]:
        """Labels of one sentence's tokens, and for each mentioned observation the token span ``[start, end)`` of
        the mention that decided its label (the first mention with the winning label)."""
        labels: dict[str, float | None] = dict.fromkeys(_FINDING_CLASSES)
        spans: dict[str, tuple[int, int]] = {}

        def record(names: list[str], label: float, span: tuple[int, int]) -> None:
            for name in names:
                if _PRIORITY[label] > _PRIORITY[labels[name]]:
                    labels[name], spans[name] = label, span

        mentions = self._mentions.find(tokens)
        if mentions:
            triggers = [_Trigger(start, end, kinds) for start, end, kinds in self._triggers.find(tokens)]
            breaks = self._scope_breaks(tokens, triggers)
            triggers = [trigger for trigger in triggers if not trigger.kinds <= {"pseudo", "scope_end"}]
            qualifiers = None
            for start, end, tags in mentions:
                plain = [tag[0] for tag in tags if tag is not None and not tag[1]]
                attributes = [tag[0] for tag in tags if tag is not None and tag[1]]
                if plain:
                    record(plain, self._classify(tokens, breaks, triggers, start, end), (start, end))
                if attributes:
                    if qualifiers is None:
                        qualifiers = self._qualifiers.find(tokens)
                    resolved = self._resolve_attribute(tokens, breaks, start, end, qualifiers, mentions)
                    if resolved is None:
                        continue
                    kind, span_start, span_end = resolved
                    if kind == "normal":
                        label = NEGATIVE
                    elif kind == "borderline":
                        label = UNCERTAIN
                    else:
                        label = self._classify(tokens, breaks, triggers, span_start, span_end)
                    record(attributes, label, (start, end))
        return {"No Finding": _no_finding(labels), **labels}, spans

    @staticmethod
    def _check_text(text: Any, what: str) -> str:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what} is empty: there is nothing to label")
        return text

    def label_sentence(self, text: str) -> dict[str, float | None]:
        """Label one sentence.

        Args:
            text (`str`): the sentence (not split further).

        Returns:
            `dict[str, float | None]`: for each of the 14 `CHEXPERT_CLASSES`, in order, ``1.0`` positive, ``0.0``
            negative, ``-1.0`` uncertain or ``None`` not mentioned. ``No Finding`` is ``1.0`` when no other
            observation but Support Devices is positive or uncertain, else ``None`` (CheXpert's rule).

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.
        """
        return self._label_tokens(tokenize(self._check_text(text, "sentence text")))

    def label_report(self, text: str) -> dict[str, float | None]:
        """Label a whole report: each sentence is labelled, then the labels are aggregated per observation
        (positive beats uncertain beats negative beats not mentioned) and No Finding is derived as in CheXpert.

        Args:
            text (`str`): the report (findings and / or impression).

        Returns:
            `dict[str, float | None]`: the 14 labels, keyed and ordered as `CHEXPERT_CLASSES`.

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.
        """
        self._check_text(text, "report text")
        labels: dict[str, float | None] = dict.fromkeys(_FINDING_CLASSES)
        for sentence in split_sentences(text):
            for name, label in self._label_tokens(tokenize(sentence)).items():
                if name != "No Finding":
                    labels[name] = _merge(labels[name], label)
        return {"No Finding": _no_finding(labels), **labels}

    def label_report_with_evidence(self, text: str) -> dict[str, tuple[float | None, str | None]]:
        """Label a report as `label_report` does, and give for each observation the text that decided its label.

        Args:
            text (`str`): the report.

        Returns:
            `dict[str, tuple[float | None, str | None]]`: for each of the 14 `CHEXPERT_CLASSES`, in order,
            ``(label, evidence)``: the report-level label (as `label_report`) and the mention, as it is written in
            the report, that decided it (the first mention with the winning label); ``(None, None)`` when not
            mentioned. No Finding, derived from the others, has no evidence (``None``).

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.

        Example:

        ```python
        >>> CheXpertLabeler().label_report_with_evidence("No pleural effusion. Mild Cardiomegaly.")["Cardiomegaly"]
        (1.0, 'Cardiomegaly')
        ```
        """
        self._check_text(text, "report text")
        labels: dict[str, float | None] = dict.fromkeys(_FINDING_CLASSES)
        evidence: dict[str, str | None] = dict.fromkeys(_FINDING_CLASSES)
        for sentence in split_sentences(text):
            tokens, offsets = tokenize_with_offsets(sentence)
            sentence_labels, spans = self._label_tokens_with_spans(tokens)
            for name, (start, end) in spans.items():
                label = sentence_labels[name]
                if _PRIORITY[label] > _PRIORITY[labels[name]]:
                    labels[name] = label
                    evidence[name] = sentence[offsets[start][0] : offsets[end - 1][1]]
        result = {"No Finding": (_no_finding(labels), None)}
        result.update((name, (labels[name], evidence[name])) for name in _FINDING_CLASSES)
        return result

    def label_sentences(self, text: str) -> list[tuple[str, dict[str, float | None]]]:
        """Split a report with `split_sentences` and label each sentence: ``[(sentence, labels), ...]``."""
        self._check_text(text, "report text")
        return [(sentence, self._label_tokens(tokenize(sentence))) for sentence in split_sentences(text)]

    def label_reports(
        self, texts: Iterable[str], level: str = "report", skip_empty: bool = False
    ) -> list[dict[str, float | None]]:
        """Label many texts.

        Args:
            texts (`Iterable[str]`): the reports.
            level (`str`, *optional*, defaults to `"report"`):
                ``"report"``: one dict per text (`label_report`). ``"sentence"``: each text is split with
                `split_sentences` and one dict per sentence is returned, all texts' sentences in order.
            skip_empty (`bool`, *optional*, defaults to `False`):
                At report level, give empty texts all-``None`` labels (No Finding included) instead of raising;
                at sentence level they contribute no sentence.

        Returns:
            `list[dict[str, float | None]]`: the labels, each keyed as `CHEXPERT_CLASSES`.
        """
        _check_level(level)
        results = []
        for index, text in enumerate(texts):
            if skip_empty and isinstance(text, str) and not text.strip():
                if level == "report":
                    results.append(dict.fromkeys(CHEXPERT_CLASSES))
                continue
            self._check_text(text, f"text #{index}")
            if level == "report":
                results.append(self.label_report(text))
            else:
                results.extend(labels for _, labels in self.label_sentences(text))
        return results

    def label_vector(self, text: str, uncertain: str = "positive", level: str = "report") -> list[float]:
        """The 14 labels of ``text`` as a 0/1 vector, the multi-label target MedCLIP's semantic matching loss uses.

        Args:
            text (`str`): the report (or sentence, with ``level="sentence"``).
            uncertain (`str`, *optional*, defaults to `"positive"`):
                How uncertain (-1) labels are mapped: ``"positive"`` -> 1.0 (the U-Ones policy), ``"negative"``
                -> 0.0 (U-Zeros), ``"ignore"`` -> 0.0 as well: a dense vector cannot mask an entry, so "ignore"
                treats uncertain like not mentioned; use `label_report` to keep the -1 values.
            level (`str`, *optional*, defaults to `"report"`): ``"report"`` or ``"sentence"`` (label ``text``
                as one sentence, no splitting).

        Returns:
            `list[float]`: length 14, ordered as `CHEXPERT_CLASSES`; not mentioned and negative are 0.0.
        """
        _check_level(level)
        _check_uncertain(uncertain)
        labels = self.label_report(text) if level == "report" else self.label_sentence(text)
        return labels_to_vector(labels, uncertain=uncertain)


def _merge(current: float | None, new: float | None) -> float | None:
    return new if _PRIORITY[new] > _PRIORITY[current] else current


def _no_finding(labels: dict[str, float | None]) -> float | None:
    blocked = any(labels[name] in (POSITIVE, UNCERTAIN) for name in _NO_FINDING_BLOCKERS)
    return None if blocked else POSITIVE


def _check_level(level: str) -> None:
    if level not in ("report", "sentence"):
        raise ValueError(f"level must be 'report' or 'sentence', got {level!r}")


def _check_uncertain(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")


def labels_to_vector(labels: dict[str, float | None], uncertain: str = "positive") -> list[float]:
    """Map CheXpert labels (a dict keyed as `CHEXPERT_CLASSES`) to a length-14 0/1 vector; see
    `CheXpertLabeler.label_vector` for the ``uncertain`` policies."""
    _check_uncertain(uncertain)
    uncertain_value = POSITIVE if uncertain == "positive" else NEGATIVE
    vector = []
    for name in CHEXPERT_CLASSES:
        label = labels[name]
        vector.append(uncertain_value if label == UNCERTAIN else POSITIVE if label == POSITIVE else NEGATIVE)
    return vector


def add_label_column(
    dataset,
    text_column: str = "text",
    column: str = "labels",
    uncertain: str = "positive",
    level: str = "report",
    labeler: CheXpertLabeler | None = None,
    batch_size: int = 1000,
):
    """Precompute CheXpert label vectors into a column of a `datasets.Dataset` or `datasets.IterableDataset`.

    Uses ``dataset.map(batched=True)`` (lazy for an `IterableDataset`). Each row gets a list of 14 floats ordered
    as `CHEXPERT_CLASSES` (see `CheXpertLabeler.label_vector`).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): the rows, with a text column.
        text_column (`str`, *optional*, defaults to `"text"`): the column holding the report text.
        column (`str`, *optional*, defaults to `"labels"`): the name of the new column.
        uncertain (`str`, *optional*, defaults to `"positive"`): ``"positive"``, ``"negative"`` or ``"ignore"``.
        level (`str`, *optional*, defaults to `"report"`): ``"report"`` or ``"sentence"`` (each text is one
            sentence, e.g. sentence-level image-text pairs).
        labeler (`CheXpertLabeler`, *optional*): the labeler to use (default: a new one with packaged phrases).
        batch_size (`int`, *optional*, defaults to 1000): rows per `map` batch.

    Returns:
        The dataset with the new column.

    Raises:
        `ValueError`: when ``text_column`` is missing, or (while mapping) a text is empty; filter empty reports
        out first.
    """
    _check_level(level)
    _check_uncertain(uncertain)
    column_names = getattr(dataset, "column_names", None)
    if column_names is not None and text_column not in column_names:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset (columns: {column_names})")
    labeler = labeler if labeler is not None else CheXpertLabeler()

    def label_batch(batch: dict[str, list]) -> dict[str, list]:
        return {column: [labeler.label_vector(text, uncertain=uncertain, level=level) for text in batch[text_column]]}

    return dataset.map(label_batch, batched=True, batch_size=batch_size)


def read_labeled_csv(path: str | Path) -> list[tuple[str, dict[str, float | None]]]:
    """Read a CSV in the CheXpert labeler's output format (``Reports`` then the 14 observations, ``1.0`` / ``0.0`` /
    ``-1.0`` / empty) as it is scored: texts shorter than 4 characters are dropped and each distinct text is kept
    once (its first row).

    Returns:
        `list[tuple[str, dict[str, float | None]]]`: ``(text, labels)`` pairs, labels keyed as `CHEXPERT_CLASSES`.
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as source:
        reader = csv.DictReader(source)
        missing = [name for name in ("Reports", *CHEXPERT_CLASSES) if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not in the CheXpert labeler's format: columns {missing} are missing")
        rows, seen = [], set()
        for row in reader:
            text = row["Reports"]
            if len(text) < 4 or text in seen:
                continue
            seen.add(text)
            rows.append((text, {name: float(row[name]) if row[name] else None for name in CHEXPERT_CLASSES}))
    return rows


def agreement_f1(
    reference: Sequence[dict[str, float | None]], predicted: Sequence[dict[str, float | None]]
) -> dict[float, dict[str, float]]:
    """Agreement of two labelings, scored per value as the CheXpert labeler's outputs are compared.

    For each value v (``1.0``, ``0.0``, ``-1.0``) a cell is a true positive when both say v; the F1 is computed per
    finding and micro-averaged over the 13 findings (No Finding left out).

    Returns:
        `dict[float, dict[str, float]]`: ``{value: {finding: f1, ..., "micro": f1}}``.
    """
    if len(reference) != len(predicted):
        raise ValueError(f"{len(reference)} reference rows but {len(predicted)} predicted rows")
    scores: dict[float, dict[str, float]] = {}
    for value in (POSITIVE, NEGATIVE, UNCERTAIN):
        truth = np.array([[labels[name] == value for name in _FINDING_CLASSES] for labels in reference])
        guess = np.array([[labels[name] == value for name in _FINDING_CLASSES] for labels in predicted])
        per_class = f1_score(truth, guess, average=None, zero_division=0.0)
        scores[value] = dict(zip(_FINDING_CLASSES, per_class.tolist()))
        scores[value]["micro"] = float(f1_score(truth, guess, average="micro", zero_division=0.0))
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

_CLI_UNCERTAIN = ("keep", "positive", "negative", "ignore")


def _format_label(label: float | None, uncertain: str) -> str:
    if label == UNCERTAIN and uncertain != "keep":
        label = {"positive": POSITIVE, "negative": NEGATIVE, "ignore": None}[uncertain]
    return "" if label is None else f"{label:.1f}"


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m modeling_medclip.labeler``: label a CSV of reports into the CheXpert labeler's CSV format."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_medclip.labeler",
        description="Rule-based CheXpert-style labeler. Writes 'Reports' followed by the 14 CheXpert observations "
        "(1.0 positive, 0.0 negative, -1.0 uncertain, empty not mentioned).",
    )
    parser.add_argument("--input", required=True, type=Path, help="CSV file with one report per row.")
    parser.add_argument("--text_column", default="text", help="Column of --input holding the report text.")
    parser.add_argument("--output", required=True, type=Path, help="CSV file to write.")
    parser.add_argument("--level", choices=("report", "sentence"), default="report", help="One row per report or per sentence.")
    parser.add_argument(
        "--uncertain",
        choices=_CLI_UNCERTAIN,
        default="keep",
        help="Write uncertain labels as -1.0 (keep), 1.0 (positive), 0.0 (negative) or empty (ignore).",
    )
    parser.add_argument(
        "--skip_empty",
        action="store_true",
        help="Write empty reports with empty labels (report level) or no rows (sentence level) instead of failing.",
    )
    parser.add_argument("--phrases_dir", type=Path, default=None, help="Custom phrase folder (default: packaged).")
    args = parser.parse_args(argv)

    if not args.input.is_file():
        raise ValueError(f"input file {args.input} does not exist")
    labeler = CheXpertLabeler(phrases_dir=args.phrases_dir)
    with args.input.open(newline="", encoding="utf-8") as source:
        reader = csv.DictReader(source)
        if reader.fieldnames is None or args.text_column not in reader.fieldnames:
            raise ValueError(
                f"text column {args.text_column!r} not found in {args.input} (columns: {reader.fieldnames or []})"
            )
        rows = []
        for row_number, row in enumerate(reader, start=2):
            text = row[args.text_column] or ""
            if not text.strip():
                if not args.skip_empty:
                    raise ValueError(
                        f"{args.input} line {row_number}: column {args.text_column!r} is empty "
                        "(pass --skip_empty to write empty labels)"
                    )
                if args.level == "report":
                    rows.append((text, dict.fromkeys(CHEXPERT_CLASSES)))
                continue
            if args.level == "report":
                rows.append((text, labeler.label_report(text)))
            else:
                rows.extend(labeler.label_sentences(text))

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", newline="", encoding="utf-8") as target:
        writer = csv.writer(target)
        writer.writerow(["Reports", *CHEXPERT_CLASSES])
        for text, labels in rows:
            writer.writerow([text, *(_format_label(labels[name], args.uncertain) for name in CHEXPERT_CLASSES)])
    print(f"labelled {len(rows)} {args.level} rows from {args.input} -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
