"""Tests of the pretraining package (`modeling_medclip/training/`), its checkpoints and `run_pretrain.py`.

The distributed test starts 2 real CPU processes (gloo) with `accelerate launch`; the loop tests train tiny towers on
the real covid-cxr images and notes of the shared data folder.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _train_worker import global_batch, reference_step, shard, tiny_model
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from hub_server import hub_server_fixture  # noqa: F401  (registers the `hub_server` fixture)
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from modeling_medclip.checkpointing import sorted_checkpoints, write_checkpoint
from modeling_medclip.training import (
    PRESETS,
    ContrastiveTrainer,
    OptimizationArguments,
    build_optimizer,
    build_parser,
    parameter_groups,
    parse_args,
    train,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("infonce", "convirt", "semantic")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator; Accelerate keeps process-wide singletons otherwise."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tiny_run_args(output_dir, *flags):
    """The `tiny` preset on the shared data, made even shorter."""
    return parse_args(
        ["--preset", "tiny", "--output_dir", str(output_dir), "--disable_tqdm", "--max_eval_samples", "8", *flags]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def test_no_arguments_is_the_cpu_demo_preset():
    args = parse_args([])
    assert args.training.max_steps == PRESETS["cpu-demo"]["max_steps"]
    assert args.model.vision_config == PRESETS["cpu-demo"]["vision_config"]
    assert args.training.output_dir == PRESETS["cpu-demo"]["output_dir"]


def test_precedence_defaults_preset_file_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"preset": "tiny", "learning_rate": 0.25, "max_steps": 7, "seed": 3}))
    args = parse_args([str(config), "--max_steps", "9"])
    assert args.training.learning_rate == 0.25  # file over preset
    assert args.training.max_steps == 9  # flag over file
    assert args.training.seed == 3
    assert args.model.image_size == PRESETS["tiny"]["image_size"]  # from the file's preset

    json_config = tmp_path / "run.json"
    json_config.write_text(json.dumps({"per_device_train_batch_size": 5}))
    args = parse_args(["--config", str(json_config), "--preset", "convirt"])
    assert args.training.per_device_train_batch_size == 5
    assert args.model.model_type == "convirt"
    assert args.training.learning_rate == PRESETS["convirt"]["learning_rate"]

    args = parse_args(["--preset", "none"])
    assert args.training.max_steps == OptimizationArguments.max_steps

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        parse_args([str(bad)])


def test_help_documents_every_flag():
    help_text = build_parser().format_help()
    for flag in (
        "output_dir", "max_steps", "num_train_epochs", "per_device_train_batch_size", "learning_rate", "seed",
        "save_steps", "save_total_limit", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_revision",
        "gradient_accumulation_steps", "mixed_precision", "gradient_checkpointing", "torch_compile", "warmup_steps",
        "weight_decay", "max_grad_norm", "eval_steps", "logging_steps", "report_to", "head_learning_rate",
        "accumulation_mode", "metric_for_best_model", "greater_is_better", "preset", "config",
    ):  # fmt: skip
        assert f"--{flag}" in help_text, flag
    helps = {}
    for action in build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help"
        assert action.help not in helps.values(), f"{action.option_strings} repeats the help of {helps}"
        helps[action.dest] = action.help
    assert "(default: None)" not in help_text
    for paragraph in help_text.split("\n  --"):
        assert " ".join(paragraph.split()).lower().count("default:") <= 1, paragraph
    for name in ("mimic_cxr", "chexpert", "nih_cxr14", "pediatric_pneumonia", "covid-cxr", "chexpert-5x200"):
        assert name in help_text, name


def test_parameter_groups_exclude_frozen_and_skip_decay_on_norms_biases_and_logit_scale():
    model = tiny_model("convirt")  # ConVIRT config: first text layer and embeddings frozen, fixed logit scale
    args = OptimizationArguments(output_dir="unused", learning_rate=1e-4, head_learning_rate=1e-3, weight_decay=0.1)
    groups = {group["group_name"]: group for group in parameter_groups(model, args)}
    names = {id(p): n for n, p in model.named_parameters()}
    in_optimizer = {names[id(p)] for group in groups.values() for p in group["params"]}
    assert not any(name.startswith(("text_model.embeddings", "text_model.encoder.layer.0.")) for name in in_optimizer)
    assert any(name.startswith("text_model.encoder.layer.1.") for name in in_optimizer)
    assert "logit_scale" not in in_optimizer  # not learnable in ConVIRT
    for name in in_optimizer:
        group = next(g for g in groups.values() if any(names[id(p)] == name for p in g["params"]))
        decays = group["weight_decay"] > 0
        assert decays != (name.endswith("bias") or "norm" in name.lower()), name
        assert group["lr"] == (1e-3 if name.startswith(("visual_projection", "text_projection")) else 1e-4), name

    medclip = tiny_model("semantic")
    groups = parameter_groups(medclip, args)
    scale_group = next(g for g in groups if any(p is medclip.logit_scale for p in g["params"]))
    assert scale_group["weight_decay"] == 0.0 and scale_group["lr"] == 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# The step: global-batch negatives across processes and across accumulated micro-batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    output = tmp_path / "result.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        str(REPO_ROOT / "tests" / "_train_worker.py"), str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(output.read_text())
    assert results["world_size"] == 2
    for loss_type in LOSSES:
        result = results[loss_type]
        assert result["largest_update"] > 1e-3, result  # the step did move the parameters
        assert result["max_difference"] < 1e-5, (loss_type, result)
        if loss_type != "convirt":  # the learnable temperature, used outside forward under DDP, got its update
            assert result["logit_scale_update"] > 1e-4, result


def _step_args(**overrides) -> OptimizationArguments:
    """The step settings of `_train_worker.py` (SGD, separate head LR, clipping)."""
    return OptimizationArguments(
        output_dir="unused", optim="sgd", learning_rate=0.5, head_learning_rate=2.0, max_grad_norm=1.0, **overrides
    )


def _one_process_trainer(model, **overrides):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=overrides.get("gradient_accumulation_steps", 1))
    args = _step_args(**overrides)
    return ContrastiveTrainer(accelerator, model, args, num_training_steps=1), args


def _max_difference(model_a, model_b) -> float:
    b = dict(model_b.named_parameters())
    return max((p - b[name]).abs().max().item() for name, p in model_a.named_parameters())


@pytest.mark.parametrize("loss_type", LOSSES)
def test_global_negatives_accumulation_matches_the_full_batch(loss_type):
    torch.manual_seed(0)
    model = tiny_model(loss_type)
    reference = reference_step(copy.deepcopy(model), global_batch(loss_type), _step_args())
    trainer, _ = _one_process_trainer(
        model, gradient_accumulation_steps=2, accumulation_mode="global_negatives"
    )
    batch = global_batch(loss_type)
    trainer.training_step([shard(batch, 0, 2), shard(batch, 1, 2)])
    assert _max_difference(trainer.unwrapped, reference) < 1e-5
    if loss_type != "convirt":  # the learnable temperature took exactly one full-batch step
        assert abs(trainer.unwrapped.logit_scale.item() - reference.logit_scale.item()) < 1e-6
        assert abs(trainer.unwrapped.logit_scale.item() - model.config.logit_scale_init_value) > 1e-4


def test_plain_accumulation_averages_the_micro_batch_losses():
    torch.manual_seed(0)
    model = tiny_model("infonce")
    reference, initial = copy.deepcopy(model), copy.deepcopy(model)
    trainer, args = _one_process_trainer(model, gradient_accumulation_steps=2, accumulation_mode="plain")
    batch = global_batch("infonce")
    halves = [shard(batch, 0, 2), shard(batch, 1, 2)]
    trainer.training_step(halves)

    optimizer = build_optimizer(reference, args)
    loss = sum(reference(**half, return_loss=True).loss for half in halves) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), args.max_grad_norm)
    optimizer.step()
    assert _max_difference(trainer.unwrapped, reference) < 1e-5
    # and it is NOT the full-batch update: the negatives of the other micro-batch are missing
    full = reference_step(initial, batch, args)
    assert _max_difference(trainer.unwrapped, full) > 1e-4


def test_logit_scale_is_clamped_after_the_step():
    torch.manual_seed(0)
    model = tiny_model("infonce")
    with torch.no_grad():
        model.logit_scale.fill_(4.7)  # above log(max_logit_scale) = log(100) = 4.605
    trainer, _ = _one_process_trainer(model)
    trainer.training_step([global_batch("infonce")])
    assert trainer.unwrapped.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-7


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, outputs
# ---------------------------------------------------------------------------------------------------------------------


class _FailingProcessor:
    """A processor whose save fails half-way, like a full disk."""

    def save_pretrained(self, folder):
        Path(folder, "partial.json").write_text("{")
        raise OSError("No space left on device")


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    torch.manual_seed(0)
    trainer, _ = _one_process_trainer(tiny_model("infonce"))
    common = {
        "model": trainer.unwrapped, "optimizer": trainer.optimizer, "scheduler": trainer.scheduler,
        "data_state": {"epoch": 0}, "trainer_state": {"global_step": 1},
    }  # fmt: skip
    good = write_checkpoint(trainer.accelerator, tmp_path, 1, processor=None, **common)
    before = load_file(good / "model.safetensors")
    trainer.training_step([global_batch("infonce")])
    with pytest.raises(OSError, match="No space"):
        write_checkpoint(trainer.accelerator, tmp_path, 2, processor=_FailingProcessor(), **common)
    assert sorted_checkpoints(tmp_path) == [good]
    assert not (tmp_path / "checkpoint-2").exists()
    after = load_file(good / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, shared_data):
    # constant LR so that a run told to stop at step 2 and one told to go on to step 4 share the schedule
    flags = ["--lr_scheduler_type", "constant", "--eval_steps", "0", "--save_steps", "2", "--seed", "7"]
    straight = train(tiny_run_args(tmp_path / "straight", "--max_steps", "4", *flags))
    AcceleratorState._reset_state(reset_partial_state=True)
    first_half = train(tiny_run_args(tmp_path / "resumed", "--max_steps", "2", *flags))
    assert first_half.global_step == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = train(
        tiny_run_args(tmp_path / "resumed", "--max_steps", "4", "--resume_from_checkpoint", "latest", *flags)
    )
    assert resumed.global_step == 4
    a = load_file(straight.final_model_dir / "model.safetensors")
    b = load_file(resumed.final_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    halfway = load_file(tmp_path / "straight" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(halfway[k], a[k]) for k in a)  # steps 3 and 4 changed the weights
    steps = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    losses = [(entry["step"], entry["loss"]) for entry in steps if "loss" in entry]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    straight_losses = [
        json.loads(line)["loss"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]  # fmt: skip
    assert [loss for _, loss in losses] == pytest.approx(straight_losses, abs=1e-6)


@pytest.mark.slow
def test_push_to_hub_uploads_checkpoints_and_the_final_model(hub_server, tmp_path, shared_data):
    hub_server.fail_next(1, status=503, route="commit")  # a transient Hub error: retried, the run goes on
    result = train(
        tiny_run_args(
            tmp_path / "run", "--max_steps", "2", "--save_steps", "1", "--save_total_limit", "1", "--eval_steps", "0",
            "--push_to_hub", "--hub_model_id", "user/tiny-medclip", "--hub_revision", "experiment",
        )  # fmt: skip
    )
    assert result.hub_errors == []
    assert [p.name for p in sorted_checkpoints(tmp_path / "run")] == ["checkpoint-2"]  # rotated locally
    from huggingface_hub import HfApi

    files = set(HfApi().list_repo_files("user/tiny-medclip", revision="experiment"))
    assert {"checkpoint-1/model.safetensors", "checkpoint-2/optimizer.pt", "model.safetensors", "README.md"} <= files
    model = AutoModel.from_pretrained("user/tiny-medclip", revision="experiment")
    local = load_file(result.final_model_dir / "model.safetensors")
    hub = model.state_dict()
    assert all(torch.equal(local[name], hub[name]) for name in local)
    processor = AutoProcessor.from_pretrained("user/tiny-medclip", revision="experiment")
    assert processor.tokenizer("no effusion")["input_ids"]


@pytest.mark.slow
def test_run_pretrain_with_two_processes_end_to_end(tmp_path, shared_data):
    """The README's launch command: `accelerate launch --multi_gpu --num_processes 2 run_pretrain.py --preset tiny`."""
    output_dir = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "run_pretrain.py", "--preset", "tiny", "--output_dir", str(output_dir), "--disable_tqdm",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert completed.returncode == 0, completed.stderr[-4000:]
    log = completed.stdout + completed.stderr
    for noise in ("Writing model shards", "Loading weights", "FutureWarning", "Traceback"):
        assert noise not in log, noise
    assert completed.stdout.count("| held-out metric (95% CI) | before training | after 4 steps |") == 1  # printed by rank 0 only
    entries = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [entry["loss"] for entry in entries if "loss" in entry]
    assert len(losses) == PRESETS["tiny"]["max_steps"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any("eval_loss" in entry for entry in entries)
    assert all(entry["skipped_images"] == 0 for entry in entries if "loss" in entry)
    assert [p.name for p in sorted_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4"]
    checkpoint = output_dir / "checkpoint-4"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state_0.pt",
                 "rng_state_1.pt", "data_state_1.json", "trainer_state.json", "tokenizer.json"):  # fmt: skip
        assert (checkpoint / name).is_file(), name
    for folder in (output_dir / "final", output_dir / "best"):
        model = AutoModel.from_pretrained(folder)
        processor = AutoProcessor.from_pretrained(folder)
        assert type(model).__name__ == "MedCLIPModel"
        assert processor.image_processor.crop_size["height"] == PRESETS["tiny"]["image_size"]
    card = (output_dir / "final" / "README.md").read_text()
    assert card.startswith("---") and "\n# run\n" in card  # named after the run's output folder
    assert "| held-out metric (95% CI) | before training | after 4 steps |" in card
    held_out = json.loads((output_dir / "eval_splits" / "covid-cxr.json").read_text())
    assert held_out["patient_ids"] and len(held_out["image_ids"]) > 0
    assert json.loads((output_dir / "train_results.json").read_text())["skipped_images"] == 0


def test_a_non_empty_output_dir_is_refused_unless_overwritten(tmp_path, shared_data):
    run = tmp_path / "run"
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (run / "final").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 3, "loss": 1.0}\n')
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        train(tiny_run_args(run, "--max_steps", "1"))
    assert (run / "checkpoint-3").is_dir()  # nothing was touched
    AcceleratorState._reset_state(reset_partial_state=True)
    result = train(tiny_run_args(run, "--max_steps", "1", "--save_steps", "0", "--overwrite_output_dir"))
    assert result.global_step == 1
    assert not (run / "checkpoint-3").exists() and (run / "notes.txt").read_text() == "mine"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1  # the old run's metrics are gone


