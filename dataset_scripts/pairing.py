"""Training batches from streamed datasets: decoupled image / text batches (MedCLIP) and paired batches (ConVIRT).

Both wrappers are `torch.utils.data.IterableDataset`s that yield *whole batches of undecoded examples*; use them with
`DataLoader(batches, batch_size=None, num_workers=N, collate_fn=MedCLIPCollator(...))` so that decoding, augmentation
and tokenization run in the workers. Each yielded batch is::

    {"images": list[dict], "texts": list[dict], "paired": bool, "position": [epoch, worker_id, num_workers, index]}

Sharding. Each process keeps the shards `datasets.distributed.split_dataset_by_node(dataset, rank, world_size)` gives
it, and inside a process each DataLoader worker reads a disjoint subset of those shards (datasets does this by itself
in a worker). Give the streams at least `world_size * num_workers` shards, or workers stay idle. Do not also shard the
batches with `accelerate`'s `prepare(dataloader)` (it would keep only every `world_size`-th batch of each process):
the split is already done here.

Last-batch rule. Every DataLoader worker batches its own shards, so with `drop_last=True` (default) each worker of
each process drops fewer than `image_batch_size` examples per epoch (its incomplete last batch); with
`drop_last=False` that batch is yielded short and nothing is dropped. The text stream of `DecoupledBatches` is cycled
(a new shuffled pass, see below) whenever it runs out before the images, so the *image* stream defines the epoch.

Text sampling. `DecoupledBatches(text_sampling="uniform")` reads the text stream in order, so a batch's texts follow
the corpus's label distribution (about 77% of the IU report sentences are "No Finding" by the labeler: most images of a
batch then have no text that shares their finding). `text_sampling="label_matched"` draws the texts in proportion
to the image batch's labels: text `k` is drawn from the texts that share a positive class with image
`k mod B_img` (one of that image's positive classes, picked at random), from all texts when the image has no
positive class or no text has it. The draw uses `numpy.random.default_rng([seed, epoch, rank, worker_id,
batch_index])`, so it is as deterministic and resumable as the rest of the stream; each worker pools the texts of
its own shards once (they are held in memory: report sentences are small).

Randomness. With `shuffle_buffer_size`, both streams are `shuffle(seed, buffer_size, max_buffer_input_shards=num_shards)`
-ed: the shard order is permuted per epoch from (seed, epoch), the shards of a worker are interleaved into one buffer
(so a corpus stored sorted by class still gives batches of mixed classes) whose generator is shifted by the epoch and
the worker id. (In datasets 5.2 interleaving *arrow* shards, e.g. local parquet files, waits about 5 s per pass.) ConVIRT's sentence choice is drawn from `numpy.random.default_rng([seed, epoch,
crc32(image_id)])`. All of it depends only on (seed, epoch, num_workers, world_size), so two runs give the same
batches, and a new `set_epoch` gives new ones.

Resuming. A batch's `position` says which worker made it and its index in that worker's sequence. Call
`batches.record(batch)` (in the main process, after the step) for each batch the model consumed; `state_dict()` then
holds, per worker, how many batches were consumed, and after `load_state_dict(state)` the next pass over the same
epoch skips exactly those (without decoding them) and yields exactly the remaining batches; only their interleaving
across workers can differ at the seam (the DataLoader restarts its round-robin at worker 0). The DataLoader must use
the same `num_workers`, and `persistent_workers=False` so `set_epoch` / `load_state_dict` reach the workers.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from datasets import Features, IterableDataset, List, Value
from datasets.distributed import split_dataset_by_node

from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler, split_sentences


# Epochs of the cycled text stream: pass p of epoch e uses epoch e * _TEXT_PASS_STRIDE + p for its shuffling.
_TEXT_PASS_STRIDE = 1_000_003


def report_sentences(
    dataset: IterableDataset,
    *,
    text_column: str = "text",
    uncertain: str = "positive",
    labeler: CheXpertLabeler | None = None,
) -> IterableDataset:
    """The text stream of MedCLIP: one example per report sentence, with its own sentence-level label vector.

    Returns an `IterableDataset` of `{"text": sentence, "labels": 14 floats, "image_id": "<study_id>#<k>",
    "study_id", "patient_id"}` (lazily mapped; same shards as `dataset`). Reports with no sentence give nothing.
    """
    labeler = labeler if labeler is not None else CheXpertLabeler()

    def explode(batch: dict[str, list]) -> dict[str, list]:
        sentences = {"text": [], "labels": [], "image_id": [], "study_id": [], "patient_id": []}
        for report, study_id, patient_id in zip(batch[text_column], batch["study_id"], batch["patient_id"]):
            for k, sentence in enumerate(split_sentences(report or "")):
                sentences["text"].append(sentence)
                sentences["labels"].append(labeler.label_vector(sentence, uncertain=uncertain, level="sentence"))
                sentences["image_id"].append(f"{study_id}#{k}")
                sentences["study_id"].append(study_id)
                sentences["patient_id"].append(patient_id)
        return sentences

    features = Features(
        {
            "text": Value("string"),
            "labels": List(Value("float32"), length=len(CHEXPERT_CLASSES)),
            "image_id": Value("string"),
            "study_id": Value("string"),
            "patient_id": Value("string"),
        }
    )
    return dataset.map(explode, batched=True, batch_size=64, remove_columns=dataset.column_names, features=features)


def sample_sentence(report: str, *, seed: int, epoch: int, image_id: str) -> str | None:
    """ConVIRT's text view of an image: one sentence of its report, drawn from (seed, epoch, image_id) only.

    Returns `None` when the report has no sentence.
    """
    sentences = split_sentences(report or "")
    if not sentences:
        return None
    rng = np.random.default_rng([seed, epoch, zlib.crc32(image_id.encode("utf-8"))])
    return sentences[int(rng.integers(len(sentences)))]


class _BatchStream(torch.utils.data.IterableDataset):
    """Epoch, seeding, node splitting and resumable positions shared by the two batch streams."""

    def __init__(self, *, seed: int, drop_last: bool, shuffle_buffer_size: int | None, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle_buffer_size = shuffle_buffer_size
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._consumed: dict[int, int] = {}
        self._num_workers: int | None = None

    def _prepare(self, dataset: IterableDataset, name: str) -> IterableDataset:
        if not isinstance(dataset, IterableDataset):
            raise ValueError(f"{name} must be a datasets.IterableDataset, got {type(dataset).__name__}")
        if self.world_size > 1:
            dataset = split_dataset_by_node(dataset, rank=self.rank, world_size=self.world_size)
        if self.shuffle_buffer_size:
            # every shard feeds the buffer at once: a corpus stored sorted by class (as builders index many) would
            # otherwise give batches of one class, where the semantic loss has nothing to contrast
            dataset = dataset.shuffle(
                seed=self.seed, buffer_size=self.shuffle_buffer_size, max_buffer_input_shards=dataset.num_shards
            )
        return dataset

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch (shard order, shuffle buffer, sentence choice); a new epoch clears the position."""
        if epoch != self.epoch:
            self._consumed = {}
        self.epoch = epoch

    def record(self, batch: dict) -> None:
        """Marks `batch` (as yielded, or collated: its `position` is kept) as consumed by the training loop."""
        epoch, worker_id, num_workers, index = batch["position"]
        if epoch != self.epoch:
            raise ValueError(f"batch of epoch {epoch} recorded while at epoch {self.epoch}")
        self._num_workers = num_workers
        self._consumed[worker_id] = max(self._consumed.get(worker_id, 0), index + 1)

    def state_dict(self) -> dict:
        """`{"epoch", "seed", "num_workers", "consumed": {worker_id: batches}}`: where to resume."""
        return {
            "epoch": self.epoch,
            "seed": self.seed,
            "num_workers": self._num_workers,
            "consumed": {str(worker): count for worker, count in self._consumed.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resumes at `state`: the next pass skips the batches it lists as consumed."""
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this stream has seed {self.seed}")
        self.epoch = state["epoch"]
        self._num_workers = state["num_workers"]
        self._consumed = {int(worker): count for worker, count in state["consumed"].items()}

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if self._consumed and self._num_workers is not None and self._num_workers != num_workers:
            raise ValueError(
                f"cannot resume a position saved with {self._num_workers} DataLoader workers using {num_workers}"
            )
        return worker_id, num_workers

    def _batches(self) -> Iterator[dict]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        worker_id, num_workers = self._worker()
        skip = self._consumed.get(worker_id, 0)
        for index, batch in enumerate(self._batches()):
            if index >= skip:
                batch["position"] = [self.epoch, worker_id, num_workers, index]
                yield batch


class DecoupledBatches(_BatchStream):
    r"""
    MedCLIP's decoupled batches: `image_batch_size` images and `text_batch_size` texts from two unrelated streams.

    Args:
        images (`datasets.IterableDataset`): image examples (`"image"`, `"labels"`, ...), e.g. `build_mimic_cxr`.
        texts (`datasets.IterableDataset`): text examples (`"text"`, `"labels"`), e.g. `report_sentences(...)`.
        image_batch_size, text_batch_size (`int`): B_img and B_txt; they need not be equal.
        seed (`int`): seeds the shuffling (see the module docstring).
        drop_last (`bool`): drop each worker's incomplete last image batch.
        shuffle_buffer_size (`int`, *optional*): examples in each shuffle buffer; `None` keeps the stream order.
        rank, world_size (`int`): this process and the number of processes; each reads its own shards.
        text_sampling (`str`, defaults to `"uniform"`): `"uniform"` (the text stream in order) or `"label_matched"`
            (texts drawn in proportion to the image batch's labels; needs label vectors of the same length on both
            streams). See the module docstring.
    """

    def __init__(
        self,
        images: IterableDataset,
        texts: IterableDataset,
        *,
        image_batch_size: int,
        text_batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        shuffle_buffer_size: int | None = 1000,
        rank: int = 0,
        world_size: int = 1,
        text_sampling: Literal["uniform", "label_matched"] = "uniform",
    ):
        super().__init__(
            seed=seed, drop_last=drop_last, shuffle_buffer_size=shuffle_buffer_size, rank=rank, world_size=world_size
        )
        if image_batch_size < 1 or text_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got {image_batch_size} images and {text_batch_size} texts")
        if text_sampling not in ("uniform", "label_matched"):
            raise ValueError(f"text_sampling must be 'uniform' or 'label_matched', got {text_sampling!r}")
        self.images = self._prepare(images, "images")
        self.texts = self._prepare(texts, "texts")
        self.image_batch_size = image_batch_size
        self.text_batch_size = text_batch_size
        self.text_sampling = text_sampling
        self._text_pools: dict[tuple[int, int], TextPools] = {}

    def _text_examples(self) -> Iterator[dict]:
        """The text stream, cycled: pass p of epoch e is shuffled as epoch `e * _TEXT_PASS_STRIDE + p`."""
        text_pass = 0
        while True:
            self.texts.set_epoch(self.epoch * _TEXT_PASS_STRIDE + text_pass)
            empty = True
            for example in self.texts:
                empty = False
                yield example
            if empty:
                raise ValueError(
                    "the text stream gives this worker no example: give it at least world_size * num_workers shards"
                )
            text_pass += 1

    def _pools(self, worker: tuple[int, int]) -> TextPools:
        """The texts of this worker's shards grouped by positive class (read once; they do not depend on the epoch)."""
        if worker not in self._text_pools:
            self.texts.set_epoch(0)
            self._text_pools[worker] = TextPools(list(self.texts))
        return self._text_pools[worker]

    def _text_sampler(self):
        """`draw(images, batch_index) -> texts` for the chosen `text_sampling`."""
        if self.text_sampling == "uniform":
            texts = self._text_examples()
            return lambda images, index: [next(texts) for _ in range(self.text_batch_size)]
        worker_id, num_workers = self._worker()
        pools = self._pools((worker_id, num_workers))

        def draw(images: list[dict], index: int) -> list[dict]:
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker_id, index])
            return pools.draw([images[k % len(images)]["labels"] for k in range(self.text_batch_size)], rng)

        return draw

    def _batches(self) -> Iterator[dict]:
        self.images.set_epoch(self.epoch)
        draw_texts = self._text_sampler()
        images: list[dict] = []
        index = 0
        for example in self.images:
            images.append(example)
            if len(images) == self.image_batch_size:
                yield {"images": images, "texts": draw_texts(images, index), "paired": False}
                images, index = [], index + 1
        if images and not self.drop_last:
            yield {"images": images, "texts": draw_texts(images, index), "paired": False}


