"""`run_pretrain.py --peft lora`: continued contrastive pretraining of a saved model with adapters, saving only the
adapter, resuming from an adapter checkpoint, and loading the result with `PeftModel.from_pretrained`."""

import json

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from peft import PeftModel
from test_run_pretrain import run_pretrain
from transformers import AutoModel

from modeling_medclip import MedCLIPModel
from modeling_medclip.adapters import apply_adapters
from modeling_medclip.training.arguments import OptimizationArguments
from modeling_medclip.training.optim import parameter_groups


@pytest.mark.slow
def test_run_pretrain_with_peft_saves_and_resumes_only_the_adapter(tmp_path, shared_data):
    run_pretrain(tmp_path / "base", "--max_steps", "1")
    base_dir = tmp_path / "base" / "final"
    flags = ["--model_name_or_path", str(base_dir), "--peft", "lora", "--peft_rank", "4", "--save_steps", "2",
             "--eval_steps", "0"]
    run_pretrain(tmp_path / "adapted", *flags, "--max_steps", "2")
    final = tmp_path / "adapted" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert (final / "adapter_model.safetensors").stat().st_size < 0.2 * (base_dir / "model.safetensors").stat().st_size
    assert ModelCard.load(final / "README.md").data.base_model == str(base_dir)
    assert (tmp_path / "adapted" / "checkpoint-2" / "adapter_model.safetensors").is_file()

    base = AutoModel.from_pretrained(base_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base_dir), final).eval()
    inputs = dict(input_ids=torch.randint(1000, 2000, (2, 6)), pixel_values=torch.randn(2, 1, 32, 32))
    with torch.no_grad():
        assert (adapted(**inputs).logits_per_image - base(**inputs).logits_per_image).abs().max() > 1e-6

    # resume from the adapter checkpoint to step 3
    run_pretrain(tmp_path / "adapted", *flags, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    results = json.loads((tmp_path / "adapted" / "train_results.json").read_text())
    assert results["global_step"] == 3
    assert (tmp_path / "adapted" / "final" / "adapter_model.safetensors").is_file()


def test_heads_trained_with_an_adapter_get_the_head_learning_rate():
    model = apply_adapters(MedCLIPModel(tiny_config()), r=2, train_heads=True)
    groups = parameter_groups(model, OptimizationArguments(learning_rate=1e-4, head_learning_rate=1e-2))
    head_ids = {id(p) for group in groups if group["group_name"].startswith("head") for p in group["params"]}
    heads = [p for n, p in model.named_parameters() if p.requires_grad and "projection" in n]
    assert heads and {id(p) for p in heads} == head_ids
    assert sum(len(group["params"]) for group in groups) == sum(p.requires_grad for p in model.parameters())
