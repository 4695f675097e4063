"""Training data sources by name: `NAME=PATH`, `NAME` (its shared data folder) or `hub:org/name`, mixed by weight.

A source names a builder of [`BUILDERS`] and its folder, or a Hub dataset repo (parquet shards, e.g. written by
`to_parquet`), streamed with `load_dataset(..., streaming=True)`. [`image_stream`] turns image sources into one
stream of examples in a common form (below), with the 14 CheXpert label vectors of the semantic loss from each
corpus's own labels where it has them (see `Builder.image_labels`), else from the report labeler; [`text_stream`]
turns text sources into the labelled report sentences of MedCLIP's text stream.

Mixing. Several sources are combined with `datasets.interleave_datasets` (weights as `probabilities`, seeded,
`all_exhausted`: an epoch ends when every source has been seen once, smaller ones repeat), or concatenated when no
weights are given (each example once per epoch). In datasets 5.2 a multi-source stream over *parquet* (arrow) sources
sleeps `SLEEP_TIME_ON_THREADS_SHUTDOWN` = 5 s at the end of every pass; a Hub source is therefore re-wrapped as a
generator stream over its own shards ([`as_generator_stream`]), which reads the same files without that wait.

Common form of a training image example::

    {"image": {"path": str | None, "bytes": bytes | None}, "text": str, "labels": 14 floats,
     "image_id": str, "study_id": str, "patient_id": str, "source": str}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import (
    ClassLabel,
    Features,
    Image,
    IterableDataset,
    List,
    Value,
    concatenate_datasets,
    interleave_datasets,
    load_dataset,
)

from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler

from .pairing import report_sentences
from .paths import shared_data_dir
from .registry import Builder, class_label_vector, get_builder, own_or_report_labels


HUB_PREFIX = "hub:"
IMAGE_FEATURES = Features(
    {
        "image": Image(decode=False),
        "text": Value("string"),
        "labels": List(Value("float32"), length=len(CHEXPERT_CLASSES)),
        "image_id": Value("string"),
        "study_id": Value("string"),
        "patient_id": Value("string"),
        "source": Value("string"),
    }
)


@dataclass(frozen=True)
class Source:
    """One data source: a registered builder and its folder, or a Hub dataset repo (`builder is None`)."""

    name: str  # the builder name, or the Hub repo id
    location: str  # the corpus folder, or the Hub repo id
    is_hub: bool = False

    @property
    def builder(self) -> Builder | None:
        return None if self.is_hub else get_builder(self.name)

    def __str__(self) -> str:
        return f"{HUB_PREFIX}{self.name}" if self.is_hub else f"{self.name}={self.location}"


def parse_source(spec: str) -> Source:
    """`"NAME=PATH"`, `"NAME"` (the builder's folder under `shared_data_dir()`) or `"hub:org/name"`."""
    if spec.startswith(HUB_PREFIX):
        repo_id = spec[len(HUB_PREFIX) :]
        if repo_id.count("/") != 1:
            raise ValueError(f"data source {spec!r}: a Hub dataset is given as hub:<org>/<name>")
        return Source(repo_id, repo_id, is_hub=True)
    name, _, location = spec.partition("=")
    builder = get_builder(name)
    if not location:
        if builder.shared_folder is None:
            raise ValueError(f"data source {spec!r}: give the corpus folder, as {name}=/path/to/{name}")
        location = str(shared_data_dir() / builder.shared_folder)
    if not Path(location).exists():
        raise FileNotFoundError(f"data source {spec!r}: {location} does not exist")
    return Source(name, location)


def parse_sources(specs: Sequence[str], weights: Sequence[float] | None = None, what: str = "--image_dataset"):
    """The sources of `specs`, with `weights` checked: one positive weight per source, or none."""
    sources = [parse_source(spec) for spec in specs]
    if not sources:
        raise ValueError(f"{what} names no data source")
    if weights:
        if len(weights) != len(sources):
            raise ValueError(f"{what}_weights has {len(weights)} weights for {len(sources)} sources")
        if any(weight <= 0 for weight in weights):
            raise ValueError(f"{what}_weights must be positive, got {list(weights)}")
    return sources


def as_generator_stream(dataset: IterableDataset) -> IterableDataset:
    """The same examples and shards as a generator stream (no arrow thread pool, so no 5 s wait when mixed)."""
    shards = [dataset.shard(num_shards=dataset.num_shards, index=i) for i in range(dataset.num_shards)]
    return IterableDataset.from_generator(_examples_of, features=dataset.features, gen_kwargs={"shards": shards})


def _examples_of(shards: list[IterableDataset]) -> Iterator[dict]:
    for shard in shards:
        yield from shard


def load_source(source: Source, *, for_training: bool = False, num_shards: int | None = None) -> IterableDataset:
    """The raw stream of a source (the builder's examples, or the Hub repo's train split)."""
    if source.is_hub:
        return as_generator_stream(load_dataset(source.name, split="train", streaming=True))
    builder = source.builder
    kwargs = dict(builder.train_kwargs) if for_training else {}
    if num_shards is not None:
        kwargs["num_shards"] = num_shards
    return builder(source.location, **kwargs)


class ImageLabeller:
    """Maps a source's examples to the common form, with their CheXpert label vector (see the module)."""

    def __init__(self, source: Source, class_names: Sequence[str] | None, uncertain: str):
        self.source = source
        self.class_names = list(class_names) if class_names else None
        self.uncertain = uncertain
        self.labeler = CheXpertLabeler()

    def label_vector(self, example: dict) -> list[float]:
        function = own_or_report_labels if self.source.builder is None else self.source.builder.label_vector
        vector = function(example, self.labeler, self.uncertain)
        if vector is None and isinstance(example.get("labels"), int) and self.class_names:
            vector = class_label_vector(self.class_names[example["labels"]])
        if vector is None:
            raise ValueError(
                f"image {example.get('image_id')!r} of {self.source} has no CheXpert label vector: no CheXpert "
                "labels, no report to label and no class that names a CheXpert observation"
            )
        return vector

    def __call__(self, example: dict) -> dict:
        image = example["image"]
        return {
            "image": image if isinstance(image, dict) else {"path": image, "bytes": None} if isinstance(image, str)
            else {"path": None, "bytes": image},
            "text": example.get("text") or "",
            "labels": self.label_vector(example),
            "image_id": str(example.get("image_id", "")),
            "study_id": str(example.get("study_id", example.get("image_id", ""))),
            "patient_id": str(example.get("patient_id", example.get("image_id", ""))),
            "source": str(self.source),
        }  # fmt: skip


class PatientFilter:
    """`filter` predicate: the example's patient is (`keep=True`) or is not (`keep=False`) one of `patient_ids`."""

    def __init__(self, patient_ids, keep: bool = False):
        self.patient_ids = frozenset(str(patient_id) for patient_id in patient_ids)
        self.keep = keep

    def __call__(self, example: dict) -> bool:
        return (str(example["patient_id"]) in self.patient_ids) == self.keep


def has_report(example: dict) -> bool:
    """`filter` predicate: the example has a non-empty report."""
    return bool((example.get("text") or "").strip())


def mix(datasets: list[IterableDataset], weights: Sequence[float] | None, seed: int) -> IterableDataset:
    """One stream of several: interleaved by `weights` (seeded, every source seen once per epoch), else concatenated."""
    if len(datasets) == 1:
        return datasets[0]
    if not weights:
        return concatenate_datasets(datasets)
    total = float(sum(weights))
    return interleave_datasets(
        datasets, probabilities=[w / total for w in weights], seed=seed, stopping_strategy="all_exhausted"
    )


def _training_split(source: Source, held_out: dict, only_held_out: bool, num_shards: int | None) -> IterableDataset:
    """`source` streamed for training without its held-out patients (with `only_held_out`: only those)."""
    dataset = load_source(source, for_training=True, num_shards=num_shards)
    if held_out.get(source):
        dataset = dataset.filter(PatientFilter(held_out[source], keep=only_held_out))
    return dataset


def image_stream(
    sources: Sequence[Source],
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    uncertain: str = "positive",
    held_out: dict[Source, set[str]] | None = None,
    num_shards: int | None = None,
    only_held_out: bool = False,
) -> IterableDataset | None:
    """The training images of `sources` in the common form, without the patients `held_out[source]`, mixed.

    With `only_held_out`, the opposite: only the held-out patients' images, of the sources that have some (`None`
    when none has): the validation pairs of a run.
    """
    held_out = held_out or {}
    streams = []
    for source in sources:
        if only_held_out and not held_out.get(source):
            continue
        if source.builder is not None and not source.builder.has_images:
            raise ValueError(f"image source {source} has no images (a text corpus: use it as a text source)")
        dataset = _training_split(source, held_out, only_held_out, num_shards)
        labels = dataset.features["labels"] if dataset.features else None
        class_names = labels.names if isinstance(labels, ClassLabel) else None
        streams.append(
            dataset.map(ImageLabeller(source, class_names, uncertain), remove_columns=dataset.column_names,
                        features=IMAGE_FEATURES)  # fmt: skip
        )
    if not streams:
        return None
    return mix(streams, None if only_held_out else weights, seed)


def text_stream(
    sources: Sequence[Source],
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
    uncertain: str = "positive",
    held_out: dict[Source, set[str]] | None = None,
    num_shards: int | None = None,
) -> IterableDataset:
    """The report sentences of `sources`, each labelled by the CheXpert labeler, without held-out patients, mixed."""
    streams = []
    for source in sources:
        if source.builder is not None and not source.builder.has_text:
            raise ValueError(f"text source {source} has no report text")
        streams.append(report_sentences(_training_split(source, held_out or {}, False, num_shards), uncertain=uncertain))
    return mix(streams, weights, seed)


def sources_help() -> str:
    return (
        "Each source is NAME=PATH (a registered builder and its corpus folder), NAME alone (the builder's folder "
        f"under the shared data folder) or {HUB_PREFIX}org/name (a Hub dataset repo of parquet shards, streamed)."
    )
