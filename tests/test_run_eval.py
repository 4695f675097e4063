"""run_eval.py end to end on the real shared data with a tiny model against `random-init`: every protocol, the
output files, the model card's model-index and the upload to the local Hub server."""

import json
import sys

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from PIL import Image
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor

sys.path.insert(0, str(REPO_ROOT))
import run_eval  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--n_resamples", "50", "--num_workers", "1", "--batch_size", "16"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_dir):
    """A tiny MedCLIP folder (64 px images), weights seeded differently from `random-init`'s seed 0."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("models") / "tiny-medclip"
    MedCLIPModel(tiny_config()).save_pretrained(folder)
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size=64)
    MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(folder)
    return folder


def _is_png(path) -> bool:
    with Image.open(path) as image:
        return path.read_bytes()[:8] == PNG_SIGNATURE and image.width > 200


@pytest.mark.slow
def test_zero_shot_on_three_corpora_side_by_side(model_dir, tmp_path, shared_data):
    out = tmp_path / "zero-shot"
    results = run_eval.main([
        "--task", "zero-shot", "--model_name_or_path", str(model_dir), "random-init",
        "--eval_tasks", "pediatric-pneumonia", "nih-cxr14", "covid-cxr", "--max_eval_images", "60",
        "--prompts_per_class", "2", "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    assert list(results) == ["pediatric-pneumonia", "pediatric-pneumonia-bacterial-viral", "nih-cxr14",
                             "nih-cxr14-normal", "covid-cxr"]  # fmt: skip
    for by_model in results.values():
        assert list(by_model) == ["tiny-medclip", "random-init"]
    assert results["nih-cxr14"]["tiny-medclip"]["macro_auc"].value != results["nih-cxr14"]["random-init"]["macro_auc"].value
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["model_name_or_path"] == [str(model_dir), "random-init"]
    assert saved["config"]["n_resamples"] == 50 and saved["config"]["bootstrap_seed"] == 0
    assert {"torch", "transformers", "evaluate", "scikit-learn"} <= set(saved["versions"])
    auc = saved["results"]["pediatric-pneumonia"]["random-init"]["macro_auc"]
    assert auc["low"] <= auc["value"] <= auc["high"] and auc["n_resamples"] + auc["n_skipped"] == 50
    table = (out / "results.md").read_text()
    assert "| metric | tiny-medclip | random-init |" in table and "### nih-cxr14 (60 images)" in table
    for name in ("roc-pediatric-pneumonia.png", "roc-nih-cxr14.png", "confusion-covid-cxr-tiny-medclip.png"):
        assert _is_png(out / "plots" / name), name
    split = json.loads((out / "eval_splits" / "nih-cxr14.json").read_text())
    assert len(split["image_ids"]) == 60


@pytest.mark.slow
def test_retrieval_on_three_corpora(model_dir, tmp_path, shared_data):
    out = tmp_path / "retrieval"
    results = run_eval.main([
        "--task", "retrieval", "--model_name_or_path", str(model_dir),
        "--eval_tasks", "pediatric-pneumonia", "nih-cxr14", "covid-cxr", "--max_eval_images", "60",
        "--retrieval_texts", str(shared_data / "chexpert-labeler-iu" / "sentences-dev.csv"),
        "--max_retrieval_texts", "200", "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    pneumonia = results["pediatric-pneumonia"]["tiny-medclip"]
    for direction in ("image_to_image", "image_to_text", "text_to_image"):
        for metric in ("precision@1", "precision@5", "precision@10", "precision@50", "recall@50", "mrr"):
            ci = pneumonia[f"{direction}/{metric}"]
            assert 0.0 <= ci.low <= ci.value <= ci.high <= 1.0, (direction, metric)
    # covid-cxr retrieves among its own clinical notes
    assert "image_to_text/precision@1" in results["covid-cxr"]["tiny-medclip"]
    assert _is_png(out / "plots" / "precision_at_k-nih-cxr14.png")
    assert _is_png(out / "plots" / "retrieval-examples-pediatric-pneumonia.png")


@pytest.mark.slow
def test_linear_probe_at_10_and_100_percent_with_the_model_card(model_dir, tmp_path, shared_data):
    out = tmp_path / "probe"
    card_dir = tmp_path / "card"
    results = run_eval.main([
        "--task", "linear-probe", "--model_name_or_path", str(model_dir), "random-init",
        "--eval_tasks", "pediatric-pneumonia", "--label_fractions", "0.1", "1.0", "--max_train_images", "150",
        "--max_eval_images", "60", "--output_dir", str(out), "--update_model_card", str(card_dir), *FAST,
    ])  # fmt: skip
    probe = results["pediatric-pneumonia"]["tiny-medclip"]
    assert [f.fraction for f in probe.fractions] == [0.1, 1.0]
    assert [len(f.runs) for f in probe.fractions] == [3, 1]
    table = (out / "results.md").read_text()
    assert "| labels (test macro AUC) | tiny-medclip | random-init |" in table
    assert "| 10% |" in table and "| 100% |" in table
    draws = json.loads((out / "eval_splits" / "pediatric-pneumonia-linear-probe-tiny-medclip.json").read_text())
    assert set(draws["fit"]).isdisjoint(draws["validation"]) and len(draws["label_draws"]) == 4
    saved = json.loads((out / "results.json").read_text())["results"]["pediatric-pneumonia"]["random-init"]
    assert "train_ids" not in saved["fractions"][0]["runs"][0]
    assert _is_png(out / "plots" / "label_efficiency-pediatric-pneumonia.png")

    card = ModelCard.load(card_dir / "README.md")
    entries = {(e.task_type, e.dataset_name, e.metric_type): e.metric_value for e in card.data.eval_results}
    key = ("image-classification", "pediatric-pneumonia", "linear-probe_macro_auc@100%")
    assert entries[key] == pytest.approx(probe.fractions[1].metrics["macro_auc"].value, abs=1e-4)
    assert "not** a medical device" in card.text and "Training data" in card.text
    assert "eval_plots/label_efficiency-pediatric-pneumonia.png" in card.text
    assert _is_png(card_dir / "eval_plots" / "label_efficiency-pediatric-pneumonia.png")

    # a zero-shot run merged into the same card keeps the probe's results beside its own
    run_eval.main([
        "--task", "zero-shot", "--model_name_or_path", str(model_dir), "--eval_tasks", "pediatric-pneumonia",
        "--max_eval_images", "40", "--prompts_per_class", "2", "--output_dir", str(tmp_path / "zs"),
        "--update_model_card", str(card_dir), *FAST,
    ])  # fmt: skip
    card = ModelCard.load(card_dir / "README.md")
    task_types = {e.task_type for e in card.data.eval_results}
    assert task_types == {"image-classification", "zero-shot-image-classification"}
    assert "### linear-probe (pediatric-pneumonia" in card.text and "### zero-shot (pediatric-pneumonia" in card.text


@pytest.mark.slow
def test_one_epoch_fine_tune(model_dir, tmp_path, shared_data):
    out = tmp_path / "fine-tune"
    results = run_eval.main([
        "--task", "fine-tune", "--model_name_or_path", str(model_dir), "random-init",
        "--eval_tasks", "pediatric-pneumonia", "--label_fractions", "1.0", "--fine_tune_epochs", "1",
        "--max_train_images", "64", "--max_eval_images", "40", "--output_dir", str(out), *FAST,
    ])  # fmt: skip
    for name in ("tiny-medclip", "random-init"):
        (full,) = results["pediatric-pneumonia"][name].fractions
        assert full.runs[0].num_train_images > 0
        assert 0.0 <= full.metrics["macro_auc"].low <= full.metrics["macro_auc"].high <= 1.0
    assert "| 100% |" in (out / "results.md").read_text()


def test_fine_tune_with_lora_trains_only_the_adapter_and_the_head(model_dir, tmp_path, shared_data):
    from peft import PeftModel
    from transformers import HfArgumentParser

    argv = ["--task", "fine-tune", "--model_name_or_path", str(model_dir), "--eval_tasks", "pediatric-pneumonia",
            "--peft", "lora", "--peft_rank", "4"]  # fmt: skip
    (args,) = HfArgumentParser(run_eval.EvalArguments).parse_args_into_dataclasses(args=argv)
    classifier = run_eval.classifier_builder(args, "tiny-medclip", 2, multilabel=False)(0)
    assert isinstance(classifier, PeftModel)
    trainable = {name for name, parameter in classifier.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    out = tmp_path / "fine-tune-lora"
    results = run_eval.main([*argv, "--label_fractions", "1.0", "--fine_tune_epochs", "1", "--max_train_images", "64",
                             "--max_eval_images", "40", "--output_dir", str(out), *FAST])  # fmt: skip
    (full,) = results["pediatric-pneumonia"]["tiny-medclip"].fractions
    assert full.runs[0].num_train_images > 0 and 0.0 <= full.metrics["macro_auc"].value <= 1.0


def test_labeler_agreement_task(tmp_path, shared_data):
    reference = pd.read_csv(shared_data / "chexpert-labeler-iu" / "reports-dev.csv").head(80)
    reference.to_csv(tmp_path / "reference.csv", index=False)
    result = run_eval.main(["--task", "labeler", "--reference_labels", str(tmp_path / "reference.csv"),
                            "--output_dir", str(tmp_path / "labeler"), "--n_resamples", "50"])  # fmt: skip
    assert 60 < result["num_texts"] <= 80
    table = (tmp_path / "labeler" / "results.md").read_text()
    assert "| metric | positive | negative | uncertain |" in table
    saved = json.loads((tmp_path / "labeler" / "results.json").read_text())
    assert saved["results"]["labeler"]["intervals"]["micro_f1/negative"]["value"] == pytest.approx(
        result["metrics"]["micro"]["negative"]["f1"]
    )


def test_push_to_hub_uploads_the_card_and_plots(model_dir, tmp_path, hub_server):
    card_dir = tmp_path / "card"
    repo_id = f"{hub_server.user}/tiny-medclip-eval"
    run_eval.main([
        "--task", "zero-shot", "--model_name_or_path", str(model_dir), "--eval_tasks", "pediatric-pneumonia",
        "--max_eval_images", "30", "--prompts_per_class", "2", "--output_dir", str(tmp_path / "out"),
        "--update_model_card", str(card_dir), "--push_to_hub", "--hub_model_id", repo_id, *FAST,
    ])  # fmt: skip
    files = HfApi().list_repo_files(repo_id)
    assert "README.md" in files and "eval_plots/roc-pediatric-pneumonia.png" in files
    card = ModelCard.load(hf_hub_download(repo_id, "README.md"))
    assert {e.dataset_name for e in card.data.eval_results} == {"pediatric-pneumonia",
                                                                 "pediatric-pneumonia-bacterial-viral"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one saved model"):
        run_eval.main(["--task", "zero-shot", "--model_name_or_path", "random-init"])
    with pytest.raises(ValueError, match="--update_model_card"):
        run_eval.main(["--task", "labeler", "--push_to_hub"])
    with pytest.raises(ValueError, match="same column name twice"):
        run_eval.main(["--task", "zero-shot", "--model_name_or_path", "a/final", "b/final"])


def test_tasks_without_a_path_read_the_folder_of_medclip_shared_data(model_dir, covid_cxr_dir, tmp_path, monkeypatch):
    from dataset_scripts.tasks import get_task

    shared = tmp_path / "shared"
    (shared / "covid-cxr").mkdir(parents=True)
    pd.read_csv(covid_cxr_dir / "metadata.csv", keep_default_na=False).iloc[:60].to_csv(
        shared / "covid-cxr" / "metadata.csv", index=False
    )
    (shared / "covid-cxr" / "images").symlink_to(covid_cxr_dir / "images")
    monkeypatch.setenv("MEDCLIP_SHARED_DATA", str(shared))
    out = tmp_path / "eval"
    run_eval.main(["--task", "zero-shot", "--model_name_or_path", str(model_dir), "--eval_tasks", "covid-cxr",
                   "--prompts_per_class", "2", "--output_dir", str(out), *FAST])  # fmt: skip
    split = json.loads((out / "eval_splits" / "covid-cxr.json").read_text())
    assert len(split["image_ids"]) == len(get_task("covid-cxr").split(shared / "covid-cxr").images) < 60
    monkeypatch.setenv("MEDCLIP_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="empty"):
        run_eval.main(["--task", "zero-shot", "--model_name_or_path", str(model_dir), "--eval_tasks", "covid-cxr",
                       "--output_dir", str(out)])  # fmt: skip
