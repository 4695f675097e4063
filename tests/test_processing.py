"""MedCLIPProcessor with the real Bio_ClinicalBERT tokenizer and real X-rays."""

import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPProcessor


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))


def test_real_tokenizer_knows_radiology_words(processor):
    tokenizer = processor.tokenizer
    assert tokenizer.is_fast and tokenizer.vocab_size == 28996
    ids = tokenizer("Small left pleural effusion with bibasilar atelectasis.")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) > 5


def test_processor_truncates_to_77_tokens_and_pads_to_the_longest(processor):
    long_report = " ".join(["The lungs are clear without focal consolidation."] * 30)
    inputs = processor(text=[long_report, "No effusion."], return_tensors="pt")
    assert inputs["input_ids"].shape == (2, 77)
    assert inputs["attention_mask"][1].sum() < 77
    assert processor(text=["No effusion."], return_tensors="pt")["input_ids"].shape[1] < 10
    assert processor(text=[long_report], max_length=32, return_tensors="pt")["input_ids"].shape == (1, 32)


def test_processor_gives_images_and_texts_together(processor, covid_cxr_dir):
    image = Image.open(covid_cxr_dir / "images" / "000001.jpg")
    inputs = processor(text=["cardiomegaly"], images=[image, image], return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 1, 224, 224)
    assert inputs["input_ids"].shape[0] == 1


@pytest.mark.parametrize("text", ["", "   ", ["fine", ""]])
def test_empty_text_is_a_clear_error(processor, text):
    with pytest.raises(ValueError, match="empty"):
        processor(text=text, return_tensors="pt")


def test_processor_roundtrip_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, MedCLIPProcessor)
    text = "Stable cardiomediastinal silhouette."
    assert loaded(text=[text])["input_ids"] == processor(text=[text])["input_ids"]