class TextPools:
    """Text examples grouped by positive class, for drawing texts that match given label vectors.

    Args:
        texts (`list[dict]`): examples with `"labels"` (a label vector); a value > 0 is a positive class.
    """

    def __init__(self, texts: list[dict]):
        if not texts:
            raise ValueError(
                "the text stream gives this worker no example: give it at least world_size * num_workers shards"
            )
        self.texts = texts
        self.num_classes = len(texts[0]["labels"])
        labels = np.array([example["labels"] for example in texts], dtype=np.float32)
        self.by_class = [np.flatnonzero(labels[:, c] > 0) for c in range(self.num_classes)]

    def draw(self, label_vectors: list, rng: np.random.Generator) -> list[dict]:
        """One text per label vector: from the texts positive for one of its positive classes (picked uniformly),
        or from all texts when it has no positive class that some text shares."""
        drawn = []
        for vector in label_vectors:
            if not isinstance(vector, (list, tuple, np.ndarray)) or len(vector) != self.num_classes:
                raise ValueError(
                    f"label_matched text sampling needs image label vectors of length {self.num_classes} (the texts'),"
                    f" got {vector!r}"
                )
            classes = [c for c, value in enumerate(vector) if value > 0 and len(self.by_class[c])]
            if classes:
                pool = self.by_class[classes[int(rng.integers(len(classes)))]]
                drawn.append(self.texts[int(pool[rng.integers(len(pool))])])
            else:
                drawn.append(self.texts[int(rng.integers(len(self.texts)))])
        return drawn


