"""Training throughput of our contrastive training step against plain-PyTorch baselines, gradient-checkpointing
memory, and a bf16-vs-fp32 loss curve, all measured in one run.

Every throughput ratio compares two models trained in the same run, on the same device, with the same towers, batch
and (unless the row says otherwise) precision, on the same synthetic batch: random pixels, random token ids padded to
`--text_length` (default 32: a batch of 8 IU report sentences pads to 24 tokens at the median, 34 at the 90th
percentile), random 14-dim 0/1 label vectors. Throughput does not depend on what the pixels show.

1. **Swin-Tiny + BERT-base** (`SwinConfig()` = swin-tiny, `BertConfig(vocab_size=28996)` = Bio_ClinicalBERT's shape,
   random init). Baseline: transformers' `VisionTextDualEncoderModel` trained by a plain PyTorch loop
   (`model(..., return_loss=True).loss.backward()`, `torch.optim.AdamW`, fp32), the approach of transformers'
   contrastive-image-text example. Ours: `MedCLIPModel` with the semantic matching loss on the label vectors and
   MedCLIP's text pooling, trained by `ContrastiveTrainer.training_step` under an `Accelerator` in one process: the
   embeddings and label vectors go through `gather_with_grad`, then the model's loss, AdamW over the parameter
   groups, gradient clipping at 1.0, the LR scheduler and the logit-scale clamp. Ours does a little more work per
   step than the baseline (clipping, the scheduler, the clamp, three pooled text layers).
2. **ResNet-50 + BERT-base** (`ResNetConfig()` defaults). `VisionTextDualEncoderModel` needs a 1-d pooled vision
   output, so the baseline is written here: the two `AutoModel` towers, bias-free linear heads to 512-d, a learnable
   logit scale and the CLIP loss, trained by the same plain loop.

   For each pair, ours is measured as is, then the fast path is searched greedily: each option of `--fast_path`
   (bf16 autocast through Accelerate, fused AdamW, channels-last images and conv weights, `torch.compile` through
   Accelerate's inductor backend) is added on top of the best configuration so far and kept only if it raises the
   ratio to the baseline by more than 3 %. Every row is timed interleaved with the baseline, which stays in memory:
   `--warmup` untimed steps of both (the first one compiles, under `torch.compile`), then `--steps` alternating timed
   steps of each; a row reports the median step time (robust to the noise of a shared machine) as images/s =
   batch / median, and its ratio uses the baseline steps of its own window, so a ratio compares measurements taken
   seconds apart.
   bf16 only pays on hardware with bf16 matrix units (GPUs, CPUs with AMX or AVX512-BF16); elsewhere its kernels
   run on a slow fallback. A probe first times a 3x3 convolution and a BERT-sized linear layer in fp32 and under
   bf16 autocast; where bf16 is slower for both, the bf16 row is not timed (one such step of these towers takes
   minutes) unless `--force_bf16`, which times it with 1 warm-up and 1 step. Swin is not timed with channels-last:
   its only convolution is the patch embedding.

3. **Gradient checkpointing** (the call `ContrastiveTrainer` makes for `gradient_checkpointing=True`; the ResNet
   stages are checkpointed through `towers.add_block_checkpointing`, Swin and BERT natively) vs without, for ours in
   fp32. Per tower pair, a fresh subprocess builds the model, runs one warm-up step (it allocates the AdamW state),
   then one step without and one step with checkpointing. For each step it reports the growth over the memory
   before the step (weights and AdamW state, the same in both, are left out): at the peak of the step (gradients +
   activations + temporaries: the figure of the <= 0.6x target) and when the model's forward returns (the
   activations kept for backward; a forward hook reads it). On the CPU the figures are resident memory: the peak is
   the kernel's high-water mark `VmHWM`, reset just before the step by writing 5 to `/proc/self/clear_refs`, so no
   peak between two samples can be missed; the subprocess runs with `MALLOC_MMAP_THRESHOLD_=131072` so that glibc
   returns every large freed block to the kernel at once (by default it raises that threshold as blocks are freed
   and keeps them, so freed activations would still count as resident). On CUDA: `torch.cuda.memory_allocated` and
   `max_memory_allocated`.
4. **bf16 still trains**: a small ResNet + small BERT (the `cpu-demo` towers) trained `--curve_steps` steps by the
   same `ContrastiveTrainer` on real chest X-rays of `shared/data/covid-cxr` (the first `--curve_images` with a
   note, 64 px) paired with their notes, once in fp32 and once under bf16 autocast, with the same seed, data order
   and dropout masks; both loss curves are printed side by side and, with `--plot PATH`, drawn with matplotlib.
   The curve uses the InfoNCE loss: the notes' CheXpert label vectors are so alike (43 distinct among 384 notes)
   that the semantic loss's floor (3.27 at batch 32) sits next to its value for constant embeddings
   (log 32 = 3.47), so a 30-step curve of it could not show learning; InfoNCE on the pairs drops well below log 32.

Usage::

    python benchmarks/bench_train_step.py [--batch_size 8] [--steps 2] [--warmup 1] [--image_size 224]
        [--text_length 32] [--which swin,resnet] [--fast_path bf16,fused,channels_last,compile] [--force_bf16]
        [--skip_memory] [--skip_curve] [--plot curve.png] [--device auto|cpu|cuda]

On a GPU use a larger `--batch_size` (e.g. 64). Swin needs `--image_size` >= 224: transformers' Swin fails when its last
stage (image_size / 32 patches a side) is smaller than its 7x7 window.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    BertConfig,
    ResNetConfig,
    SwinConfig,
    VisionTextDualEncoderModel,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from dataset_scripts.paths import shared_data_dir  # noqa: E402
from modeling_medclip import MedCLIPConfig, MedCLIPModel  # noqa: E402
from modeling_medclip.training import ContrastiveTrainer, OptimizationArguments  # noqa: E402

NUM_LABELS = 14
KEEP_MARGIN = 1.03  # an option joins the fast path only if it raises the ratio by more than 3 %


# ----------------------------------------------------------------------------------------------------------------------
# Towers, batches, devices
# ----------------------------------------------------------------------------------------------------------------------


def tower_configs(which: str, image_size: int):
    """(vision_config, text_config) of a benchmarked pair: `swin` = Swin-Tiny, `resnet` = ResNet-50; BERT-base."""
    text = BertConfig(vocab_size=28996)
    if which == "swin":
        if image_size < 224:
            raise ValueError(
                f"--image_size {image_size}: transformers' Swin-Tiny fails when its last stage (image_size / 32 = "
                f"{image_size // 32} patches a side) is smaller than its 7x7 window; use >= 224 or --which resnet"
            )
        return SwinConfig(image_size=image_size), text
    if which == "resnet":
        return ResNetConfig(), text
    raise ValueError(f"unknown tower pair {which!r}: expected 'swin' or 'resnet'")


def make_batch(batch_size: int, image_size: int, text_length: int, vocab_size: int, seed: int = 0) -> dict:
    """A synthetic batch on the CPU: images, padded token ids and 0/1 label vectors for images and texts."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(text_length // 2, text_length + 1, (batch_size,), generator=generator)
    attention_mask = (torch.arange(text_length)[None, :] < lengths[:, None]).long()
    input_ids = torch.randint(1000, vocab_size, (batch_size, text_length), generator=generator) * attention_mask
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_labels": torch.randint(0, 2, (batch_size, NUM_LABELS), generator=generator).float(),
        "text_labels": torch.randint(0, 2, (batch_size, NUM_LABELS), generator=generator).float(),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_probe(device: torch.device) -> dict:
    """Time of a 3x3 convolution and of a BERT-sized linear layer, fp32 vs bf16 autocast, on `device`.

    bf16 only pays where the device has bf16 matrix units (GPUs, CPUs with AMX or AVX512-BF16); elsewhere the bf16
    kernels run on a slow fallback. Returns the bf16 / fp32 time ratios (> 1: bf16 is slower).
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 64, 3, padding=1).to(device)
    linear = nn.Linear(768, 3072).to(device)
    images = torch.randn(8, 64, 56, 56, device=device)
    tokens = torch.randn(8 * 77, 768, device=device)
    result = {}
    with torch.no_grad():
        for name, layer, inputs in (("conv", conv, images), ("linear", linear, tokens)):
            times = {}
            for precision in ("fp32", "bf16"):
                bf16 = precision == "bf16"
                with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                    layer(inputs)
                    synchronize(device)
                    repeats, start = 0, time.perf_counter()
                    while repeats < 1 or (time.perf_counter() - start < 0.3 and repeats < 100):
                        layer(inputs)
                        repeats += 1
                    synchronize(device)
                times[precision] = (time.perf_counter() - start) / repeats
            result[name] = times["bf16"] / times["fp32"]
    return result


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; every trainer of this script gets a fresh Accelerator."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------------
# The baselines: plain PyTorch loops
# ----------------------------------------------------------------------------------------------------------------------


class TwoTowerCLIP(nn.Module):
    """The ResNet-50 baseline: two AutoModel towers, bias-free linear heads, a learnable logit scale, CLIP loss."""

    def __init__(self, vision_config, text_config, projection_dim: int = 512):
        super().__init__()
        self.vision_model = AutoModel.from_config(vision_config)
        self.text_model = AutoModel.from_config(text_config)
        self.visual_projection = nn.Linear(vision_config.hidden_sizes[-1], projection_dim, bias=False)
        self.text_projection = nn.Linear(text_config.hidden_size, projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.vision_model(pixel_values=pixel_values).pooler_output.flatten(1)  # (B, 2048)
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output  # (B, 768)
        image = F.normalize(self.visual_projection(image), dim=-1)
        text = F.normalize(self.text_projection(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image @ text.T
        targets = torch.arange(len(logits_per_image), device=logits_per_image.device)
        return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2


class BaselineRunner:
    """A plain training loop: forward with the CLIP loss, backward, `torch.optim.AdamW` step, fp32."""

    def __init__(self, which: str, image_size: int, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        vision_config, text_config = tower_configs(which, image_size)
        if which == "swin":
            self.model = VisionTextDualEncoderModel(
                vision_model=AutoModel.from_config(vision_config), text_model=AutoModel.from_config(text_config)
            )
            self.name = "VisionTextDualEncoderModel, plain loop"
        else:
            self.model = TwoTowerCLIP(vision_config, text_config)
            self.name = "AutoModel towers + linear heads, plain loop"
        self.model.to(device).train()
        self.device = device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=5e-5)

    def step(self, batch: dict) -> float:
        pixel_values = batch["pixel_values"].to(self.device)
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        if isinstance(self.model, VisionTextDualEncoderModel):
            loss = self.model(
                input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, return_loss=True
            ).loss
        else:
            loss = self.model(pixel_values, input_ids, attention_mask)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# ----------------------------------------------------------------------------------------------------------------------
# Ours: MedCLIPModel + ContrastiveTrainer.training_step
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FastPath:
    bf16: bool = False
    fused: bool = False
    channels_last: bool = False
    compile: bool = False

    def label(self) -> str:
        parts = [name for name, on in (("bf16", self.bf16), ("fused AdamW", self.fused),
                                       ("channels_last", self.channels_last), ("compile", self.compile)) if on]
        return "fp32" if not parts else " + ".join(parts if self.bf16 else ["fp32", *parts])


def fused_adamw_available(device: torch.device) -> bool:
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return False
    return True


def build_medclip(which: str, image_size: int, **config_kwargs) -> MedCLIPModel:
    vision_config, text_config = tower_configs(which, image_size)
    config = MedCLIPConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(), loss_type="semantic", **config_kwargs
    )
    return MedCLIPModel(config)


class OursRunner:
    """`ContrastiveTrainer.training_step` on one micro-batch, under a fresh `Accelerator`."""

    def __init__(
        self,
        model: MedCLIPModel,
        options: FastPath,
        device: torch.device,
        gradient_checkpointing: bool = False,
        learning_rate: float = 5e-5,
        head_learning_rate: float | None = None,
        max_steps: int = 1000,
        warmup_steps: int = 0,
    ):
        reset_accelerate()
        self.accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision="bf16" if options.bf16 else "no",
            dynamo_backend="inductor" if options.compile else "no",
        )
        args = OptimizationArguments(
            output_dir=tempfile.gettempdir(),  # never written: only `train()` saves
            optim="adamw_torch_fused" if options.fused else "adamw_torch",
            learning_rate=learning_rate,
            head_learning_rate=head_learning_rate,
            warmup_steps=warmup_steps,
            mixed_precision="bf16" if options.bf16 else "no",
            channels_last=options.channels_last,
            torch_compile=options.compile,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.trainer = ContrastiveTrainer(self.accelerator, model, args, num_training_steps=max_steps)

    def step(self, batch: dict) -> float:
        return self.trainer.training_step([batch]).loss


# ----------------------------------------------------------------------------------------------------------------------
# Throughput
# ----------------------------------------------------------------------------------------------------------------------


def timed(step, batch, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step(batch)
    synchronize(device)
    return time.perf_counter() - start


def interleaved(baseline: BaselineRunner, candidate: OursRunner, batch, device, warmup: int, steps: int) -> dict:
    """Warm-up steps of both, then `steps` alternating timed steps; median step times and the first step's time."""
    first = None
    for index in range(warmup):
        baseline.step(batch)
        elapsed = timed(candidate.step, batch, device)
        first = elapsed if index == 0 else first
    baseline_times, candidate_times = [], []
    for index in range(steps):
        order = [(baseline, baseline_times), (candidate, candidate_times)]
        for runner, times in order if index % 2 == 0 else order[::-1]:
            times.append(timed(runner.step, batch, device))
    return {
        "baseline_s": statistics.median(baseline_times),
        "candidate_s": statistics.median(candidate_times),
        "first_step_s": first,
    }


