"""What the web demo (`app.py`) does, as plain functions: read an upload, score findings, explain a score, retrieve
report sentences, label a report.

[`XrayDemo`] wraps a dual encoder and its processor: [`XrayDemo.classify`] gives zero-shot scores of an X-ray for a
built-in prompt set (CheXpert-5 as one-of-five, CheXpert-14 as present-vs-absent per finding) or for labels the user
types, [`XrayDemo.saliency`] the Grad-CAM map of one finding's prompts ([`modeling_medclip.saliency`]),
[`XrayDemo.nearest_sentences`] the closest sentences of a text index, and [`XrayDemo.label_report`] the labeler's 14
labels with the phrase that decided each. [`read_upload`] turns an uploaded file into an image or an [`UploadError`]
that says what is wrong with it; [`cached_text_index`] builds a text index once per model and corpus and keeps it on
disk. No corpus is named here: the caller passes the sentences.
"""

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from matplotlib.figure import Figure

from .collator import decode_image
from .labeler import CheXpertLabeler
from .modeling_medclip import DualEncoderModel
from .prompts import generate_prompts, multilabel_prompts
from .retrieval import EmbeddingIndex, embed_images
from .saliency import Saliency, image_text_saliency
from .zero_shot import ZeroShotClassifier

PROMPT_SETS = {
    "CheXpert-5": ("chexpert5", "multiclass"),
    "CheXpert-14": ("chexpert14", "multilabel"),
}
"""Built-in prompt sets by display name: `(prompts task, zero-shot mode)`."""
CUSTOM_LABELS = "Your own labels"
LABEL_NAMES = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "not mentioned"}
UPLOAD_FORMATS = "PNG, JPEG, 16-bit PNG or DICOM"
MAX_CACHED_CLASSIFIERS = 16


class UploadError(ValueError):
    """An uploaded file that cannot be shown or scored; the message is meant for the person who uploaded it."""