class PairedBatches(_BatchStream):
    r"""
    ConVIRT's paired batches: each image with one sentence of its own report, drawn anew each epoch.

    Examples whose report has no sentence are skipped. Each yielded example is the image example with `"text"`
    replaced by the sampled sentence and the full report kept in `"report"`; `"images"` and `"texts"` are the same
    list.

    Args:
        dataset (`datasets.IterableDataset`): examples with `"image"`, `"text"` (the report) and `"image_id"`.
        batch_size (`int`): pairs per batch.
        seed, drop_last, shuffle_buffer_size, rank, world_size: as in `DecoupledBatches`.
    """

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        shuffle_buffer_size: int | None = 1000,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(
            seed=seed, drop_last=drop_last, shuffle_buffer_size=shuffle_buffer_size, rank=rank, world_size=world_size
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = self._prepare(dataset, "dataset")
        self.batch_size = batch_size

    def _batches(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.epoch)
        pairs: list[dict] = []
        for example in self.dataset:
            sentence = sample_sentence(example["text"], seed=self.seed, epoch=self.epoch, image_id=example["image_id"])
            if sentence is None:
                continue
            pairs.append({**example, "text": sentence, "report": example["text"]})
            if len(pairs) == self.batch_size:
                yield {"images": pairs, "texts": pairs, "paired": True}
                pairs = []
        if pairs and not self.drop_last:
            yield {"images": pairs, "texts": pairs, "paired": True}