def test_unreadable_images_are_counted_logged_and_saved(tmp_path, shared_data):
    import numpy as np
    import PIL.Image

    for index in range(6):
        for name in ("normal", "pneumonia"):
            path = tmp_path / "images" / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(np.full((40, 40), 30 * index, dtype=np.uint8)).save(path)
    (tmp_path / "images" / "normal" / "broken.png").write_bytes(b"not a png")
    result = train(tiny_run_args(
        tmp_path / "run", "--image_dataset", f"image_folder={tmp_path / 'images'}", "--batching", "decoupled",
        "--loss_type", "semantic", "--text_dataset", "iu_xray", "--per_device_train_batch_size", "13",
        "--max_steps", "2", "--save_steps", "1", "--eval_steps", "0",
    ))  # fmt: skip
    assert result.metrics["skipped_images"] == 2  # the broken file, once per epoch (13 images per epoch)
    entries = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["skipped_images"] for entry in entries if "loss" in entry] == [1, 2]
    assert json.loads((tmp_path / "run" / "train_results.json").read_text())["skipped_images"] == 2
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["skipped_images"] == 2  # a resumed run goes on counting


def test_mixed_precision_defaults_to_the_accelerate_launch_choice(monkeypatch):
    from modeling_medclip.training.loop import build_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse_args(["--preset", "tiny"]).training.mixed_precision is None
    assert build_accelerator(parse_args(["--preset", "tiny"]).training).mixed_precision == "bf16"
    AcceleratorState._reset_state(reset_partial_state=True)
    assert build_accelerator(parse_args(["--preset", "tiny", "--mixed_precision", "no"]).training).mixed_precision == "no"