def print_row(label: str, images_per_second: float, ratio: float | None, note: str = "") -> None:
    ratio_text = "1.00x (baseline)" if ratio is None else f"{ratio:.2f}x"
    print(f"  {label:<58} {images_per_second:8.2f} img/s   {ratio_text:<17} {note}", flush=True)


def benchmark_pair(which: str, args, device: torch.device, probe: dict) -> dict:
    """Ours and the greedy fast-path search against the baseline of one tower pair. Returns the summary."""
    batch = make_batch(args.batch_size, args.image_size, args.text_length, 28996, seed=args.seed)
    names = {"swin": "Swin-Tiny + BERT-base", "resnet": "ResNet-50 + BERT-base"}
    print(f"\n[{names[which]}] batch {args.batch_size}, {args.image_size} px, {args.text_length} tokens, "
          f"{args.warmup} warm-up + {args.steps} timed steps per row (median), device {device}", flush=True)
    baseline = BaselineRunner(which, args.image_size, device, seed=args.seed)
    print(f"  baseline: {baseline.name}, fp32, torch.optim.AdamW", flush=True)

    def measure(options: FastPath, warmup: int, steps: int) -> dict:
        torch.manual_seed(args.seed)
        candidate = OursRunner(build_medclip(which, args.image_size), options, device)
        try:
            result = interleaved(baseline, candidate, batch, device, warmup, steps)
        finally:
            del candidate
            release()
        result["ratio"] = result["baseline_s"] / result["candidate_s"]
        return result

    rows = []

    def report(label: str, options: FastPath, result: dict, note: str = "") -> None:
        if not rows:
            print_row("baseline (same window as the next row)", args.batch_size / result["baseline_s"], None)
        print_row(label, args.batch_size / result["candidate_s"], result["ratio"],
                  note + f" [baseline in its window: {args.batch_size / result['baseline_s']:.2f} img/s]")
        rows.append({"label": label, "options": options, **result})

    plain = FastPath()
    result = measure(plain, args.warmup, args.steps)
    report("ours: fp32, semantic loss, gathered negatives", plain, result)
    best_options, best_ratio = plain, result["ratio"]

    bf16_slow = probe["conv"] > 1.0 and probe["linear"] > 1.0
    for option in [name.strip() for name in args.fast_path.split(",") if name.strip()]:
        options = replace(best_options, **{option: True})
        warmup, steps, note = args.warmup, args.steps, ""
        if option == "channels_last" and which == "swin":
            print("  + channels_last: not timed: Swin's only convolution is its patch embedding", flush=True)
            continue
        if option == "fused" and not fused_adamw_available(device):
            print(f"  + fused AdamW: skipped (torch.optim.AdamW(fused=True) is not available on {device.type})")
            continue
        if option == "bf16" and bf16_slow:
            if not args.force_bf16:
                print(f"  + bf16: not timed: bf16 autocast is {probe['conv']:.1f}x (conv) / {probe['linear']:.1f}x "
                      "(linear) SLOWER than fp32 on this device (probe above; --force_bf16 times it anyway)",
                      flush=True)
                continue
            warmup, steps = 1, 1  # minutes per step on such a device
        result = measure(options, warmup, steps)
        if option == "compile":
            note = f"(first step incl. compilation: {result['first_step_s']:.0f} s)"
        kept = result["ratio"] > best_ratio * KEEP_MARGIN
        report(f"ours + {option} -> {options.label()}", options, result, note + (" kept" if kept else " dropped"))
        if kept:
            best_options, best_ratio = options, result["ratio"]
    del baseline
    release()
    best_row = next(row for row in rows if row["options"] == best_options)
    return {
        "pair": names[which],
        "ours_ratio": rows[0]["ratio"],
        "ours_images_per_second": args.batch_size / rows[0]["candidate_s"],
        "baseline_images_per_second": args.batch_size / rows[0]["baseline_s"],
        "fast_label": best_options.label(),
        "fast_ratio": best_row["ratio"],
        "fast_images_per_second": args.batch_size / best_row["candidate_s"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Memory with and without gradient checkpointing (one fresh subprocess per tower pair)
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1))


