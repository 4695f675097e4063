#!/usr/bin/env python
"""Contrastive pretraining of ConVIRT / MedCLIP.

    python run_pretrain.py                                   # the cpu-demo preset (a few minutes on a CPU)
    python run_pretrain.py --preset medclip-swin --output_dir out --max_steps 10000
    python run_pretrain.py my_run.yaml --learning_rate 1e-4  # arguments from a file, then overridden by flags
    python run_pretrain.py --preset medclip-resnet --image_dataset chexpert=/data/CheXpert-v1.0-small \
        --text_dataset mimic_cxr=/data/mimic-cxr-jpg --eval_tasks chexpert-5x200=/data/CheXpert-v1.0-small
    accelerate launch --num_processes 4 --mixed_precision bf16 run_pretrain.py --preset convirt \
        --image_dataset mimic_cxr=/data/mimic-cxr-jpg

Precedence: dataclass defaults < --preset < config file < flags. `--help` lists every flag, every dataset builder and
every evaluation task. The run and its outputs are described in `modeling_medclip/training/loop.py`.
"""

import logging
import sys

from accelerate import PartialState

from modeling_medclip.training import parse_args, results_table, train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    result = train(parse_args(argv))
    if not PartialState().is_main_process:
        return 0
    print(f"\nHeld-out evaluation (patients never seen in training; train_runtime "
          f"{result.metrics['train_runtime']:.0f} s, {result.metrics['skipped_images']} unreadable images skipped):\n")
    print(results_table(result))
    print(f"\nfinal model: {result.final_model_dir} (all metrics in {result.output_dir / 'train_results.json'})")
    if result.hub_errors:
        print("Hub uploads failed (the local folders are complete):", *result.hub_errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
