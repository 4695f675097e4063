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
"""Rule-based labeler for chest X-ray reports that follows the Stanford CheXpert labeler's design and conventions.

The Stanford CheXpert labeler (Irvin et al., 2019) works in three steps, and so does this one:

1. **Mention extraction.** Each of the 13 findings (and a list of other abnormalities that only matter for No
   Finding) has a list of mention phrases; a phrase found in a sentence is a mention unless it lies inside one of
   the observation's *unmention* phrases ("calcified nodule" is no Lung Lesion, "pericardial effusion" no Pleural
   Effusion, "over the heart" no Cardiomegaly). Observations are matched independently, so one stretch of text
   can mention several ("hydropneumothorax", "cardiac silhouette"). An anatomical mention ("heart size",
   "cardiac silhouette", "mediastinum", "contour") is a mention like any other: positive unless a rule says
   otherwise.
2. **Classification.** Each mention is tested against three ordered stages of rules: *pre-negation uncertainty*
   ("cannot exclude", "not ruled out", "no new"), then *negation* ("no", "without", "normal", "has resolved"),
   then *post-negation uncertainty* ("may", "possible", "versus", "X or Y", "stable cardiac silhouette",
   "vascular congestion"). The first stage that matches decides: uncertain, negative, uncertain; no match means
   positive.
3. **Aggregation** into one label per observation: one label is kept as is; negative and uncertain mentions
   together give uncertain; otherwise a positive mention wins. A positive or uncertain "heart failure" / "CHF"
   adds an uncertain Cardiomegaly mention. No Finding is positive when no mention other than Support Devices is
   positive or uncertain (the No Finding phrase list included), else blank.

The original runs its rules over a dependency parse (NegBio); here every rule is a trigger phrase with a scope over
tokens: a *pre* trigger governs the words after it, a *post* trigger the words before it, within a window of words
that a clause boundary ends ("but", "which", ";", a comma that starts a new clause). Each item of a comma / "or"
list gets the full window, which is how "no effusion, pneumothorax, or consolidation" negates all three. The
rules, phrase lists and the conventions that differ from the original on purpose are in ``labeler_phrases/``
(see the README.md there). Plain Python, no parser, thousands of reports per second on one CPU core.

Labels follow CheXpert's convention: ``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain and ``None`` not
mentioned (blank in the CSV output).

Command line, writing the CheXpert labeler's own CSV format (``Reports`` then the 14 observations)::

    python -m modeling_medclip.labeler --input reports.csv --text_column text --output labeled.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import math
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

_FINDING_CLASSES = CHEXPERT_CLASSES[1:]
# Mention sections of mentions.txt besides the findings: abnormalities that only make No Finding blank, and phrases
# (Edema mentions) whose positive or uncertain mention adds an uncertain Cardiomegaly.
_NO_FINDING, _IMPLIES_CARDIOMEGALY = "No Finding", "implies uncertain Cardiomegaly"
_STAGES = {  # file -> (stage rank, label): the stages are tried in this order
    "pre_negation_uncertainty": (0, UNCERTAIN),
    "negation": (1, NEGATIVE),
    "post_negation_uncertainty": (2, UNCERTAIN),
}

# Words are runs of letters / digits ("x-ray" -> "x", "ray"); "/" and a few punctuation marks are kept as tokens.
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[,;:()?/]")
_PHRASE_TOKEN_RE = re.compile(r"[a-z0-9]+\*?|[,;:()?]")
# Tokens that start a new clause: a comma followed by one of them before any "or" / "and" ends a scope.
_CLAUSE_VERBS = frozenset(
    {"is", "are", "was", "were", "has", "have", "had", "there", "be", "been", "appears", "appear", "seen", "noted"}
)
_LIST_CONJUNCTIONS = frozenset({"or", "and", "nor"})
# Tokens that end the scope of a rule that governs only its own noun phrase (the anatomy rules).
_NOUN_PHRASE_ENDS = frozenset({",", "of"})

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
    """Lowercase word tokens of ``text`` plus the punctuation that bounds scopes (``, ; : ( ) ?``), cleaned as the
    CheXpert labeler cleans its input: ``and/or`` and ``a/b`` become ``or`` and ``a or b``."""
    return tokenize_with_offsets(text)[0]


def tokenize_with_offsets(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """`tokenize` plus each token's ``(start, end)`` character offsets in ``text`` (an ``or`` made from a slash has
    the slash's offsets)."""
    tokens: list[str] = []
    offsets: list[tuple[int, int]] = []
    for match in _TOKEN_RE.finditer(text.lower()):
        token = match.group()
        if token == "/":
            if tokens and tokens[-1] == "and":  # "and/or" -> "or"
                tokens[-1], offsets[-1] = "or", (offsets[-1][0], match.end())
            elif text[match.start() - 1 : match.start()].isalpha() and text[match.end() : match.end() + 1].isalpha():
                tokens.append("or")
                offsets.append(match.span())
            continue
        if token == "or" and tokens and tokens[-1] == "or" and offsets[-1][1] == match.start():
            offsets[-1] = (offsets[-1][0], match.end())  # the "or" of "and/or"
            continue
        tokens.append(token)
        offsets.append(match.span())
    return tokens, offsets


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