def _one_step_memory(runner: "OursRunner", batch: dict, device: torch.device) -> dict:
    """Memory before one training step, when the model's forward returns (the activations kept for backward, plus
    the outputs), and at the peak of the step: resident bytes on the CPU, allocated bytes on CUDA."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        current = lambda: torch.cuda.memory_allocated(device)  # noqa: E731
    else:
        current = lambda: _status_kib("VmRSS") * 1024  # noqa: E731
    after_forward = []
    hook = runner.trainer.unwrapped.register_forward_hook(lambda *_: after_forward.append(current()))
    before = current()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the kernel resets the peak RSS (VmHWM) to the current RSS
    runner.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    hook.remove()
    return {"before": before, "peak": peak, "growth": peak - before, "forward": after_forward[0] - before}


def memory_worker(args) -> None:
    """In the subprocess: one JSON line with the memory of a step without, then with, gradient checkpointing.

    Checkpointing is switched on by the call `ContrastiveTrainer` makes for `gradient_checkpointing=True`
    (`gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`).
    """
    device = resolve_device(args.device)
    batch = make_batch(args.batch_size, args.image_size, args.text_length, 28996, seed=args.seed)
    torch.manual_seed(args.seed)
    runner = OursRunner(build_medclip(args._memory_worker, args.image_size), FastPath(), device)
    runner.step(batch)  # allocates the AdamW state
    without = _one_step_memory(runner, batch, device)
    runner.trainer.unwrapped.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with_checkpointing = _one_step_memory(runner, batch, device)
    print(json.dumps({"without": without, "with": with_checkpointing}), flush=True)


def measure_memory(which: str, args) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--_memory_worker", which,
        "--batch_size", str(args.batch_size), "--image_size", str(args.image_size),
        "--text_length", str(args.text_length), "--device", args.device, "--seed", str(args.seed),
    ]  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory worker failed ({' '.join(command)}):\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def benchmark_memory(which_list: list[str], args) -> list[dict]:
    names = {"swin": "Swin-Tiny + BERT-base", "resnet": "ResNet-50 + BERT-base"}
    method = "torch.cuda.max_memory_allocated" if resolve_device(args.device).type == "cuda" else "VmHWM / VmRSS"
    print(f"\n[Memory of one training step of ours without -> with gradient checkpointing, fp32, batch "
          f"{args.batch_size}, {args.image_size} px, {args.text_length} tokens; over the weights + AdamW state; "
          f"{method}]", flush=True)
    results = []
    gib = 1024**3
    for which in which_list:
        try:
            measured = measure_memory(which, args)
        except RuntimeError as error:
            print(f"  {names[which]:<24} FAILED: {str(error).strip().splitlines()[-1]}", flush=True)
            continue
        without, with_checkpointing = measured["without"], measured["with"]
        ratio = with_checkpointing["growth"] / without["growth"]
        forward_ratio = with_checkpointing["forward"] / without["forward"]
        print(f"  {names[which]:<24} step peak growth: {without['growth'] / gib:.2f} -> "
              f"{with_checkpointing['growth'] / gib:.2f} GiB = {ratio:.2f}x;  held after forward (activations): "
              f"{without['forward'] / gib:.2f} -> {with_checkpointing['forward'] / gib:.2f} GiB = {forward_ratio:.2f}x;"
              f"  process peak {without['peak'] / gib:.2f} -> {with_checkpointing['peak'] / gib:.2f} GiB", flush=True)
        results.append({"pair": names[which], "ratio": ratio, "forward_ratio": forward_ratio})
    return results


# ----------------------------------------------------------------------------------------------------------------------
# bf16 vs fp32 loss curves on the real chest X-rays
# ----------------------------------------------------------------------------------------------------------------------


def load_covid_cxr(data_dir: Path, image_size: int, max_images: int, max_length: int) -> dict:
    """The first `max_images` covid-cxr X-rays that have a note, with their notes, collated once (no augmentation)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from modeling_medclip.augmentation import build_augmentation
    from modeling_medclip.collator import MedCLIPCollator
    from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor

    metadata = pd.read_csv(data_dir / "covid-cxr" / "metadata.csv")
    metadata = metadata[metadata["has_text"].astype(bool)].head(max_images)
    examples = [
        {"image": str(data_dir / "covid-cxr" / row.file_name), "text": row.text, "image_id": Path(row.file_name).stem}
        for row in metadata.itertuples(index=False)
    ]
    image_processor = MedCLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "bio-clinicalbert-tokenizer")
    collator = MedCLIPCollator(
        tokenizer, build_augmentation("none", image_processor, size=image_size), max_length=max_length,
        pad_to_max_length=True,
    )  # fmt: skip
    batch = collator(examples)
    return {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}