def read_upload(path: str | os.PathLike, max_bytes: int) -> PIL.Image.Image:
    """Decodes an uploaded chest X-ray (any format the image processor reads) into an 8-bit grayscale image.

    Args:
        path: the uploaded file; its name (not its folder) is what the error messages show.
        max_bytes: the largest file accepted.

    Raises:
        [`UploadError`] naming the file when it is empty, larger than `max_bytes`, not an image, corrupt or truncated
        (a DICOM file without readable pixels included).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UploadError(f"{path.name} is empty.")
    if size > max_bytes:
        raise UploadError(
            f"{path.name} is {size / 2**20:.1f} MB; the largest upload accepted is {max_bytes / 2**20:.0f} MB."
        )
    try:
        return decode_image(path, path.name)
    except PIL.Image.DecompressionBombError as error:
        raise UploadError(f"{path.name} has too many pixels to decode safely ({error}).") from error
    except ValueError as error:
        reason = str(error.__cause__ or error).replace(str(path), path.name)
        raise UploadError(f"{path.name} is not a readable {UPLOAD_FORMATS} image ({reason}).") from error


def parse_labels(text: str) -> list[str]:
    """Labels typed by a user, one per line or separated by commas / semicolons, without repeats."""
    labels = [label.strip() for label in re.split(r"[,;\n]", text or "")]
    return list(dict.fromkeys(label for label in labels if label))


@dataclass
class FindingScores:
    """
    Zero-shot scores of one image.

    Args:
        scores (`dict[str, float]`): the probability of every finding, in the prompt set's order.
        prompts (`dict[str, list[str]]`): the finding-present prompts of every finding (what the saliency explains).
        mode (`str`): `"multiclass"` (scores sum to 1 over the findings) or `"multilabel"` (each score is
            present-vs-absent on its own).
    """

    scores: dict[str, float]
    prompts: dict[str, list[str]]
    mode: str

    @property
    def top_finding(self) -> str:
        return max(self.scores, key=self.scores.get)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A SHA-256 of a model's parameters and buffers (names, dtypes, shapes, values): equal models, equal keys."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cached_text_index(
    model: DualEncoderModel,
    processor,
    texts: Sequence[str],
    cache_dir: str | os.PathLike,
    backend: str = "exact",
) -> EmbeddingIndex:
    """An [`EmbeddingIndex`] of `texts` (the texts are its ids), built once and then read from `cache_dir`.

    The file is named after a hash of the model's weights ([`model_fingerprint`]) and of the texts, so another model
    or another corpus gets its own index; it is written to a temporary name first and renamed, so an interrupted
    build never leaves a broken cache.
    """
    texts = list(texts)
    key = hashlib.sha256((model_fingerprint(model) + json.dumps(texts)).encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"text-index-{key}.safetensors"
    if path.is_file():
        return EmbeddingIndex.load(path, backend=backend)
    index = EmbeddingIndex.from_texts(model.eval(), processor, texts, ids=texts, backend=backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    index.save(partial)
    os.replace(partial, path)
    return index


class XrayDemo:
    r"""
    The demo's operations on one model.

    Args:
        model ([`ConVIRTModel`] or [`MedCLIPModel`]): the dual encoder (put in eval mode).
        processor ([`MedCLIPProcessor`]): its processor.
        sentence_index ([`EmbeddingIndex`], *optional*): report sentences (ids = the sentences) to retrieve from.
        labeler ([`CheXpertLabeler`], *optional*): the report labeler (the packaged phrase lists by default).
        prompts_per_class (`int`, defaults to 10): prompts drawn per finding for the built-in prompt sets.
        seed (`int`, defaults to 0): the prompt sampling seed.
    """

    def __init__(
        self,
        model: DualEncoderModel,
        processor,
        sentence_index: EmbeddingIndex | None = None,
        labeler: CheXpertLabeler | None = None,
        prompts_per_class: int = 10,
        seed: int = 0,
    ):
        self.model = model.eval()
        self.processor = processor
        self.sentence_index = sentence_index
        self.labeler = labeler if labeler is not None else CheXpertLabeler()
        self.prompts_per_class = prompts_per_class
        self.seed = seed
        self._classifiers: dict[tuple, ZeroShotClassifier] = {}

    def _classifier(self, prompt_set: str, labels: tuple[str, ...]) -> ZeroShotClassifier:
        key = (prompt_set, labels)
        if key not in self._classifiers:
            if prompt_set == CUSTOM_LABELS:
                class_prompts, mode = {label: [label] for label in labels}, "multiclass"
            elif prompt_set in PROMPT_SETS:
                task, mode = PROMPT_SETS[prompt_set]
                generate = generate_prompts if mode == "multiclass" else multilabel_prompts
                class_prompts = generate(task, n_per_class=self.prompts_per_class, seed=self.seed)
            else:
                raise ValueError(f"unknown prompt set {prompt_set!r}; expected one of {[*PROMPT_SETS, CUSTOM_LABELS]}")
            if len(self._classifiers) >= MAX_CACHED_CLASSIFIERS:  # typed label sets come and go: drop the oldest
                del self._classifiers[next(iter(self._classifiers))]
            self._classifiers[key] = ZeroShotClassifier(self.model, self.processor, class_prompts, mode=mode)
        return self._classifiers[key]

    def classify(self, image: PIL.Image.Image, prompt_set: str, labels: str = "") -> FindingScores:
        """Zero-shot scores of `image` for a built-in prompt set, or for `labels` (as typed, see [`parse_labels`])
        when `prompt_set` is `CUSTOM_LABELS`.

        Raises:
            `ValueError` when fewer than two labels are typed (one label would always score 1).
        """
        parsed = tuple(parse_labels(labels)) if prompt_set == CUSTOM_LABELS else ()
        if prompt_set == CUSTOM_LABELS and len(parsed) < 2:
            raise ValueError("Type at least two labels, separated by commas (for example: pleural effusion, normal).")
        classifier = self._classifier(prompt_set, parsed)
        probs = classifier.classify([image]).probs[0].tolist()
        prompts = {
            name: prompts if classifier.mode == "multiclass" else prompts["positive"]
            for name, prompts in classifier.class_prompts.items()
        }
        return FindingScores(dict(zip(classifier.class_names, probs)), prompts, classifier.mode)

    def saliency(self, image: PIL.Image.Image, prompts: str | Sequence[str]) -> Saliency:
        """Grad-CAM of the similarity of `image` with a finding's prompts ([`image_text_saliency`])."""
        return image_text_saliency(self.model, self.processor, image, prompts)

    def nearest_sentences(self, image: PIL.Image.Image, k: int = 5) -> list[tuple[str, float]]:
        """The `k` sentences of the index closest to `image`, best first, with their cosine similarity."""
        if self.sentence_index is None:
            raise ValueError("no sentence index was given to the demo")
        k = min(k, len(self.sentence_index))
        scores, indices = self.sentence_index.search(embed_images(self.model, self.processor, [image]), k)
        return [(self.sentence_index.ids[i], score) for i, score in zip(indices[0].tolist(), scores[0].tolist())]

    def label_report(self, text: str) -> list[tuple[str, str, str]]:
        """The labeler's 14 labels of a report: `(finding, "positive" | "negative" | "uncertain" | "not mentioned",
        the phrase of the report that decided it or "")`, in CheXpert's order.

        Raises:
            `ValueError` when the text is empty.
        """
        evidence = self.labeler.label_report_with_evidence(text)
        return [(name, LABEL_NAMES[label], span or "") for name, (label, span) in evidence.items()]


def score_chart(scores: FindingScores, title: str) -> Figure:
    """A horizontal bar chart of the scores, highest on top, each bar labelled with its value."""
    names = sorted(scores.scores, key=scores.scores.get)
    values = [scores.scores[name] for name in names]
    figure = Figure(figsize=(5.2, max(3.6, 0.3 * len(names) + 1.2)), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(names, values, color="#3b6ea8")
    axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], padding=3, fontsize=9)
    axes.set_xlim(0, 1.12)
    axes.set_xlabel(
        "probability (sums to 1 over the findings)" if scores.mode == "multiclass"
        else "probability of present vs absent, per finding"
    )
    axes.set_title(title, fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    return figure


__all__ = [
    "CUSTOM_LABELS",
    "LABEL_NAMES",
    "PROMPT_SETS",
    "UPLOAD_FORMATS",
    "FindingScores",
    "UploadError",
    "XrayDemo",
    "cached_text_index",
    "model_fingerprint",
    "parse_labels",
    "read_upload",
    "score_chart",
]
