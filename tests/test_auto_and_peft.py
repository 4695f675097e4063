"""Saved folders load through the Auto classes, in a fresh process through remote code, and adapt with PEFT."""

import json
import subprocess
import sys
import textwrap

import torch
from conftest import tiny_config
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor


def _save_model_and_processor(folder, tokenizer_dir):
    torch.manual_seed(0)
    model = MedCLIPModel(tiny_config()).eval()
    processor = MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def test_saved_folder_carries_code_and_every_auto_class(tmp_path, tokenizer_dir):
    _save_model_and_processor(tmp_path, tokenizer_dir)
    for name in ("configuration_medclip.py", "modeling_medclip.py", "towers.py", "losses.py",
                 "processing_medclip.py", "image_processing_medclip.py"):
        assert (tmp_path / name).exists(), name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_medclip.MedCLIPConfig",
        "AutoModel": "modeling_medclip.MedCLIPModel",
        "AutoModelForZeroShotImageClassification": "modeling_medclip.MedCLIPModel",
        "AutoModelForImageClassification": "modeling_medclip.MedCLIPForImageClassification",
    }
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, MedCLIPProcessor)
    assert isinstance(processor.image_processor, MedCLIPImageProcessor)


def test_fresh_process_loads_with_trust_remote_code_and_gives_identical_outputs(
    tmp_path, tokenizer_dir, covid_cxr_dir
):
    model, processor = _save_model_and_processor(tmp_path / "model", tokenizer_dir)
    image_path = covid_cxr_dir / "images" / "000001.jpg"
    texts = ["No pleural effusion or pneumothorax.", "Mild cardiomegaly with patchy bibasilar opacities."]
    inputs = processor(text=texts, images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    script = textwrap.dedent(
        f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert "modeling_medclip" not in sys.modules, "the package must not be imported"
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(text={texts!r}, images=[Image.open({str(image_path)!r})], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits_per_image
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits, expected)


def test_lora_adapter_on_the_text_tower_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    base = MedCLIPModel(tiny_config()).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    input_ids = torch.randint(1000, 20000, (4, 8))
    pixel_values = torch.randn(4, 1, 32, 32)
    labels = torch.eye(4, 14)
    for _ in range(2):
        loss = model(input_ids=input_ids, pixel_values=pixel_values, image_labels=labels, text_labels=labels,
                     return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        adapted = model(input_ids=input_ids, pixel_values=pixel_values).logits_per_image

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    fresh = MedCLIPModel(tiny_config())
    fresh.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(fresh.eval(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids, pixel_values=pixel_values).logits_per_image, adapted)
        original = MedCLIPModel(tiny_config())
        original.load_state_dict(base_state)
        assert not torch.allclose(original.eval()(input_ids=input_ids, pixel_values=pixel_values).logits_per_image,
                                  adapted)
