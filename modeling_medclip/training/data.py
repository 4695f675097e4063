"""The training data of a run: image and text streams from the builder registry, batches, collation, loaders.

The image sources (`--image_dataset`) and, for decoupled batches, the text sources (`--text_dataset`) are read through
`dataset_scripts.sources`; patients held out by an evaluation task on the same corpus are left out of both
([`held_out_patients`]). [`MicroBatches`] yields collated batches forever (moving to the next epoch when one ends) and
counts the images the collator could not read.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dataset_scripts.pairing import DecoupledBatches, PairedBatches
from dataset_scripts.sources import Source, image_stream, parse_sources, text_stream
from dataset_scripts.tasks import expand_tasks

from ..augmentation import build_augmentation
from ..collator import MedCLIPCollator
from ..processing_medclip import MedCLIPProcessor
from .arguments import DataArguments, ModelArguments, PretrainArguments


def resolve_batching(data_args: DataArguments, config) -> str:
    """`paired` or `decoupled`: the flag, else decoupled for the semantic loss and paired otherwise."""
    if data_args.batching is not None:
        return data_args.batching
    return "decoupled" if config.loss_type == "semantic" else "paired"


def _same_place(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def training_sources(data_args: DataArguments, batching: str) -> tuple[list[Source], list[Source]]:
    """The image sources, and the text sources of decoupled batches (none for paired batches)."""
    images = parse_sources(data_args.image_dataset, data_args.image_dataset_weights)
    if batching == "paired":
        return images, []
    return images, parse_sources(data_args.text_dataset, data_args.text_dataset_weights, what="--text_dataset")


def held_out_patients(data_args: DataArguments, sources: list[Source]) -> dict[Source, set[str]]:
    """Per training source, the patients that an evaluation task on the same corpus holds out."""
    held_out: dict[Source, set[str]] = {}
    for task, location in expand_tasks(data_args.eval_tasks):
        location = location or task.default_location()
        for source in sources:
            if source.name == task.corpus and _same_place(source.location, location) and source not in held_out:
                held_out[source] = task.held_out_patients(
                    location, test_size=data_args.eval_split_size, seed=data_args.split_seed
                )
    return held_out


def build_train_stream(args: PretrainArguments, config, rank: int, world_size: int):
    """The training batch stream of this process: `PairedBatches` or `DecoupledBatches` over the data sources,
    without the patients the evaluation tasks hold out."""
    data_args, training_args = args.data, args.training
    batching = resolve_batching(data_args, config)
    image_sources, text_sources = training_sources(data_args, batching)
    common = {
        "seed": training_args.seed,
        "uncertain": data_args.uncertain,
        "held_out": held_out_patients(data_args, image_sources + text_sources),
        "num_shards": max(8, world_size * max(data_args.dataloader_num_workers, 1)),
    }
    images = image_stream(image_sources, data_args.image_dataset_weights, **common)
    batches = {
        "seed": training_args.seed,
        "shuffle_buffer_size": data_args.shuffle_buffer_size,
        "rank": rank,
        "world_size": world_size,
    }
    if batching == "paired":
        return PairedBatches(images, batch_size=training_args.per_device_train_batch_size, **batches)
    texts = text_stream(text_sources, data_args.text_dataset_weights, **common)
    return DecoupledBatches(
        images,
        texts,
        image_batch_size=training_args.per_device_train_batch_size,
        text_batch_size=data_args.per_device_text_batch_size or training_args.per_device_train_batch_size,
        text_sampling=data_args.text_sampling,
        **batches,
    )


def build_collator(model_args: ModelArguments, processor: MedCLIPProcessor, augmentation: str) -> MedCLIPCollator:
    """The collator of training (`augmentation` = the recipe) and validation (`none`) batches."""
    return MedCLIPCollator(
        processor.tokenizer,
        build_augmentation(augmentation, processor.image_processor, size=model_args.image_size),
        max_length=model_args.max_length,
    )


class SeededCollate:
    """Runs a collator with torch's RNG seeded from the batch's stream position (and the process rank).

    The augmentation of a batch then depends only on where the batch is in the stream, not on which DataLoader
    worker made it or when the loader was (re)started, so a resumed run augments exactly as an uninterrupted one.
    The caller's RNG state is left untouched.
    """

    def __init__(self, collator, seed: int, rank: int):
        self.collator = collator
        self.seed = seed
        self.rank = rank

    def __call__(self, batch: dict) -> dict:
        epoch, worker_id, _, index = batch["position"]
        batch_seed = int(np.random.SeedSequence([self.seed, self.rank, epoch, worker_id, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(batch_seed)
            return self.collator(batch)


class MicroBatches:
    """Yields collated training batches forever, moving to the next epoch of the stream when one ends.

    `skipped_images` counts the images the collator skipped as unreadable (summed from the batches, since the
    collator runs in DataLoader workers); a run saves it in its checkpoints, so it survives a resume.
    """

    def __init__(self, stream, collate, num_workers: int, seed: int, skipped_images: int = 0):
        self.stream = stream
        self.collate = collate
        self.num_workers = num_workers
        self.seed = seed
        self.skipped_images = skipped_images
        self._iterator: Iterator | None = None

    def _loader(self) -> Iterator:
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=self.collate,
            # worker seeds from (seed, epoch) only, so they do not consume the training RNG
            generator=torch.Generator().manual_seed(self.seed + self.stream.epoch),
        )
        return iter(loader)

    def next(self) -> dict:
        empty_epochs, unusable = 0, 0
        while True:
            if self._iterator is None:
                self._iterator = self._loader()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                empty_epochs += 1
                if empty_epochs > 1 and unusable:
                    raise ValueError(
                        f"no usable training batch in a whole epoch: every image ({self.skipped_images} skipped so "
                        "far) or every text of the training stream is unreadable or empty; the warnings above name "
                        "the files"
                    )
                if empty_epochs > 1:
                    raise ValueError("the training stream gives this process no batch (too few examples?)")
                self.stream.set_epoch(self.stream.epoch + 1)
                continue
            self.stream.record(batch)
            self.skipped_images += batch.get("num_skipped_images", 0)
            if batch.get("pixel_values") is None or batch.get("input_ids") is None:
                unusable += 1
                continue  # every image / text of the batch was unreadable (the collator warned)
            return batch


def count_batches(stream) -> int:
    """Batches in one epoch of `stream` (undecoded examples only: cheap)."""
    return sum(1 for _ in stream)
