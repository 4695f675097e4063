"""Trainable parameters, peak training memory and step time of LoRA against full fine-tuning, in one run.

The model is a MedCLIP with a ResNet-50 vision tower and a BERT-base text tower (`ResNetConfig()` and
`BertConfig(vocab_size=28996)`, Bio_ClinicalBERT's shape; random init from the configs, nothing is downloaded) and
its semantic matching loss, trained with AdamW on one synthetic batch: random pixels, random token ids of
`--text_length`, random 14-dim 0/1 label vectors (memory and time do not depend on what the pixels show).

- **full**: every parameter trained.
- **lora**: `modeling_medclip.adapters.apply_adapters(model, method="lora", towers=("vision", "text"), r=--rank)`:
  the default targets (every convolution of the ResNet blocks; BERT's attention and MLP), weights and heads frozen.

Each variant runs in a fresh subprocess that builds the model, the optimizer, runs `--warmup` untimed steps (they
allocate the AdamW state) and `--steps` timed steps, and reports:

- *peak memory*: the process's peak resident set size over its whole life (`ru_maxrss` of `getrusage`, the
  kernel's high-water mark of resident memory: weights, gradients, optimizer state, activations and temporaries,
  plus the Python / torch runtime that both variants share). The subprocess runs with
  `MALLOC_MMAP_THRESHOLD_=131072`, so glibc returns large freed blocks to the kernel at once and a variant is not
  charged for memory its allocator merely kept. Python-level tools (`tracemalloc`) do not see torch's allocations.
- *peak growth*: that peak minus the resident memory after the model was built, i.e. what training adds on top of
  the weights (gradients, optimizer state, activations).
- *step time*: the median of the timed steps (robust to other jobs on a shared machine).

The ratios printed are lora / full, measured in the same run with the same batch. CUDA: `--device cuda` reports
`torch.cuda.max_memory_allocated` instead of the resident set.

Usage::

    python benchmarks/bench_peft.py [--batch_size 4] [--image_size 224] [--text_length 32] [--steps 3]
        [--warmup 1] [--rank 8] [--device cpu|cuda]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, ResNetConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from modeling_medclip import MedCLIPConfig, MedCLIPModel  # noqa: E402
from modeling_medclip.adapters import apply_adapters  # noqa: E402

VARIANTS = ("full", "lora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--text_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (used internally)")
    return parser.parse_args(argv)


def resident_bytes() -> int:
    """Current resident set size of this process (`VmRSS`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def build_model(variant: str, rank: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MedCLIPConfig(vision_config=ResNetConfig(), text_config=BertConfig(vocab_size=28996))
    model = MedCLIPModel(config)
    if variant == "lora":
        model = apply_adapters(model, method="lora", towers=("vision", "text"), r=rank)
    return model.train()


def synthetic_batch(args: argparse.Namespace, device: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
        "input_ids": torch.randint(1000, 28996, (args.batch_size, args.text_length), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.text_length, dtype=torch.long),
        "image_labels": torch.randint(0, 2, (args.batch_size, 14), generator=generator).float(),
        "text_labels": torch.randint(0, 2, (args.batch_size, 14), generator=generator).float(),
    }
    return {name: value.to(device) for name, value in batch.items()}


def run_variant(args: argparse.Namespace) -> dict:
    """Builds, trains and measures one variant in this process; returns its figures."""
    model = build_model(args.variant, args.rank).to(args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    batch = synthetic_batch(args, args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    after_build = torch.cuda.memory_allocated() if args.device == "cuda" else resident_bytes()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else peak_resident_bytes()
    return {
        "variant": args.variant,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_bytes": peak,
        "peak_growth_bytes": peak - after_build,
        "median_step_s": statistics.median(times),
        "final_loss": loss.item(),
    }


def measure_in_subprocess(variant: str, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(
        [sys.executable, __file__, *argv, "--variant", variant], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def report(args: argparse.Namespace, figures: dict[str, dict]) -> str:
    gib = 1024**3
    full, lora = figures["full"], figures["lora"]
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_model()}, {os.cpu_count()} CPUs"
    memory = "max_memory_allocated" if args.device == "cuda" else "peak resident set (ru_maxrss)"
    rows = [
        ("trainable parameters", f"{full['trainable_parameters']:,}", f"{lora['trainable_parameters']:,}",
         lora["trainable_parameters"] / full["trainable_parameters"]),
        (f"peak memory, {memory}", f"{full['peak_bytes'] / gib:.2f} GiB", f"{lora['peak_bytes'] / gib:.2f} GiB",
         lora["peak_bytes"] / full["peak_bytes"]),
        ("peak growth over the built model", f"{full['peak_growth_bytes'] / gib:.2f} GiB",
         f"{lora['peak_growth_bytes'] / gib:.2f} GiB", lora["peak_growth_bytes"] / full["peak_growth_bytes"]),
        ("median step time", f"{full['median_step_s']:.2f} s", f"{lora['median_step_s']:.2f} s",
         lora["median_step_s"] / full["median_step_s"]),
    ]
    lines = [
        f"ResNet-50 + BERT-base MedCLIP, batch {args.batch_size}, {args.image_size} px, {args.text_length} tokens, "
        f"LoRA r={args.rank} on both towers; {args.steps} timed steps after {args.warmup} warm-up; {machine}",
        f"total parameters: {full['total_parameters']:,} (full), {lora['total_parameters']:,} (lora)",
        "",
        "| | full fine-tuning | LoRA | LoRA / full |",
        "|---|---:|---:|---:|",
        *[f"| {name} | {a} | {b} | {ratio:.3f}x |" for name, a, b, ratio in rows],
        "",
        f"target: LoRA peak training memory <= 0.5x full fine-tuning: "
        f"{'met' if lora['peak_bytes'] <= 0.5 * full['peak_bytes'] else 'NOT met'} "
        f"({lora['peak_bytes'] / full['peak_bytes']:.3f}x)",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return
    figures = {variant: measure_in_subprocess(variant, argv) for variant in VARIANTS}
    print(report(args, figures))


if __name__ == "__main__":
    main()