def _phrase_words(phrase: str, source: str) -> list[str]:
    words = _PHRASE_TOKEN_RE.findall(phrase)
    if not words or " ".join(words) != " ".join(phrase.split()):
        raise ValueError(f"{source}: cannot parse phrase {phrase!r} (use lowercase words, optional trailing '*')")
    for word in words:
        if word.endswith("*") and len(word) < 4:
            raise ValueError(f"{source}: wildcard prefix {word!r} in {phrase!r} needs at least 3 characters")
    return words


def _phrase_regex(phrases: Sequence[str], source: str) -> re.Pattern:
    """One pattern over space-joined tokens matching any of ``phrases`` on whole tokens (``word*``: any token that
    starts with ``word``), longest alternatives first."""
    alternatives = []
    for phrase in phrases:
        words = _phrase_words(phrase, source)
        alternatives.append(" ".join(re.escape(w[:-1]) + "[^ ]*" if w.endswith("*") else re.escape(w) for w in words))
    alternatives.sort(key=len, reverse=True)
    return re.compile(r"(?<![^ ])(?:" + "|".join(alternatives) + r")(?![^ ])")


class _PhraseTrie:
    """Token trie over trigger phrases; a phrase word ending in ``*`` matches any token starting with it.

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
        node = self._root
        for word in _phrase_words(phrase, source):
            if word.endswith("*"):
                prefix = word[:-1]
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
class _Rule:
    """What a trigger phrase does: its stage (rank into `_STAGES`), direction and window, and whether it only
    governs anatomical mentions ("stable" qualifies "cardiac silhouette", not "cardiomegaly"; such a rule governs
    only its own clause and list item: no comma may lie between)."""

    stage: int
    label: float
    direction: str  # "pre", "post", "both" or "self" (a phrase that contains the mention)
    window: int
    anatomy_only: bool


@dataclass(frozen=True)
class _Mention:
    """One classified mention: the observation, its label and its ``[start, end)`` token span in the sentence."""

    observation: str
    label: float
    start: int
    end: int


class CheXpertLabeler:
    """Rule-based labeler following the Stanford CheXpert labeler (mentions, three rule stages, aggregation).

    Args:
        phrases_dir (`str` or `Path`, *optional*):
            Folder with ``mentions.txt``, ``pre_negation_uncertainty.txt``, ``negation.txt``,
            ``post_negation_uncertainty.txt`` and ``scope.txt`` (default: the packaged ``labeler_phrases/``). See
            the README.md of that folder for the format.
        pre_window (`int`, *optional*, defaults to 8):
            How many words after a pre-trigger ("no", "possible") its scope reaches, unless its section says.
        post_window (`int`, *optional*, defaults to 6):
            How many words before a post-trigger ("is not seen", "cannot be excluded") its scope reaches, unless
            its section says.

    Example:

    ```python
    >>> labeler = CheXpertLabeler()
    >>> labeler.label_report("No pleural effusion or pneumothorax. Mild cardiomegaly.")["Cardiomegaly"]
    1.0
    ```
    """

    def __init__(self, phrases_dir: str | Path | None = None, pre_window: int = 8, post_window: int = 6):
        phrases_dir = Path(phrases_dir) if phrases_dir is not None else PHRASES_DIR
        self.pre_window = pre_window
        self.post_window = post_window
        files = {name: phrases_dir / f"{name}.txt" for name in ("mentions", "scope", *_STAGES)}
        for path in files.values():
            if not path.is_file():
                raise ValueError(f"phrase file {path} not found (phrases_dir={phrases_dir})")
        self._load_mentions(files["mentions"])
        self._triggers = _PhraseTrie()
        for name in _STAGES:
            self._load_rules(files[name], *_STAGES[name])
        scope = read_phrase_file(files["scope"])
        for section in ("scope_end", "pseudo"):
            if section not in scope:
                raise ValueError(f"phrase file {files['scope']} has no [{section}] section")
            for phrase in scope[section]:
                self._triggers.add(phrase, section, source=str(files["scope"]))

    def _load_mentions(self, path: Path) -> None:
        sections = read_phrase_file(path)
        observations = (*_FINDING_CLASSES, _NO_FINDING, _IMPLIES_CARDIOMEGALY)
        self._mention_patterns: dict[str, re.Pattern] = {}
        self._unmention_patterns: dict[str, re.Pattern] = {}
        self._mention_starts: dict[str, frozenset[str]] = {}
        anatomy: list[str] = []
        for section, phrases in sections.items():
            kind, _, name = section.rpartition(":")
            name, kind = name.strip(), kind.strip()
            if section == "anatomy":
                anatomy = phrases
            elif name in observations and kind in ("", "unmention"):
                target = self._unmention_patterns if kind else self._mention_patterns
                target[name] = _phrase_regex(phrases, f"{path} [{section}]")
                if not kind:  # the first 3 characters a mention can start with: sentences without them are skipped
                    self._mention_starts[name] = frozenset(phrase.split()[0].rstrip("*")[:3] for phrase in phrases)
            else:
                raise ValueError(
                    f"{path}: unknown section [{section}]; expected one of {observations}, optionally after "
                    "'unmention:', or [anatomy]"
                )
        missing = [name for name in observations if name not in self._mention_patterns]
        if missing:
            raise ValueError(f"{path}: no mention section for {missing}")
        self._anatomy = frozenset(anatomy)

    def _load_rules(self, path: Path, stage: int, label: float) -> None:
        """Sections ``[pre]``, ``[post]``, ``[both]`` or ``[self]``, optionally followed by a window and
        ``anatomy``: ``[post 4 anatomy]``."""
        for section, phrases in read_phrase_file(path).items():
            words = section.split()
            direction = words[0] if words else ""
            window = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
            anatomy_only = words[-1] == "anatomy" and len(words) > 1
            known_words = 1 + (window is not None) + anatomy_only
            if direction not in ("pre", "post", "both", "self") or len(words) != known_words:
                raise ValueError(
                    f"{path}: unknown section [{section}]; expected [pre|post|both|self [window] [anatomy]]"
                )
            if window is None:
                window = self.post_window if direction == "post" else self.pre_window
            rule = _Rule(stage, label, direction, window, anatomy_only)
            for phrase in phrases:
                self._triggers.add(phrase, rule, source=f"{path} [{section}]")

    # ------------------------------------------------------------------------------------------------------------
    # Sentence-level mentions
    # ------------------------------------------------------------------------------------------------------------

    def _find_mentions(self, tokens: list[str]) -> list[tuple[str, int, int]]:
        """``(observation, start, end)`` token spans of every mention, each observation matched on its own."""
        joined = " ".join(tokens)
        starts = {token[:3] for token in tokens}
        token_at: dict[int, int] = {}
        found = []
        for name, pattern in self._mention_patterns.items():
            if starts.isdisjoint(self._mention_starts[name]):
                continue
            matches = list(pattern.finditer(joined))
            if not matches:
                continue
            if not token_at:
                position = 0
                for index, token in enumerate(tokens):
                    token_at[position] = index
                    position += len(token) + 1
            unmention = self._unmention_patterns.get(name)
            blocked = [match.span() for match in unmention.finditer(joined)] if unmention is not None else []
            for match in matches:
                start, end = match.span()
                if any(start < b_end and b_start < end for b_start, b_end in blocked):
                    continue
                found.append((name, token_at[start], token_at[start] + match.group().count(" ") + 1))
        return found

    def _scope_breaks(self, tokens: list[str], triggers: list[tuple[int, int, frozenset]]) -> list[bool]:
        """``breaks[i]`` is True when token ``i`` ends any scope that crosses it."""
        breaks = [False] * len(tokens)
        for start, end, tags in triggers:
            if "scope_end" in tags:
                breaks[start:end] = [True] * (end - start)
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
    def _distance(tokens: list[str], breaks: list[bool], start: int, end: int, lists: bool = True) -> int | None:
        """Words between ``start`` and ``end``, counted from the last list comma (each list item gets the full
        window), or None when a scope break lies between. With ``lists`` False the scope is one noun phrase: any
        comma or ``of`` ends it ("stable widening of the mediastinum": "stable" qualifies the widening)."""
        words = 0
        for index in range(start, end):
            if breaks[index] or not lists and tokens[index] in _NOUN_PHRASE_ENDS:
                return None
            words = 0 if tokens[index] == "," else words + 1
        return words

    def _classify(
        self,
        tokens: list[str],
        breaks: list[bool],
        rules: list[tuple[int, int, _Rule]],
        start: int,
        end: int,
        mention_ends: frozenset[int],
    ) -> float:
        """Label the mention at tokens ``[start, end)``: the earliest stage with a rule whose scope covers it, or
        positive. A coordination ("or", "versus": a ``both`` rule) reaches forward over its window but back only to
        the mention that ends right before it ("infectious etiology versus scarring": the etiology is the
        alternative, not "infectious"), and only within its own list: not past a trigger that opens one
        ("opacities, without consolidation, or effusion": the opacities are no alternative). It reaches forward
        over a modifier ("or focal consolidation") only when a mention (one of ``mention_ends``, the end tokens of
        the sentence's mentions) ends right before it: otherwise it joins modifiers ("acute or subacute fracture")."""
        anatomy = tokens[end - 1] in self._anatomy
        best: _Rule | None = None
        for t_start, t_end, rule in rules:
            if best is not None and rule.stage >= best.stage or rule.anatomy_only and not anatomy:
                continue
            if t_end <= start and rule.direction in ("pre", "both"):
                distance = self._distance(tokens, breaks, t_end, start, not rule.anatomy_only)
                if distance and rule.direction == "both" and t_start not in mention_ends:
                    distance = None
            elif t_start >= end and rule.direction == "post":
                distance = self._distance(tokens, breaks, end, t_start, not rule.anatomy_only)
            elif t_start >= end and rule.direction == "both":
                opens_list = any(end <= o_start < t_start and o_rule.direction == "pre" for o_start, _, o_rule in rules)
                distance = None if opens_list else self._distance(tokens, breaks, end, t_start)
                # the left alternative ends right before the conjunction: a noun phrase's head is its last word
                distance = distance if distance == 0 else None
            elif rule.direction == "self" and t_start <= start and end <= t_end:
                distance = 0
            else:
                continue
            if distance is not None and distance <= rule.window:
                best = rule
        return POSITIVE if best is None else best.label

    def _sentence_mentions(self, tokens: list[str]) -> list[_Mention]:
        found = self._find_mentions(tokens)
        if not found:
            return []
        triggers = self._triggers.find(tokens)
        breaks = self._scope_breaks(tokens, triggers)
        rules = [(start, end, tag) for start, end, tags in triggers for tag in tags if isinstance(tag, _Rule)]
        mention_ends = frozenset(end for _, _, end in found)
        return [
            _Mention(name, self._classify(tokens, breaks, rules, start, end, mention_ends), start, end)
            for name, start, end in found
        ]

    # ------------------------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_text(text: Any, what: str) -> str:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{what} is empty: there is nothing to label")
        return text

    def _labelled_sentences(self, text: str) -> list[tuple[str, list[tuple[int, int]], list[_Mention]]]:
        labelled = []
        for sentence in split_sentences(text):
            tokens, offsets = tokenize_with_offsets(sentence)
            labelled.append((sentence, offsets, self._sentence_mentions(tokens)))
        return labelled

    def label_sentence(self, text: str) -> dict[str, float | None]:
        """Label one sentence (not split further): its mentions aggregated as a report's are.

        Args:
            text (`str`): the sentence.

        Returns:
            `dict[str, float | None]`: for each of the 14 `CHEXPERT_CLASSES`, in order, ``1.0`` positive, ``0.0``
            negative, ``-1.0`` uncertain or ``None`` not mentioned. ``No Finding`` is ``1.0`` when no mention but
            Support Devices is positive or uncertain, else ``None`` (CheXpert's rule).

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.
        """
        tokens = tokenize(self._check_text(text, "sentence text"))
        return _aggregate(self._sentence_mentions(tokens))[0]

    def label_report(self, text: str) -> dict[str, float | None]:
        """Label a whole report: the mentions of all its sentences are aggregated per observation (one label kept;
        negative + uncertain -> uncertain; else positive wins), heart failure adds an uncertain Cardiomegaly and
        No Finding is derived as in CheXpert.

        Args:
            text (`str`): the report (findings and / or impression).

        Returns:
            `dict[str, float | None]`: the 14 labels, keyed and ordered as `CHEXPERT_CLASSES`.

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.
        """
        self._check_text(text, "report text")
        mentions = [mention for _, _, found in self._labelled_sentences(text) for mention in found]
        return _aggregate(mentions)[0]

    def label_report_with_evidence(self, text: str) -> dict[str, tuple[float | None, str | None]]:
        """Label a report as `label_report` does, and give for each observation the text that decided its label.

        Args:
            text (`str`): the report.

        Returns:
            `dict[str, tuple[float | None, str | None]]`: for each of the 14 `CHEXPERT_CLASSES`, in order,
            ``(label, evidence)``: the report-level label (as `label_report`) and the mention, as it is written in
            the report, that decided it (the first mention with the winning label; "heart failure" for a
            Cardiomegaly it implies); ``(None, None)`` when not mentioned. No Finding, derived from the others,
            has no evidence (``None``).

        Raises:
            `ValueError`: when ``text`` is not a string or is empty.

        Example:

        ```python
        >>> CheXpertLabeler().label_report_with_evidence("No pleural effusion. Mild Cardiomegaly.")["Cardiomegaly"]
        (1.0, 'Cardiomegaly')
        ```
        """
        self._check_text(text, "report text")
        mentions, spans = [], []
        for sentence, offsets, found in self._labelled_sentences(text):
            for mention in found:
                mentions.append(mention)
                spans.append(sentence[offsets[mention.start][0] : offsets[mention.end - 1][1]])
        labels, deciding = _aggregate(mentions)
        return {
            name: (labels[name], None if deciding.get(name) is None else spans[deciding[name]])
            for name in CHEXPERT_CLASSES
        }

    def label_sentences(self, text: str) -> list[tuple[str, dict[str, float | None]]]:
        """Split a report with `split_sentences` and label each sentence: ``[(sentence, labels), ...]``."""
        self._check_text(text, "report text")
        return [(sentence, _aggregate(found)[0]) for sentence, _, found in self._labelled_sentences(text)]

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
                -> 0.0 (U-Zeros), ``"ignore"`` -> NaN, which `semantic_matching_loss` masks: a pair whose label
                agreement depends on an ignored entry counts as neither a match nor a negative. Use `label_report`
                to keep the -1 values.
            level (`str`, *optional*, defaults to `"report"`): ``"report"`` or ``"sentence"`` (label ``text``
                as one sentence, no splitting).

        Returns:
            `list[float]`: length 14, ordered as `CHEXPERT_CLASSES`; not mentioned and negative are 0.0.
        """
        _check_level(level)
        _check_uncertain(uncertain)
        labels = self.label_report(text) if level == "report" else self.label_sentence(text)
        return labels_to_vector(labels, uncertain=uncertain)


def _aggregate(mentions: Sequence[_Mention]) -> tuple[dict[str, float | None], dict[str, int]]:
    """CheXpert's aggregation of classified mentions into the 14 labels, and for each labelled finding the index
    (into ``mentions``) of the first mention carrying its label."""
    found: dict[str, list[tuple[float, int]]] = {}
    no_finding = POSITIVE
    for index, mention in enumerate(mentions):
        if mention.observation != "Support Devices" and mention.label != NEGATIVE:
            no_finding = None
        if mention.observation == _IMPLIES_CARDIOMEGALY:
            if mention.label != NEGATIVE:
                found.setdefault("Cardiomegaly", []).append((UNCERTAIN, index))
        elif mention.observation != _NO_FINDING:
            found.setdefault(mention.observation, []).append((mention.label, index))
    labels: dict[str, float | None] = {"No Finding": no_finding}
    deciding: dict[str, int] = {}
    for name in _FINDING_CLASSES:
        values = found.get(name)
        if not values:
            labels[name] = None
            continue
        kinds = {label for label, _ in values}
        label = UNCERTAIN if {NEGATIVE, UNCERTAIN} <= kinds else POSITIVE if len(kinds) > 1 else values[0][0]
        labels[name] = label
        deciding[name] = next(index for value, index in values if value == label)
    return labels, deciding


def _check_level(level: str) -> None:
    if level not in ("report", "sentence"):
        raise ValueError(f"level must be 'report' or 'sentence', got {level!r}")


def _check_uncertain(uncertain: str) -> None:
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")


def labels_to_vector(labels: dict[str, float | None], uncertain: str = "positive") -> list[float]:
    """Map CheXpert labels (a dict keyed as `CHEXPERT_CLASSES`) to a length-14 vector of 0.0 / 1.0 (and NaN for
    uncertain labels under ``"ignore"``); see `CheXpertLabeler.label_vector` for the ``uncertain`` policies."""
    _check_uncertain(uncertain)
    uncertain_value = {"positive": POSITIVE, "negative": NEGATIVE, "ignore": math.nan}[uncertain]
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
    columns, records = read_csv_rows(path)
    missing = [name for name in ("Reports", *CHEXPERT_CLASSES) if name not in columns]
    if missing:
        raise ValueError(f"{path} is not in the CheXpert labeler's format: columns {missing} are missing")
    rows, seen = [], set()
    for row in records:
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


_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# Report text can be long (a whole report, or many joined); csv's default field limit is 131,072 characters.
_FIELD_SIZE_LIMIT = min(sys.maxsize, 2**31 - 1)


def escape_formula(text: str) -> str:
    """Defuse CSV injection: a cell starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by
    spreadsheet programs as a formula, so it gets a leading ``'`` (OWASP's guidance); other text is unchanged."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a UTF-8 CSV (a byte-order mark, as Excel writes it, is dropped; fields of any length are accepted).

    Returns:
        `tuple[list[str], list[dict[str, str]]]`: the column names and the rows.

    Raises:
        `ValueError`: when the file is not valid UTF-8, naming the file, the record and line, and the bad bytes.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        prefix = data[: error.start].decode("utf-8-sig")
        record = sum(1 for _ in csv.reader(io.StringIO(prefix + "x")))
        line = prefix.count("\n") + 1
        raise ValueError(
            f"{path} is not valid UTF-8: record {record} (line {line}, counting the header as record 1) has the "
            f"bytes {data[error.start : error.end]!r} at byte {error.start} ({error.reason}); save it as UTF-8"
        ) from None
    limit = csv.field_size_limit()
    csv.field_size_limit(_FIELD_SIZE_LIMIT)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    finally:
        csv.field_size_limit(limit)
    return list(reader.fieldnames or []), rows


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m modeling_medclip.labeler``: label a CSV of reports into the CheXpert labeler's CSV format.

    The input is UTF-8 (with or without a byte-order mark). In the output, report text that a spreadsheet would run
    as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is written with a leading
    ``'`` (see `escape_formula`); ``--no_escape_formulas`` writes the text unchanged.
    """
    parser = argparse.ArgumentParser(
        prog="python -m modeling_medclip.labeler",
        description="Rule-based CheXpert labeler. Writes 'Reports' followed by the 14 CheXpert observations "
        "(1.0 positive, 0.0 negative, -1.0 uncertain, empty not mentioned).",
    )
    parser.add_argument("--input", required=True, type=Path, help="UTF-8 CSV file with one report per row.")
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
    parser.add_argument(
        "--no_escape_formulas",
        action="store_true",
        help="Write report text starting with =, +, -, @, tab or carriage return unchanged (by default it gets a "
        "leading ' so that spreadsheet programs do not run it as a formula).",
    )
    parser.add_argument("--phrases_dir", type=Path, default=None, help="Custom phrase folder (default: packaged).")
    args = parser.parse_args(argv)

    if not args.input.is_file():
        raise ValueError(f"input file {args.input} does not exist")
    labeler = CheXpertLabeler(phrases_dir=args.phrases_dir)
    columns, records = read_csv_rows(args.input)
    if args.text_column not in columns:
        raise ValueError(f"text column {args.text_column!r} not found in {args.input} (columns: {columns})")
    rows = []
    for row_number, row in enumerate(records, start=2):
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
            cell = text if args.no_escape_formulas else escape_formula(text)
            writer.writerow([cell, *(_format_label(labels[name], args.uncertain) for name in CHEXPERT_CLASSES)])
    print(f"labelled {len(rows)} {args.level} rows from {args.input} -> {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
