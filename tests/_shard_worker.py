"""One process of the 2-process shard test (tests/test_pairing.py); launched by `accelerate launch`.

Streams one epoch of decoupled batches over the covid-cxr images with 2 DataLoader workers, and writes the image ids
and text ids this process saw to `<output_dir>/rank<k>.json`.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import PartialState

from dataset_scripts import DecoupledBatches, build_covid_cxr, report_sentences


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--covid_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--epoch", type=int, default=1)
    args = parser.parse_args()

    state = PartialState(cpu=not torch.cuda.is_available())
    batches = DecoupledBatches(
        build_covid_cxr(args.covid_dir, num_shards=8),
        report_sentences(build_covid_cxr(args.covid_dir, require_text=True, num_shards=8)),
        image_batch_size=16,
        text_batch_size=8,
        seed=0,
        drop_last=False,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    batches.set_epoch(args.epoch)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.num_workers)
    image_ids, text_ids, positions = [], [], []
    for batch in loader:
        image_ids += [example["image_id"] for example in batch["images"]]
        text_ids += [example["image_id"] for example in batch["texts"]]
        positions.append(batch["position"])
    output = Path(args.output_dir) / f"rank{state.process_index}.json"
    output.write_text(json.dumps({"world_size": state.num_processes, "images": image_ids, "texts": text_ids,
                                  "positions": positions}))


if __name__ == "__main__":
    main()
