"""Worker of `tests/test_training.py::test_two_processes_match_one_process_on_the_concatenated_batch`.

Run by `accelerate launch` with 2 CPU processes (gloo). For each loss (InfoNCE, ConVIRT, semantic) every process builds
the same tiny model, takes its half of one fixed global batch and runs ONE `ContrastiveTrainer.training_step` (DDP,
embeddings gathered with gradient). Rank 0 then trains an identical copy of the model in plain PyTorch on the whole
concatenated batch (one process, `model(..., return_loss=True)`, SGD, the same clipping) and writes the largest
parameter difference per loss to the JSON file given as argument.

The vision tower is a tiny ViT: it has no batch statistics. A BatchNorm tower (ResNet) normalises each process's
shard with that shard's own mean and variance, so its outputs (and the update) legitimately differ from one process
on the whole batch. Dropout is off for the same reason: the two runs cannot draw the same masks.
"""

import copy
import json
import sys

import torch
from accelerate import Accelerator
from transformers import BertConfig, ViTConfig

from modeling_medclip import ConVIRTConfig, ConVIRTModel, MedCLIPConfig, MedCLIPModel
from modeling_medclip.training import ContrastiveTrainer, OptimizationArguments, build_optimizer

GLOBAL_IMAGES, GLOBAL_TEXTS, SEQUENCE_LENGTH, NUM_CLASSES = 8, 6, 12, 14


def tiny_model(loss_type: str):
    vision = ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, num_channels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    text = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    if loss_type == "convirt":
        config = ConVIRTConfig(vision_config=vision, text_config=text, projection_dim=8, num_frozen_text_layers=1)
        return ConVIRTModel(config)
    config = MedCLIPConfig(vision_config=vision, text_config=text, projection_dim=8, loss_type=loss_type)
    return MedCLIPModel(config)


def global_batch(loss_type: str) -> dict:
    """One fixed batch; the semantic loss gets decoupled batches (B_img=8 != B_txt=6)."""
    generator = torch.Generator().manual_seed(0)
    num_texts = GLOBAL_TEXTS if loss_type == "semantic" else GLOBAL_IMAGES
    batch = {
        "pixel_values": torch.randn(GLOBAL_IMAGES, 1, 32, 32, generator=generator),
        "input_ids": torch.randint(1, 64, (num_texts, SEQUENCE_LENGTH), generator=generator),
        "attention_mask": torch.ones(num_texts, SEQUENCE_LENGTH, dtype=torch.long),
    }
    if loss_type == "semantic":
        batch["image_labels"] = (torch.rand(GLOBAL_IMAGES, NUM_CLASSES, generator=generator) > 0.6).float()
        batch["text_labels"] = (torch.rand(num_texts, NUM_CLASSES, generator=generator) > 0.6).float()
    return batch


def shard(batch: dict, rank: int, world_size: int) -> dict:
    def part(tensor):
        return tensor.chunk(world_size)[rank]

    return {key: part(value) for key, value in batch.items()}


def reference_step(model, batch: dict, args: OptimizationArguments):
    """One process, whole batch, plain PyTorch: what the distributed step must reproduce."""
    model.train()
    optimizer = build_optimizer(model, args)
    outputs = model(**batch, return_loss=True)
    outputs.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, torch.log(torch.tensor(model.config.max_logit_scale)).item())
    return model


def main(output_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    args = OptimizationArguments(
        output_dir="unused", optim="sgd", learning_rate=0.5, head_learning_rate=2.0, max_grad_norm=1.0
    )
    results = {"world_size": accelerator.num_processes}
    for loss_type in ("infonce", "convirt", "semantic"):
        torch.manual_seed(0)
        model = tiny_model(loss_type)
        initial = copy.deepcopy(model)
        start = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
        batch = global_batch(loss_type)
        trainer = ContrastiveTrainer(accelerator, model, args, num_training_steps=1)
        output = trainer.training_step([shard(batch, accelerator.process_index, accelerator.num_processes)])
        if accelerator.is_main_process:
            reference = reference_step(initial, batch, args)
            trained = dict(trainer.unwrapped.named_parameters())
            differences = {
                name: (trained[name] - parameter).abs().max().item()
                for name, parameter in reference.named_parameters()
            }
            moved = max((trained[name] - start[name]).abs().max().item() for name in start)
            results[loss_type] = {
                "max_difference": max(differences.values()),
                "worst_parameter": max(differences, key=differences.get),
                "logit_scale_difference": differences["logit_scale"],
                "logit_scale_update": (trained["logit_scale"] - start["logit_scale"]).abs().item(),
                "largest_update": moved,
                "loss": output.loss,
            }
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(output_path, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main(sys.argv[1])
