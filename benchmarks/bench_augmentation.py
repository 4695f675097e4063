"""Per-image CPU cost of the ConVIRT augmentation: PIL per image (the default) vs. batched kornia.

Both pipelines apply the same operations with the same parameter ranges (random resized crop 0.6-1.0, flip 0.5,
affine ±20° / ±0.1 / 0.95-1.05, brightness and contrast 0.4, Gaussian blur sigma 0.1-3.0, normalization) to real
chest X-rays from `shared/data/covid-cxr`. kornia needs equally sized inputs, so its images are first padded and
resized to 256x256 with PIL (timed separately). The baseline (ratio 1.0) is the PIL pipeline measured in the same
run.

    python benchmarks/bench_augmentation.py [--images 64] [--batch-size 32] [--threads 1]
"""

import argparse
import time

import kornia.augmentation as K
import numpy as np
import PIL.Image
import torch

from dataset_scripts.paths import shared_data_dir
from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor, pad_to_square





def kornia_convirt(processor: MedCLIPImageProcessor, size: int) -> K.AugmentationSequential:
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.6, 1.0)),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomAffine(degrees=20.0, translate=(0.1, 0.1), scale=(0.95, 1.05), p=1.0),
        K.ColorJiggle(brightness=0.4, contrast=0.4, p=1.0),
        K.RandomGaussianBlur(kernel_size=(23, 23), sigma=(0.1, 3.0), p=1.0),
        K.Normalize(mean=torch.tensor([processor.image_mean]), std=torch.tensor([processor.image_std])),
    )


def seconds_per_image(function, count: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one DataLoader worker)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    paths = sorted((shared_data_dir() / "covid-cxr" / "images").glob("*.jpg"))[: args.images]
    images = [PIL.Image.open(path).copy() for path in paths]
    processor = MedCLIPImageProcessor()
    augment = build_augmentation("convirt", processor)

    def run_pil():
        for seed, image in enumerate(images):
            augment(image, seed=seed)

    def prepare_for_kornia():
        squares = [pad_to_square(np.asarray(image.convert("L"))[None])[0] for image in images]
        resized = [np.asarray(PIL.Image.fromarray(square).resize((256, 256), PIL.Image.BICUBIC)) for square in squares]
        return torch.from_numpy(np.stack(resized)[:, None]).float().div_(255)

    batch = prepare_for_kornia()
    pipeline = kornia_convirt(processor, 224)

    def run_kornia():
        with torch.no_grad():
            for start in range(0, len(batch), args.batch_size):
                pipeline(batch[start : start + args.batch_size])

    pil = seconds_per_image(run_pil, len(images), args.repeats)
    prepare = seconds_per_image(prepare_for_kornia, len(images), args.repeats)
    kornia_only = seconds_per_image(run_kornia, len(images), args.repeats)
    print(f"{len(images)} covid-cxr images, torch threads={args.threads}, kornia batch size={args.batch_size}")
    print(f"{'pipeline':<40}{'ms / image':>12}{'ratio vs PIL':>14}")
    rows = [
        ("PIL per image (default)", pil),
        ("kornia batched, transform only", kornia_only),
        ("kornia batched + PIL pad/resize to 256", kornia_only + prepare),
    ]
    for name, seconds in rows:
        print(f"{name:<40}{seconds * 1e3:>12.2f}{seconds / pil:>14.2f}")


if __name__ == "__main__":
    main()
