"""Model cards: written from the template shipped as package data (also from a wheel install), and evaluation results
merged into an existing card by `run_eval.py`."""

import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch
from conftest import REPO_ROOT, tiny_config
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.model_card import merge_evaluation, template_path, write_model_card


def test_the_template_is_package_data():
    assert template_path().parent.name == "modeling_medclip" and template_path().is_file()


def test_merge_keeps_the_training_section_and_replaces_only_what_it_evaluates(tmp_path):
    model = MedCLIPModel(tiny_config())
    write_model_card(tmp_path, model, {"covid-cxr": {"zero_shot_macro_auc": 0.5, "zero_shot_accuracy": 0.25}},
                     results_table="| metric | before training | after 4 steps |\n|---|---:|---:|\n| auc | 0.4 | 0.5 |",
                     training_summary="Pretrained for 4 steps.")  # fmt: skip
    card = tmp_path / "README.md"
    merge_evaluation(card, {"nih-cxr14": {"zero_shot_macro_auc": 0.61}}, title="zero-shot (nih-cxr14)",
                     results_table="| metric | model |\n|---|---:|\n| nih-cxr14/zero_shot_macro_auc | 0.610 |")  # fmt: skip
    merge_evaluation(card, {"covid-cxr": {"zero_shot_macro_auc": 0.7}}, title="zero-shot (covid-cxr)",
                     results_table="| metric | model |\n|---|---:|\n| covid-cxr/zero_shot_macro_auc | 0.700 |")  # fmt: skip
    merge_evaluation(card, {"covid-cxr": {"zero_shot_macro_auc": 0.8}}, title="zero-shot (covid-cxr)",
                     results_table="| metric | model |\n|---|---:|\n| covid-cxr/zero_shot_macro_auc | 0.800 |")  # fmt: skip
    loaded = ModelCard.load(card)
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in loaded.data.eval_results}
    assert results == {("nih-cxr14", "zero_shot_macro_auc"): 0.61, ("covid-cxr", "zero_shot_macro_auc"): 0.8}
    text = loaded.text
    assert "Pretrained for 4 steps." in text and "| metric | before training | after 4 steps |" in text
    assert text.count("### zero-shot (covid-cxr)") == 1 and "0.800" in text and "0.700" not in text
    assert "### zero-shot (nih-cxr14)" in text
    assert text.index("### zero-shot (nih-cxr14)") < text.index("## How to use")  # inside the Evaluation section
    assert "not** a medical device" in text


def test_run_eval_merges_into_the_training_runs_card(tmp_path, tokenizer_dir, covid_cxr_dir):
    sys.path.insert(0, str(REPO_ROOT))
    import run_eval

    torch.manual_seed(0)
    model = MedCLIPModel(tiny_config())
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir)).save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    write_model_card(tmp_path, model, {"covid-cxr": {"zero_shot_accuracy": 0.1}}, training_summary="Pretrained here.",
                     results_table="| metric | before training | after 4 steps |\n|---|---:|---:|")  # fmt: skip
    results = run_eval.main(["--task", "zero-shot", "--model_name_or_path", str(tmp_path), "--eval_tasks",
                             f"covid-cxr={covid_cxr_dir}", "--prompts_per_class", "2", "--max_eval_images", "12",
                             "--n_resamples", "50", "--output_dir", str(tmp_path / "eval"),
                             "--update_model_card", str(tmp_path)])  # fmt: skip
    card = ModelCard.load(tmp_path / "README.md")
    assert "Pretrained here." in card.text and "| metric | before training | after 4 steps |" in card.text
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results if r.dataset_name == "covid-cxr"}
    evaluated = results["covid-cxr"][tmp_path.name]
    expected = {f"zero-shot_{name}": value.value for name, value in evaluated.items() if math.isfinite(value.value)}
    assert "zero-shot_accuracy" in expected and metrics == pytest.approx(expected, abs=1e-4)  # the old entry replaced


@pytest.mark.slow
def test_a_wheel_install_writes_model_cards(tmp_path):
    """The template travels in the wheel: build it, install it (no dependencies) into a fresh venv, write a card."""
    source = tmp_path / "source"
    for name in ("modeling_medclip", "dataset_scripts"):
        shutil.copytree(REPO_ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)  # fmt: skip
    wheel = next((tmp_path / "dist").glob("medclip_hf-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    # the dependencies come from this environment's site-packages (a path entry: its editable-install hook is not run)
    (tmp_path / "venv_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shutil.move(tmp_path / "venv_site.pth", f"{site}/zz_dependencies.pth")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    script = textwrap.dedent(
        """
        import sys
        import modeling_medclip
        from modeling_medclip import MedCLIPConfig, MedCLIPModel
        from modeling_medclip.model_card import write_model_card
        from transformers import BertConfig, ResNetConfig

        assert modeling_medclip.__file__.startswith(sys.argv[1]), modeling_medclip.__file__
        config = MedCLIPConfig(vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]),
                               text_config=BertConfig(vocab_size=99, hidden_size=16, num_hidden_layers=1,
                                                      num_attention_heads=2, intermediate_size=20))
        path = write_model_card(sys.argv[2], MedCLIPModel(config), {"task": {"zero_shot_accuracy": 0.5}})
        print(open(path).read())
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}  # not this source tree
    completed = subprocess.run([str(python), "-c", script, site, str(tmp_path)], cwd=tmp_path, capture_output=True,
                               text=True, env=env)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "not** a medical device" in completed.stdout and "zero_shot_accuracy" in completed.stdout
