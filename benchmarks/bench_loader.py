"""Data loader throughput: decode + augment + collate vs. bare JPEG decoding of the same files vs. a training step.

Measured in one run, on the real chest X-rays with notes of `shared/data/covid-cxr` (384 JPEGs, longer side <= 512 px):

1. **Bare decode** (the baseline, ratio 1.0): the ConVIRT training stream (`build_covid_cxr(..., num_shards=8)` wrapped
   in `PairedBatches`, shuffle buffer 256, one sampled report sentence per image) through a `DataLoader` with
   `--workers` workers whose collate only does `PIL.Image.open(path).convert("L")` per image.
2. **The loader**: the same stream and `DataLoader`, collated by `MedCLIPCollator` (decode to 8-bit grayscale, pad,
   "convirt" or "medclip" augmentation at 224 px, normalize, tokenize the sentences, stack), decoding at full
   resolution and with `decode_size=256` (JPEG DCT scaling while decoding). Target: >= 0.5x the bare decode.
3. **The training step** of a MedCLIP model with MedCLIP's sizes (ResNet-50 + BERT-base, random init, fp32, semantic
   loss): plain forward (`return_loss=True`) + backward + `AdamW` step on one real batch of `--train-batch-size`
   images and sentences from the "medclip" loader, label vectors of the sentences from `CheXpertLabeler` (image
   labels = their own sentence's, the pairs being matched), `--train-warmup` untimed steps then the mean of
   `--train-steps` timed steps, with torch's default threads. Target: the loader >= 3x its images/s. The two are
   measured one after the other on the same CPUs; in training they would share them.

4. **Two sources mixed**: MedCLIP's decoupled stream over two image sources mixed 0.5 / 0.5 by
   `dataset_scripts.sources.image_stream` (`--mix`, default covid-cxr + pediatric-pneumonia; `interleave_datasets` with
   probabilities, every source seen once per epoch) with the IU report sentences as texts: bare decode vs the
   "medclip" loader at `decode_size`. Target: the loader >= 3x the training step. Then one pass (no decoding) of two
   *parquet* sources interleaved by weight, as `load_dataset` streams them and re-wrapped as generator streams
   (`as_generator_stream`, what the Hub sources of training go through): the first waits datasets'
   `SLEEP_TIME_ON_THREADS_SHUTDOWN` (5 s) per pass, the second does not.

Loader rates are the best of `--repeats` full passes, each including the start of the workers (as an epoch with
`persistent_workers=False`, which `PairedBatches` needs for `set_epoch`).

With `--full-size 2048` (default; 0 disables) the same images are also re-encoded once, into a temporary folder, as
JPEGs (quality 90) upscaled to a 2048 px longer side, the size of MIMIC-CXR-JPG / CheXpert originals (~2500-3000 px),
and rows 1-2 are repeated on them: the shipped files are unusually small, so their decoding is cheap next to three
224 px resamplings of the augmentation. These copies have the same pixel content; only the decoding cost is
realistic.

The datasets 5.2 traps of the data issue, and how this measurement stays clear of them (as training does):

- the fixed 5 s `SLEEP_TIME_ON_THREADS_SHUTDOWN` wait at the end of a pass: datasets waits only when a *parquet* (arrow
  table) source is read through its multi-source cycling iterable (`interleave_datasets`, or `shuffle()` with
  `max_buffer_input_shards > 1`). This stream is a generator stream and `PairedBatches` shuffles with
  `max_buffer_input_shards=1`, so no pass waits; the script times one pass of the stream alone (no decoding) to show
  it;
- a streamed `imagefolder` has one shard, so only one worker reads: the stream here has 8 shards, and the script
  prints which workers produced batches;
- `interleave_datasets` feature types: every mixed source is first mapped to one common form (same features).

    python benchmarks/bench_loader.py [--workers 2] [--batch-size 32] [--repeats 3] [--full-size 2048]
        [--train-batch-size 8] [--train-steps 2] [--train-warmup 1] [--mix covid_cxr pediatric_pneumonia]

`measure_loader_throughput(dataset, collate_fn, ...)` is importable.
"""

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import PIL.Image
import torch
from transformers import AutoTokenizer, BertConfig, ResNetConfig

