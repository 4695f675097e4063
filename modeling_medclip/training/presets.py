"""Named runs: overrides of the argument defaults, by field name. `cpu-demo` is what `python run_pretrain.py` runs."""

from typing import Any

import torch

from ..protocols import bf16_supported

_PAPER_TOWERS = {"text_model_name_or_path": "emilyalsentzer/Bio_ClinicalBERT"}
# MedCLIP (Wang et al. 2022): decoupled batches of 100, lr 5e-5, weight decay 1e-4, 10 epochs, warmup.
_MEDCLIP_PAPER = {
    **_PAPER_TOWERS,
    "model_type": "medclip",
    "batching": "decoupled",
    "augmentation": "medclip",
    "per_device_train_batch_size": 100,
    "learning_rate": 5e-5,
    "weight_decay": 1e-4,
    "num_train_epochs": 10,
    "warmup_steps": 100,
}
PRESETS: dict[str, dict[str, Any]] = {
    # ConVIRT (Zhang et al. 2020): ResNet-50 + ClinicalBERT, paired batches of 32, Adam 1e-4, weight decay 1e-6.
    "convirt": {
        **_PAPER_TOWERS,
        "model_type": "convirt",
        "vision_model_name_or_path": "microsoft/resnet-50",
        "batching": "paired",
        "augmentation": "convirt",
        "per_device_train_batch_size": 32,
        "learning_rate": 1e-4,
        "weight_decay": 1e-6,
        "num_train_epochs": 100,
        "lr_scheduler_type": "constant",
        "output_dir": "outputs/convirt",
    },
    # MedCLIP with either of its paper's vision towers.
    "medclip-resnet": {
        **_MEDCLIP_PAPER,
        "vision_model_name_or_path": "microsoft/resnet-50",
        "output_dir": "outputs/medclip-resnet",
    },
    "medclip-swin": {
        **_MEDCLIP_PAPER,
        "vision_model_name_or_path": "microsoft/swin-tiny-patch4-window7-224",
        "output_dir": "outputs/medclip-swin",
    },
    # The embedded default: MedCLIP's decoupled training with the semantic matching loss on labelled images without
    # reports (the training patients of pediatric-pneumonia-cxr and nih-cxr14-1000) and the IU report sentences,
    # with what the recipe search (benchmarks/recipe_search.py, on a validation split of the training patients)
    # found to train: L2-normalised label vectors at scale 10 (MedCLIP's binary vectors at scale 1 give nearly
    # uniform targets), texts drawn by the image batch's labels, small random towers at 96 px, 800 steps at a
    # learning rate of 1e-3 (3e-3 for the heads), bf16 where the CPU runs it natively. A few minutes on 2 CPU cores;
    # zero-shot results before / after with patient-bootstrap CIs.
    "cpu-demo": {
        "model_type": "medclip",
        "vision_config": "small-resnet",
        "text_config": "small-bert",
        "projection_dim": 64,
        "image_size": 96,
        "max_length": 64,
        "label_similarity_scale": 10.0,
        "normalize_label_vectors": True,
        "batching": "decoupled",
        "text_sampling": "label_matched",
        "image_dataset": ["pediatric_pneumonia", "nih_cxr14"],
        "text_dataset": ["iu_xray"],
        "eval_tasks": ["pediatric-pneumonia", "nih-cxr14", "covid-cxr"],
        "augmentation": "medclip",
        "shuffle_buffer_size": 512,
        "per_device_train_batch_size": 32,
        "max_steps": 800,
        "learning_rate": 1e-3,
        "head_learning_rate": 3e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 15,
        "mixed_precision": "bf16" if bf16_supported(torch.device("cpu")) else "no",
        "logging_steps": 10,
        "save_steps": 200,
        "save_total_limit": 1,
        "output_dir": "outputs/cpu-demo",
    },
    # Seconds-long runs for tests: tiny towers, 32-pixel images, covid-cxr images with their notes (paired).
    "tiny": {
        "model_type": "medclip",
        "vision_config": "tiny-resnet",
        "text_config": "tiny-bert",
        "projection_dim": 16,
        "image_size": 32,
        "max_length": 32,
        "batching": "paired",
        "image_dataset": ["covid_cxr"],
        "eval_tasks": ["covid-cxr"],
        "augmentation": "medclip",
        "per_device_train_batch_size": 8,
        "shuffle_buffer_size": 32,
        "max_steps": 4,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "eval_steps": 2,
        "save_steps": 2,
        "max_eval_samples": 16,
        "per_device_eval_batch_size": 8,
        "output_dir": "outputs/tiny",
    },
}
DEFAULT_PRESET = "cpu-demo"
