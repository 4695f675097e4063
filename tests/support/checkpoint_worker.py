"""Writes checkpoints of a tiny model with the real `write_checkpoint`, optionally under a file-size limit.

    python tests/support/checkpoint_worker.py OUTPUT_DIR [--fsize_limit BYTES]

writes `checkpoint-1`, takes one optimizer step, lowers `RLIMIT_FSIZE` to `BYTES` (SIGXFSZ ignored, so a write past
the limit fails with `EFBIG` as on a full disk) and tries `checkpoint-2`; prints one JSON line: the error (type,
message, `disk_full`, the folder it names) or `null`.
"""

import argparse
import json
import resource
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import tiny_config  # noqa: E402

from modeling_medclip import MedCLIPModel  # noqa: E402
from modeling_medclip.checkpointing import CheckpointWriteError, write_checkpoint  # noqa: E402


class TinyRun:
    """A tiny model with an SGD optimizer and a constant schedule: what `write_checkpoint` needs."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.accelerator = Accelerator(cpu=True)
        self.model = MedCLIPModel(tiny_config())
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def step(self) -> None:
        loss = sum(p.square().sum() for p in self.model.parameters())
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()

    def save(self, output_dir: Path, step: int) -> Path:
        return write_checkpoint(
            self.accelerator, output_dir, step, model=self.model, processor=None, optimizer=self.optimizer,
            scheduler=self.scheduler, data_state={"epoch": 0, "step": step}, trainer_state={"global_step": step},
        )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--fsize_limit", type=int, default=None)
    args = parser.parse_args()
    run = TinyRun()
    run.save(args.output_dir, 1)
    run.step()
    if args.fsize_limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        run.save(args.output_dir, 2)
    except CheckpointWriteError as error:
        print(json.dumps({"type": type(error).__name__, "message": str(error), "disk_full": error.disk_full,
                          "folder": str(error.folder)}))  # fmt: skip
    else:
        print(json.dumps(None))


if __name__ == "__main__":
    main()
