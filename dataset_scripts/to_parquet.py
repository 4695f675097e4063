"""Converts a corpus to sharded parquet files with the images embedded as bytes.

The output folder can be uploaded to a Hub dataset repo (`huggingface_hub.upload_folder(..., repo_type="dataset")`)
and streamed back with `load_dataset(repo_or_folder, streaming=True)` or `dataset_scripts.build_parquet(files)`;
each file is one shard. The features of the builder are kept (stored in the parquet schema metadata), except that
`image` holds the encoded file bytes (`binary`) instead of a path.

    python -m dataset_scripts.to_parquet --builder covid_cxr --root /data/covid-cxr --output_dir out --shard_size 128

The shards are written into a hidden temporary folder next to `output_dir` and moved in only once all are written,
so a failed conversion leaves `output_dir` as it was. An `output_dir` that already holds shards of the same split is
refused (loading the folder would stream the old rows too) unless `--overwrite_output_dir` is given: then the old
shards of that split are swapped out for the new ones (other files and other splits are kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, IterableDataset, Value
from tqdm.auto import tqdm

from . import BUILDERS


def embedded_features(features: Features) -> Features:
    """`features` with the `image` path column replaced by the encoded image bytes."""
    return Features({**features, "image": Value("binary")})


def _embed(example: dict) -> dict:
    image = example["image"]
    if isinstance(image, str):
        with open(image, "rb") as file:
            image = file.read()
    return {**example, "image": image}


def write_parquet_shards(
    dataset: IterableDataset,
    output_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    split: str = "train",
    overwrite: bool = False,
) -> list[Path]:
    """Writes `dataset` (a builder's stream) as `<split>-XXXXX-of-NNNNN.parquet` files of `shard_size` rows each.

    Returns the written paths, in order. Raises `FileNotFoundError` naming an image file that cannot be read, and
    `FileExistsError` when `output_dir` already has shards of `split` and `overwrite` is not set (see the module
    docstring).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if dataset.features is None:
        raise ValueError("the dataset has no features: pass a builder's stream (features are set by the builders)")
    output_dir = Path(output_dir)
    old_shards = sorted(output_dir.glob(f"{split}-*.parquet"))
    if old_shards and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds {len(old_shards)} '{split}' shard(s) ({old_shards[0].name}, ...); loading "
            "the folder would stream their rows too. Choose an empty output folder or pass --overwrite_output_dir "
            "(overwrite=True) to replace them."
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.{split}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left over by a conversion that died
    tmp.mkdir()
    try:
        written = _write_shards(dataset, tmp, shard_size, split)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    output_dir.mkdir(exist_ok=True)
    stale = output_dir.parent / f".{output_dir.name}.{split}.stale"
    shutil.rmtree(stale, ignore_errors=True)
    stale.mkdir()
    for path in old_shards:  # swapped out first, removed only once the new shards are in place
        path.rename(stale / path.name)
    final = [output_dir / path.name for path in written]
    for path, target in zip(written, final, strict=True):
        path.rename(target)
    shutil.rmtree(stale)
    tmp.rmdir()
    return final


def _write_shards(dataset: IterableDataset, folder: Path, shard_size: int, split: str) -> list[Path]:
    """Writes the shards into `folder` under their final names; returns their paths."""
    features = embedded_features(dataset.features)
    schema = features.arrow_schema
    written: list[Path] = []

    def flush(rows: list[dict]) -> None:
        path = folder / f"{split}-{len(written):05d}.parquet"
        pq.write_table(pa.Table.from_pylist([features.encode_example(row) for row in rows], schema=schema), path)
        written.append(path)

    rows: list[dict] = []
    for example in tqdm(dataset, desc="writing parquet", unit="example"):
        rows.append(_embed(example))
        if len(rows) == shard_size:
            flush(rows)
            rows = []
    if rows:
        flush(rows)
    final = [path.with_name(f"{split}-{i:05d}-of-{len(written):05d}.parquet") for i, path in enumerate(written)]
    for path, target in zip(written, final, strict=True):
        path.rename(target)
    return final


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--builder", required=True, choices=sorted(BUILDERS))
    parser.add_argument("--root", required=True, help="the corpus folder (see dataset_scripts/README.md)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--shard_size", type=int, default=1000, help="rows per parquet file")
    parser.add_argument("--split", default=None, help="the builder's split argument (and the file name prefix)")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace shards of the same split already in --output_dir"
    )
    args = parser.parse_args(argv)
    builder_kwargs = {"split": args.split} if args.split is not None else {}
    dataset = BUILDERS[args.builder](args.root, **builder_kwargs)
    paths = write_parquet_shards(
        dataset,
        args.output_dir,
        shard_size=args.shard_size,
        split=args.split or "train",
        overwrite=args.overwrite_output_dir,
    )
    print(f"wrote {len(paths)} parquet shard(s) to {args.output_dir}")


if __name__ == "__main__":
    main()
