"""Benchmark zero-shot classification: `run_eval.py`'s path against the stock `zero-shot-image-classification`
pipeline at its best batch size, same model, same image files, one run.

Model: MedCLIP's sizes, a ResNet-50 vision tower and a BERT-base text tower with Bio_ClinicalBERT's vocabulary,
randomly initialised (speed does not depend on the weights, and no weights can be downloaded here). Images: the first
`--num_images` pediatric-pneumonia X-rays (224 px JPEG files), given to every contender as file paths, so decoding and
preprocessing are timed too. Classes: the five CheXpert competition findings, one prompt each.

Contenders, each timed end to end (prompt encoding included), best of `--repeats` passes in round-robin order so
that a busy spell of the shared CPU does not hit one of them only, after one warm-up batch:

1. the stock pipeline at each of `--stock_batch_sizes` (its default fp32; it decodes in the calling process and
   tokenizes the candidate texts for every image), and the same under `torch.autocast(bfloat16)`;
2. `run_eval.py`'s path (`modeling_medclip.protocols`): images decoded and preprocessed in `--num_workers`
   DataLoader workers while the model encodes the previous batch, prompts encoded once (`ZeroShotClassifier`), bf16
   autocast where the hardware supports it (`autocast_dtype("auto")`: AVX512-BF16 / AMX CPUs, bf16 GPUs), on a copy
   of the same weights with its BatchNorms folded into the convolutions (`fold_batch_norms`) and stored
   channels-last, images channels-last too, as `run_eval.py` runs it by default.

Prints images/s of each, the ratio of run_eval's path to the best stock configuration in fp32 (the pipeline as
users run it) and to the best stock configuration overall (bf16 included), the machine's CPU, and the largest score
difference from the stock pipeline as a correctness check.

Usage::

    python benchmarks/bench_zero_shot.py [--num_images 128] [--stock_batch_sizes 1 8 32] [--num_workers 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoTokenizer, BertConfig, ResNetConfig, pipeline

from dataset_scripts.paths import shared_data_dir
from modeling_medclip import MedCLIPConfig, MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.protocols import autocast_dtype, embed_images_in_workers, fold_batch_norms
from modeling_medclip.zero_shot import ZeroShotClassifier

ONE_PROMPT = {
    "Atelectasis": "atelectasis at the lung bases",
    "Cardiomegaly": "enlarged cardiac silhouette",
    "Consolidation": "focal consolidation",
    "Edema": "pulmonary edema",
    "Pleural Effusion": "pleural effusion",
}


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def image_paths(data_dir: Path, num_images: int) -> list[str]:
    metadata = pd.read_csv(data_dir / "metadata.csv")
    if num_images > len(metadata):
        raise ValueError(f"--num_images {num_images} exceeds the {len(metadata)} images of {data_dir}")
    return [str(data_dir / name) for name in metadata["image"][:num_images]]


def run_eval_path(model, processor, paths, batch_size: int, num_workers: int, dtype) -> torch.Tensor:
    """What `run_eval.py --task zero-shot` does per task (its model folded and channels-last, as run_eval loads it):
    prompts once, images through workers, scores."""
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        classifier = ZeroShotClassifier(model, processor, {c: [p] for c, p in ONE_PROMPT.items()})
    embeddings = embed_images_in_workers(model, processor, paths, batch_size, num_workers, dtype, channels_last=True)
    return classifier.classify_embeddings(embeddings).probs.float()


def stock_scores(outputs) -> torch.Tensor:
    by_prompt = {prompt: name for name, prompt in ONE_PROMPT.items()}
    rows = [{by_prompt[o["label"]]: o["score"] for o in output} for output in outputs]
    return torch.tensor([[row[name] for name in ONE_PROMPT] for row in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=128)
    parser.add_argument("--stock_batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch_size", type=int, default=32, help="run_eval path: images per forward pass")
    parser.add_argument("--num_workers", type=int, default=2, help="run_eval path: DataLoader workers")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes per contender (best kept)")
    parser.add_argument("--data", type=Path, default=shared_data_dir() / "pediatric-pneumonia-cxr")
    parser.add_argument("--tokenizer", type=Path, default=shared_data_dir() / "bio-clinicalbert-tokenizer")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = MedCLIPModel(MedCLIPConfig(vision_config=ResNetConfig(), text_config=BertConfig(vocab_size=28996))).eval()
    processor = MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(args.tokenizer))
    paths = image_paths(args.data, args.num_images)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    labels = list(ONE_PROMPT.values())
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()} "
          "(a shared, loaded machine: compare the ratios, not the absolute rates)")
    print(f"model: ResNet-50 + BERT-base (random init); {len(paths)} pediatric-pneumonia JPEG files, 5 classes; "
          f"run_eval path: batch {args.batch_size}, {args.num_workers} workers, autocast {dtype}")

    contenders = {}  # name -> (is stock, uses bf16, run)
    for batch_size in args.stock_batch_sizes:
        stock = pipeline("zero-shot-image-classification", model=model, tokenizer=processor.tokenizer,
                         image_processor=processor.image_processor, batch_size=batch_size)
        for bf16 in (False, True):
            def run(stock=stock, bf16=bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return stock_scores(stock(paths, candidate_labels=labels, hypothesis_template="{}"))
            contenders[f"stock pipeline, batch {batch_size}, {'bf16 autocast' if bf16 else 'fp32'}"] = (True, bf16, run)
    channels_last_model = copy.deepcopy(model)  # same weights, prepared as run_eval.py's load_models does
    fold_batch_norms(channels_last_model)
    channels_last_model.to(memory_format=torch.channels_last)
    contenders["run_eval.py path"] = (
        False, dtype is not None,
        lambda: run_eval_path(channels_last_model, processor, paths, args.batch_size, args.num_workers, dtype),
    )

    with torch.no_grad():
        run_eval_path(channels_last_model, processor, paths[: args.batch_size], args.batch_size, 0, dtype)  # warm-up
        seconds = dict.fromkeys(contenders, float("inf"))
        scores = {}
        for repeat in range(args.repeats):
            for name, (is_stock, _, run) in contenders.items():
                if repeat > 0 and " batch 1," in name:
                    continue  # the batch-1 stock pipeline, by far the slowest, runs one pass
                start = time.perf_counter()
                scores[name] = run()
                seconds[name] = min(seconds[name], time.perf_counter() - start)

    rate = {name: len(paths) / elapsed for name, elapsed in seconds.items()}
    print(f"\n{'contender':48s} {'images/s':>9s}")
    for name in contenders:
        print(f"{name:48s} {rate[name]:9.2f}")
    ours = rate["run_eval.py path"]
    stock_fp32 = max((n for n, (s, bf16, _) in contenders.items() if s and not bf16), key=rate.get)
    stock_any = max((n for n, (s, _, _) in contenders.items() if s), key=rate.get)
    print(f"\nrun_eval.py path vs best stock fp32 ({stock_fp32}): {ours / rate[stock_fp32]:.2f}x (target >= 2x)")
    print(f"run_eval.py path vs best stock overall ({stock_any}): {ours / rate[stock_any]:.2f}x")
    difference = (scores["run_eval.py path"] - scores[stock_fp32]).abs().max().item()
    print(f"max |run_eval score - stock fp32 score| over {len(paths)} images x 5 classes: {difference:.2e}"
          f" (bf16 rounding when autocast is on)")


if __name__ == "__main__":
    main()
