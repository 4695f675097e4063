"""dataset_scripts.to_parquet: a second conversion into the same folder never mixes old and new shards."""

import numpy as np
import PIL.Image
import pytest
from datasets import load_dataset

from dataset_scripts.generic import build_image_folder
from dataset_scripts.to_parquet import main as to_parquet_main
from dataset_scripts.to_parquet import write_parquet_shards


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for index in range(12):
        folder = root / ("normal" if index % 2 else "pneumonia")
        folder.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / f"x{index}.png")
    return root


def streamed_rows(folder):
    return list(load_dataset(str(folder), split="train", streaming=True))


def test_a_second_conversion_is_refused_or_replaces_the_old_shards(image_folder, tmp_path):
    out = tmp_path / "parquet"
    to_parquet_main(["--builder", "image_folder", "--root", str(image_folder), "--output_dir", str(out), "--shard_size", "5"])
    (out / "README.md").write_text("my dataset card\n")
    first = sorted(p.name for p in out.glob("*.parquet"))
    assert first == [f"train-0000{i}-of-00003.parquet" for i in range(3)]

    argv = ["--builder", "image_folder", "--root", str(image_folder), "--output_dir", str(out), "--shard_size", "3"]
    with pytest.raises(FileExistsError, match="already holds 3 'train' shard.*--overwrite_output_dir"):
        to_parquet_main(argv)
    assert sorted(p.name for p in out.glob("*.parquet")) == first

    to_parquet_main([*argv, "--overwrite_output_dir"])
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"train-0000{i}-of-00004.parquet" for i in range(4)]
    assert (out / "README.md").read_text() == "my dataset card\n"  # other files are kept
    rows = streamed_rows(out)
    assert len(rows) == 12  # not 24: no shard of the first conversion is left
    assert len({row["image_id"] for row in rows}) == 12
    assert not list(tmp_path.glob(".parquet.*"))  # no temporary folder left


def test_a_failed_conversion_leaves_the_folder_as_it_was(image_folder, tmp_path):
    out = tmp_path / "parquet"
    write_parquet_shards(build_image_folder(image_folder), out, shard_size=6)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    dataset = build_image_folder(image_folder)
    (image_folder / "normal" / "x11.png").unlink()  # vanishes after indexing, before it is embedded
    with pytest.raises(FileNotFoundError, match="x11.png"):
        write_parquet_shards(dataset, out, shard_size=4, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(streamed_rows(out)) == 12
    assert not list(tmp_path.glob(".parquet.*"))