def curve_run(data: dict, bf16: bool, args, device: torch.device) -> list[float]:
    torch.manual_seed(args.seed)
    model = MedCLIPModel(
        MedCLIPConfig(
            vision_config=ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]).to_dict(),
            text_config=BertConfig(
                vocab_size=28996, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
            ).to_dict(),
            projection_dim=64,
            loss_type="infonce",
        )
    )
    runner = OursRunner(model, FastPath(bf16=bf16), device, learning_rate=1e-3, head_learning_rate=3e-3,
                        max_steps=args.curve_steps, warmup_steps=max(1, args.curve_steps // 10))
    generator = torch.Generator().manual_seed(args.seed)
    count = len(data["pixel_values"])
    losses = []
    for _ in range(args.curve_steps):
        index = torch.randperm(count, generator=generator)[: args.curve_batch_size]
        losses.append(runner.step({key: value[index] for key, value in data.items()}))
    del runner
    release()
    return losses


def benchmark_curve(args, device: torch.device) -> dict:
    data_dir = Path(args.data_dir)
    data = load_covid_cxr(data_dir, args.curve_image_size, args.curve_images, max_length=64)
    print(f"\n[bf16 vs fp32 training on {len(data['pixel_values'])} real covid-cxr X-rays paired with their notes, "
          f"{args.curve_image_size} px: small ResNet + small BERT, InfoNCE loss, batch {args.curve_batch_size}, "
          f"{args.curve_steps} steps, same seed, data order and dropout masks; a loss below "
          f"log({args.curve_batch_size}) = {math.log(args.curve_batch_size):.3f} means the pairs are being told apart]",
          flush=True)
    start = time.perf_counter()
    fp32 = curve_run(data, bf16=False, args=args, device=device)
    fp32_time = time.perf_counter() - start
    start = time.perf_counter()
    bf16 = curve_run(data, bf16=True, args=args, device=device)
    bf16_time = time.perf_counter() - start
    print(f"  {'step':>4}  {'fp32 loss':>9}  {'bf16 loss':>9}  {'diff':>7}")
    for step, (a, b) in enumerate(zip(fp32, bf16), start=1):
        print(f"  {step:>4}  {a:9.4f}  {b:9.4f}  {b - a:+7.4f}")
    window = max(1, min(5, len(fp32) // 4))
    summary = {}
    for name, losses in (("fp32", fp32), ("bf16", bf16)):
        summary[name] = (statistics.mean(losses[:window]), statistics.mean(losses[-window:]))
    print(f"  mean of the first / last {window} steps: fp32 {summary['fp32'][0]:.4f} -> {summary['fp32'][1]:.4f}, "
          f"bf16 {summary['bf16'][0]:.4f} -> {summary['bf16'][1]:.4f}; "
          f"max |bf16 - fp32| {max(abs(a - b) for a, b in zip(fp32, bf16)):.4f}; "
          f"wall time fp32 {fp32_time:.0f} s, bf16 {bf16_time:.0f} s", flush=True)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 4))
        steps = range(1, len(fp32) + 1)
        axis.plot(steps, fp32, label="fp32")
        axis.plot(steps, bf16, label="bf16 autocast", linestyle="--")
        axis.set_xlabel("optimizer step")
        axis.axhline(math.log(args.curve_batch_size), color="gray", linewidth=0.8, linestyle=":",
                     label=f"log({args.curve_batch_size}): chance")
        axis.set_ylabel("InfoNCE loss")
        axis.set_title(f"MedCLIP, covid-cxr {args.curve_image_size} px, batch {args.curve_batch_size}")
        axis.legend()
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
        print(f"  plot saved to {args.plot}")
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=8, help="Images (and texts) per step.")
    parser.add_argument("--steps", type=int, default=2, help="Timed steps per row (the median is reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed warm-up steps per row.")
    parser.add_argument("--image_size", type=int, default=224, help="Image side in pixels.")
    parser.add_argument("--text_length", type=int, default=32,
                        help="Padded text length in tokens (a batch of 8 IU report sentences pads to 24 tokens at the "
                        "median, 34 at the 90th percentile, with the Bio_ClinicalBERT tokenizer).")
    parser.add_argument("--fast_path", default="bf16,fused,channels_last,compile",
                        help="Fast-path options tried, in this order, on top of ours: any of bf16,fused,channels_last,"
                        "compile.")
    parser.add_argument("--which", default="swin,resnet", help="Tower pairs: any of swin,resnet.")
    parser.add_argument("--skip_memory", action="store_true", help="Skip the gradient checkpointing memory rows.")
    parser.add_argument("--skip_curve", action="store_true", help="Skip the bf16 vs fp32 loss curves.")
    parser.add_argument("--force_bf16", action="store_true",
                        help="Time the bf16 candidate (1 warm-up + 1 step) even where the probe finds bf16 slower.")
    parser.add_argument("--plot", default=None, help="Save the bf16 / fp32 loss curves to this image file.")
    parser.add_argument("--curve_steps", type=int, default=30, help="Optimizer steps of each loss curve.")
    parser.add_argument("--curve_batch_size", type=int, default=32, help="Batch size of the loss curves.")
    parser.add_argument("--curve_image_size", type=int, default=64, help="Image side of the loss curves.")
    parser.add_argument("--curve_images", type=int, default=256, help="Use at most this many covid-cxr images.")
    default_data_dir = str(shared_data_dir())
    parser.add_argument("--data_dir", default=default_data_dir,
                        help="Folder holding covid-cxr/ and bio-clinicalbert-tokenizer/ (default: $MEDCLIP_SHARED_DATA "
                        "or <repo>/../shared/data).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if available.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--_memory_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch_size must be >= 2, --steps and --warmup >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    hf_logging.set_verbosity_error()
    if args._memory_worker:
        memory_worker(args)
        return
    which_list = [name.strip() for name in args.which.split(",") if name.strip()]
    for name in which_list:
        tower_configs(name, args.image_size)  # validates the names before anything slow
    unknown = {name.strip() for name in args.fast_path.split(",") if name.strip()} - set(FastPath.__dataclass_fields__)
    if unknown:
        raise ValueError(f"--fast_path: unknown option(s) {sorted(unknown)}; expected bf16,fused,channels_last,compile")
    device = resolve_device(args.device)
    run_start = time.perf_counter()
    probe = bf16_probe(device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()})"))
    print(f"bf16 autocast probe: time bf16 / fp32 = {probe['conv']:.2f}x (3x3 conv, 64 ch, 8x56x56), "
          f"{probe['linear']:.2f}x (768->3072 linear, 616 tokens)"
          + ("  -> bf16 is SLOWER than fp32 here" if probe["conv"] > 1.0 and probe["linear"] > 1.0 else ""),
          flush=True)

    summaries = [benchmark_pair(which, args, device, probe) for which in which_list]
    memory = [] if args.skip_memory else benchmark_memory(which_list, args)
    curve = None if args.skip_curve else benchmark_curve(args, device)

    print("\n[Summary] ratios to the baseline measured in the same run (targets: ours >= 1.0x, fast path >= 2.0x, "
          "checkpointing memory <= 0.6x)")
    for summary in summaries:  # targets are checked on the printed (rounded) ratios
        ours_ratio, fast_ratio = round(summary["ours_ratio"], 2), round(summary["fast_ratio"], 2)
        print(f"  {summary['pair']:<24} ours {ours_ratio:.2f}x "
              f"({summary['ours_images_per_second']:.2f} vs {summary['baseline_images_per_second']:.2f} img/s)"
              f"{'' if ours_ratio >= 1.0 else '  BELOW TARGET'};  fast path [{summary['fast_label']}] "
              f"{fast_ratio:.2f}x ({summary['fast_images_per_second']:.2f} img/s)"
              f"{'' if fast_ratio >= 2.0 else '  BELOW TARGET'}")
    for row in memory:
        print(f"  {row['pair']:<24} checkpointing: step peak-memory growth {row['ratio']:.2f}x"
              f"{'' if round(row['ratio'], 2) <= 0.6 else '  ABOVE TARGET'}, activations held after forward "
              f"{row['forward_ratio']:.2f}x")
    if curve is not None:
        print(f"  bf16 loss curve: {curve['bf16'][0]:.3f} -> {curve['bf16'][1]:.3f} "
              f"(fp32: {curve['fp32'][0]:.3f} -> {curve['fp32'][1]:.3f})")
    print(f"  total wall time {time.perf_counter() - run_start:.0f} s")


if __name__ == "__main__":
    main()