from datasets import interleave_datasets

from dataset_scripts import DecoupledBatches, PairedBatches, build_covid_cxr, build_parquet, shared_data_dir
from dataset_scripts.sources import as_generator_stream, image_stream, parse_sources, text_stream
from dataset_scripts.to_parquet import write_parquet_shards
from modeling_medclip import MedCLIPConfig, MedCLIPModel
from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.collator import MedCLIPCollator
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor
from modeling_medclip.labeler import CheXpertLabeler


SHUFFLE_BUFFER = 256


def _count_images(batch) -> int:
    return len(batch["pixel_values"]) if "pixel_values" in batch else 0


def measure_loader_throughput(
    dataset: torch.utils.data.IterableDataset,
    collate_fn: Callable,
    *,
    num_workers: int = 2,
    batch_size: int | None = None,
    repeats: int = 3,
    count_images: Callable = _count_images,
) -> tuple[float, set[int]]:
    """Images per second of full passes over `dataset` through a `DataLoader` (best of `repeats` passes), and the
    DataLoader workers that produced batches.

    Args:
        dataset: a stream of whole batches such as `PairedBatches` (`batch_size=None`, the default) or of examples.
        collate_fn: runs in the workers, e.g. a `MedCLIPCollator`; its batches are dicts with `"pixel_values"` and
            the stream's `"position"` (`[epoch, worker_id, num_workers, index]`).
        num_workers, batch_size: the `DataLoader` settings.
        count_images: images in one collated batch (default: rows of `pixel_values`).

    A pass includes starting the workers, as in an epoch of training with `persistent_workers=False`.
    """
    best = 0.0
    workers = set()
    for _ in range(repeats):
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn
        )
        start = time.perf_counter()
        images = 0
        for batch in loader:
            images += count_images(batch)
            if "position" in batch:
                workers.add(batch["position"][1])
        best = max(best, images / (time.perf_counter() - start))
    return best, workers


def _open(image):
    if isinstance(image, dict):  # the common form of mixed sources
        image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
    return PIL.Image.open(image)


def decode_only(batch: dict) -> dict:
    """The baseline collate: bare decoding of each image file of a `PairedBatches` / `DecoupledBatches` batch."""
    images = [_open(example["image"]).convert("L") for example in batch["images"]]
    return {"pixel_values": images, "position": batch["position"]}


def paired_stream(root: Path, batch_size: int) -> PairedBatches:
    """The ConVIRT training stream of the covid-cxr layout at `root` (8 shards, shuffle buffer, keeps every image)."""
    images = build_covid_cxr(root, require_text=True, num_shards=8)
    return PairedBatches(images, batch_size=batch_size, seed=0, drop_last=False, shuffle_buffer_size=SHUFFLE_BUFFER)