def test_one_pretrained_tower_and_one_from_a_named_config(tmp_path, tokenizer_dir):
    from transformers import BertConfig, BertModel

    from modeling_medclip.training import ModelArguments, build_model_and_processor

    torch.manual_seed(0)
    text = BertModel(BertConfig(vocab_size=28996, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=37))  # fmt: skip
    text.save_pretrained(tmp_path / "text")
    model, _ = build_model_and_processor(
        ModelArguments(text_model_name_or_path=str(tmp_path / "text"), vision_config="tiny-resnet",
                       tokenizer_name_or_path=str(tokenizer_dir), image_size=32, projection_dim=8)
    )  # fmt: skip
    assert model.config.vision_config.model_type == "resnet" and model.config.projection_dim == 8
    assert model.text_model.pooler is None
    torch.testing.assert_close(
        model.text_model.embeddings.word_embeddings.weight, text.embeddings.word_embeddings.weight
    )


def test_a_loaded_model_keeps_its_frozen_layers_frozen(tmp_path, tokenizer_dir):
    """`from_pretrained` loads every parameter trainable; resuming must optimise the same parameters as before."""
    from modeling_medclip.training import ModelArguments, build_model_and_processor

    torch.manual_seed(0)
    model = tiny_model("convirt")  # first text layer frozen, fixed logit scale
    model.save_pretrained(tmp_path / "convirt")
    loaded, _ = build_model_and_processor(
        ModelArguments(model_type="convirt", model_name_or_path=str(tmp_path / "convirt"),
                       tokenizer_name_or_path=str(tokenizer_dir), image_size=32)
    )  # fmt: skip
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {name for name, p in loaded.named_parameters() if not p.requires_grad}