def write_full_size_copies(source: Path, target: Path, longer_side: int) -> int:
    """Copies `source`'s `metadata.csv` and re-encodes its images with text, upscaled to `longer_side`, into `target`."""
    metadata = pd.read_csv(source / "metadata.csv", dtype={"patient_id": str}, keep_default_na=False)
    metadata = metadata[metadata["text"].astype(str).str.strip() != ""]
    for name in metadata["file_name"]:
        with PIL.Image.open(source / name) as image:
            image = image.convert("L")
            scale = longer_side / max(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            image.resize(size, PIL.Image.Resampling.BICUBIC).save(target / name, quality=90)
    metadata.to_csv(target / "metadata.csv", index=False)
    return len(metadata)


def measure_training_step(batch: dict, *, steps: int, warmup: int) -> float:
    """Images per second of forward + backward + AdamW steps of a ResNet-50 + BERT-base MedCLIP model on `batch`."""
    torch.manual_seed(0)
    config = MedCLIPConfig(vision_config=ResNetConfig(), text_config=BertConfig(vocab_size=28996))
    model = MedCLIPModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    inputs = {
        key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask", "image_labels", "text_labels")
    }

    def step():
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(inputs["pixel_values"]) / (time.perf_counter() - start)


def training_batch(root: Path, tokenizer, processor, batch_size: int) -> dict:
    """One real batch of the "medclip" loader, with the sentences' CheXpert label vectors for both sides."""
    collator = MedCLIPCollator(tokenizer, build_augmentation("medclip", processor, size=224))
    raw = next(iter(paired_stream(root, batch_size)))
    batch = collator(raw)
    labeler = CheXpertLabeler()
    labels = torch.tensor([labeler.label_vector(example["text"], level="sentence") for example in raw["texts"]])
    batch["image_labels"] = batch["text_labels"] = labels
    return batch


def print_loader_rows(title: str, root: Path, tokenizer, processor, args) -> float:
    """Prints rows 1 and 2 on the covid-cxr layout at `root`; returns the slowest loader's images/s."""
    settings = dict(num_workers=args.workers, repeats=args.repeats)
    stream = paired_stream(root, args.batch_size)
    start = time.perf_counter()
    examples = sum(len(batch["images"]) for batch in stream)
    stream_seconds = time.perf_counter() - start
    baseline, workers = measure_loader_throughput(stream, decode_only, **settings)
    print(f"\n{title}: {examples} images; stream alone (shuffle, sentence sampling, no decoding, 1 process): "
          f"{stream_seconds:.2f} s per pass")
    print(f"{'pipeline':<62}{'images/s':>10}{'vs decode':>11}{'workers':>9}")
    print(f"{'bare decode (PIL open + convert L), baseline':<62}{baseline:>10.1f}{1.0:>11.2f}{len(workers):>9d}")
    slowest = float("inf")
    for decode_size in (None, args.decode_size):
        for name in ("convirt", "medclip"):
            augmentation = build_augmentation(name, processor, size=args.size)
            collator = MedCLIPCollator(tokenizer, augmentation, decode_size=decode_size)
            throughput, workers = measure_loader_throughput(stream, collator, **settings)
            slowest = min(slowest, throughput)
            where = "" if decode_size is None else f" at <= {decode_size} px"
            label = f"decode{where} + {name} {args.size} px + tokenize + collate"
            print(f"{label:<62}{throughput:>10.1f}{throughput / baseline:>11.2f}{len(workers):>9d}")
    return slowest


def mixed_stream(specs: list[str], batch_size: int) -> DecoupledBatches:
    """MedCLIP's decoupled stream over two image sources mixed 50 / 50 (`dataset_scripts.sources`), with the IU
    report sentences as texts."""
    sources = parse_sources(specs, [0.5, 0.5])
    images = image_stream(sources, [0.5, 0.5], num_shards=8)
    texts = text_stream(parse_sources(["iu_xray"]), num_shards=8)
    return DecoupledBatches(images, texts, image_batch_size=batch_size, text_batch_size=batch_size, seed=0,
                            drop_last=False, shuffle_buffer_size=SHUFFLE_BUFFER)  # fmt: skip


def print_mixed_rows(specs: list[str], tokenizer, processor, args) -> float:
    """Rows 1-2 on two image sources mixed by weight; returns the slowest loader's images/s."""
    settings = dict(num_workers=args.workers, repeats=args.repeats)
    stream = mixed_stream(specs, args.batch_size)
    start = time.perf_counter()
    examples = sum(len(batch["images"]) for batch in stream)
    print(f"\ntwo image sources mixed 0.5 / 0.5 ({' + '.join(specs)}), IU sentences as texts: {examples} images per "
          f"epoch; stream alone: {time.perf_counter() - start:.2f} s per pass")
    baseline, workers = measure_loader_throughput(stream, decode_only, **settings)
    print(f"{'pipeline':<62}{'images/s':>10}{'vs decode':>11}{'workers':>9}")
    print(f"{'bare decode (PIL open + convert L), baseline':<62}{baseline:>10.1f}{1.0:>11.2f}{len(workers):>9d}")
    collator = MedCLIPCollator(tokenizer, build_augmentation("medclip", processor, size=args.size),
                               decode_size=args.decode_size)  # fmt: skip
    throughput, workers = measure_loader_throughput(stream, collator, **settings)
    label = f"decode at <= {args.decode_size} px + medclip {args.size} px + tokenize"
    print(f"{label:<62}{throughput:>10.1f}{throughput / baseline:>11.2f}{len(workers):>9d}")
    return throughput


def print_parquet_mixing(root: Path) -> None:
    """One pass (no decoding) of two parquet sources interleaved by weight: as `load_dataset` streams them, and
    re-wrapped as generator streams (what `dataset_scripts.sources` does with Hub sources)."""
    with tempfile.TemporaryDirectory() as folder:
        files = [str(path) for path in write_parquet_shards(build_covid_cxr(root), folder, shard_size=64)]
        halves = [build_parquet(files[: len(files) // 2]), build_parquet(files[len(files) // 2 :])]
        print("\ntwo parquet sources interleaved 0.5 / 0.5, one pass without decoding:")
        for name, sources in (("as streamed by load_dataset", halves),
                              ("re-wrapped as generator streams", [as_generator_stream(h) for h in halves])):  # fmt: skip
            mixed = interleave_datasets(sources, probabilities=[0.5, 0.5], seed=0, stopping_strategy="all_exhausted")
            start = time.perf_counter()
            count = sum(1 for _ in mixed)
            print(f"  {name:<34}{count:>6d} examples in {time.perf_counter() - start:6.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-size", type=int, default=256, help="the collator's decode_size in the second rows")
    parser.add_argument("--full-size", type=int, default=2048, help="longer side of the upscaled copies; 0: skip")
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--train-warmup", type=int, default=1)
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "covid-cxr")
    parser.add_argument("--tokenizer", type=Path, default=shared_data_dir() / "bio-clinicalbert-tokenizer")
    parser.add_argument("--mix", nargs=2, default=["covid_cxr", "pediatric_pneumonia"],
                        help="the two image sources (NAME=PATH or NAME) of the mixed rows")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    processor = MedCLIPImageProcessor()
    print(f"{args.workers} DataLoader workers, loader batch {args.batch_size}, best of {args.repeats} passes; "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")
    rates = {"shipped covid-cxr JPEGs (longer side <= 512 px)": print_loader_rows(
        "shipped covid-cxr JPEGs (longer side <= 512 px)", args.data, tokenizer, processor, args
    )}
    if args.full_size:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            count = write_full_size_copies(args.data, Path(folder), args.full_size)
            title = f"the same images as {args.full_size} px JPEG copies"
            print(f"\n(wrote {count} copies in {time.perf_counter() - start:.0f} s, not timed below)", end="")
            rates[title] = print_loader_rows(title, Path(folder), tokenizer, processor, args)
    rates["two mixed sources"] = print_mixed_rows(args.mix, tokenizer, processor, args)
    print_parquet_mixing(args.data)

    batch = training_batch(args.data, tokenizer, processor, args.train_batch_size)
    train = measure_training_step(batch, steps=args.train_steps, warmup=args.train_warmup)
    print(f"\ntraining step, MedCLIP ResNet-50 + BERT-base, fp32, batch {args.train_batch_size} "
          f"({tuple(batch['input_ids'].shape)} tokens), mean of {args.train_steps} steps after {args.train_warmup} "
          f"warm-up: {train:.2f} images/s")
    for title, rate in rates.items():
        print(f"slowest loader on {title}: {rate:.1f} images/s, {rate / train:.1f}x the training step")


if __name__ == "__main__":
    main()
