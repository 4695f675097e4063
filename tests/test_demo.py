"""The web demo's logic (modeling_medclip.demo) on a tiny model, real X-rays and real IU report sentences."""

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_config
from test_image_processing import write_dicom
from transformers import AutoTokenizer

from modeling_medclip import MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor

Figure = pytest.importorskip("matplotlib.figure", reason="the demo needs matplotlib: pip install medclip-hf[demo]").Figure
from modeling_medclip.demo import (  # noqa: E402
    CUSTOM_LABELS,
    MAX_CACHED_CLASSIFIERS,
    UploadError,
    XrayDemo,
    cached_text_index,
    model_fingerprint,
    parse_labels,
    read_upload,
    score_chart,
)
from modeling_medclip.labeler import CHEXPERT_CLASSES, CheXpertLabeler  # noqa: E402
from modeling_medclip.prompts import generate_prompts  # noqa: E402
from modeling_medclip.zero_shot import ZeroShotClassifier  # noqa: E402

MAX_BYTES = 2**20
REPORT = "Mild cardiomegaly. No pleural effusion or pneumothorax. Possible left basilar atelectasis."


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MedCLIPModel(tiny_config()).eval()


@pytest.fixture(scope="module")
def xray_path(covid_cxr_dir):
    return covid_cxr_dir / "images" / "000001-12.jpg"


@pytest.fixture(scope="module")
def sentences(iu_reports_dir):
    from dataset_scripts import build_iu_xray, report_sentences

    stream = report_sentences(build_iu_xray(iu_reports_dir)).take(300)
    return list(dict.fromkeys(example["text"] for example in stream))


@pytest.fixture(scope="module")
def demo(model, processor):
    return XrayDemo(model, processor)


# ------------------------------------------------------------------------------------------------------ uploads


def test_upload_of_every_format_decodes_to_the_same_xray(xray_path, tmp_path):
    gray = np.asarray(PIL.Image.open(xray_path).convert("L"))
    png16 = tmp_path / "xray16.png"
    PIL.Image.fromarray(gray.astype(np.uint16) * 257).save(png16)  # 16-bit PNG, full 16-bit range
    dicom = write_dicom(tmp_path / "xray.dcm", gray.astype(np.uint16) * 16, "MONOCHROME2", 12)
    for path in (xray_path, png16, dicom):
        image = read_upload(path, max_bytes=MAX_BYTES)
        assert image.mode == "L" and image.size == (gray.shape[1], gray.shape[0])
        assert np.abs(np.asarray(image, dtype=int) - gray).max() <= 1, path.name


def test_bad_uploads_get_a_message_naming_the_file(tmp_path, xray_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 10)
    empty = tmp_path / "empty.png"
    empty.touch()
    for path, message in [(text, "notes.txt is not a readable"), (broken, "broken.dcm is not a readable"),
                          (empty, "empty.png is empty")]:
        with pytest.raises(UploadError, match=message) as error:
            read_upload(path, max_bytes=MAX_BYTES)
        assert str(tmp_path) not in str(error.value)
    with pytest.raises(UploadError, match=r"000001-12.jpg is 0.0 MB; the largest upload accepted is 0 MB"):
        read_upload(xray_path, max_bytes=1000)


def test_parse_labels():
    assert parse_labels(" effusion, pneumothorax;\nnormal,, effusion ") == ["effusion", "pneumothorax", "normal"]
    assert parse_labels("") == []


# ---------------------------------------------------------------------------------------------------- zero-shot


def test_chexpert5_scores_are_the_zero_shot_classifiers(demo, model, processor, xray_path):
    image = read_upload(xray_path, MAX_BYTES)
    scores = demo.classify(image, "CheXpert-5")
    prompts = generate_prompts("chexpert5", n_per_class=10, seed=0)
    expected = ZeroShotClassifier(model, processor, prompts).classify([image]).probs[0]
    assert list(scores.scores) == list(prompts) and scores.prompts == prompts and scores.mode == "multiclass"
    np.testing.assert_allclose(list(scores.scores.values()), expected.numpy(), atol=1e-6)
    assert scores.top_finding == list(prompts)[int(expected.argmax())]


def test_chexpert14_scores_every_finding_on_its_own(demo, xray_path):
    scores = demo.classify(read_upload(xray_path, MAX_BYTES), "CheXpert-14")
    assert list(scores.scores) == list(CHEXPERT_CLASSES) and scores.mode == "multilabel"
    assert all(0.0 < score < 1.0 for score in scores.scores.values())
    assert sum(scores.scores.values()) != pytest.approx(1.0)
    assert all(prompts and isinstance(prompts[0], str) for prompts in scores.prompts.values())


def test_typed_labels(demo, xray_path):
    image = read_upload(xray_path, MAX_BYTES)
    scores = demo.classify(image, CUSTOM_LABELS, "pleural effusion, pneumothorax, normal chest")
    assert list(scores.scores) == ["pleural effusion", "pneumothorax", "normal chest"]
    assert sum(scores.scores.values()) == pytest.approx(1.0)
    assert scores.prompts["pneumothorax"] == ["pneumothorax"]
    with pytest.raises(ValueError, match="at least two labels"):
        demo.classify(image, CUSTOM_LABELS, "effusion")
    with pytest.raises(ValueError, match="unknown prompt set"):
        demo.classify(image, "RSNA")


def test_saliency_of_a_finding_has_the_uploads_size(demo, xray_path):
    image = read_upload(xray_path, MAX_BYTES)
    scores = demo.classify(image, "CheXpert-5")
    saliency = demo.saliency(image, scores.prompts[scores.top_finding])
    assert saliency.heatmap.shape == (image.height, image.width)
    assert saliency.overlay().size == image.size


def test_score_chart_has_one_bar_per_finding(demo, xray_path):
    scores = demo.classify(read_upload(xray_path, MAX_BYTES), "CheXpert-14")
    figure = score_chart(scores, "CheXpert-14")
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert len(axes.patches) == 14
    assert [label.get_text() for label in axes.get_yticklabels()][-1] == scores.top_finding


# ---------------------------------------------------------------------------------------------------- retrieval


def test_text_index_is_built_once_per_model(model, processor, sentences, tmp_path):
    index = cached_text_index(model, processor, sentences, tmp_path)
    files = list(tmp_path.glob("text-index-*.safetensors"))
    assert len(files) == 1 and index.ids == sentences
    modified = files[0].stat().st_mtime_ns
    again = cached_text_index(model, processor, sentences, tmp_path)
    assert files[0].stat().st_mtime_ns == modified
    assert torch.equal(again.embeddings, index.embeddings) and again.ids == sentences

    other = MedCLIPModel(tiny_config()).eval()
    assert model_fingerprint(other) != model_fingerprint(model)
    cached_text_index(other, processor, sentences, tmp_path)
    cached_text_index(model, processor, sentences[:10], tmp_path)
    assert len(list(tmp_path.glob("text-index-*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.partial"))


def test_fingerprint_follows_the_weights(model):
    changed = MedCLIPModel(model.config)
    changed.load_state_dict(model.state_dict())
    assert model_fingerprint(changed) == model_fingerprint(model)
    with torch.no_grad():
        changed.logit_scale.add_(1e-3)
    assert model_fingerprint(changed) != model_fingerprint(model)


def test_nearest_sentences_are_the_best_cosine_matches(model, processor, sentences, xray_path, tmp_path):
    sentences = sentences[:100]
    index = cached_text_index(model, processor, sentences, tmp_path)
    demo = XrayDemo(model, processor, sentence_index=index)
    image = read_upload(xray_path, MAX_BYTES)
    nearest = demo.nearest_sentences(image, k=5)
    with torch.no_grad():  # the index holds each sentence as embedded in its batch (MedCLIP pooling sees padding)
        image_embedding = model.get_image_features(**processor(images=image, return_tensors="pt")).pooler_output
    similarities = (torch.nn.functional.normalize(image_embedding, dim=-1) @ index.embeddings.T)[0]
    best = similarities.topk(5).indices.tolist()
    assert [text for text, _ in nearest] == [sentences[i] for i in best]
    np.testing.assert_allclose([score for _, score in nearest], similarities[best].numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="no sentence index"):
        XrayDemo(model, processor).nearest_sentences(image)


# ------------------------------------------------------------------------------------------------------ labeler


def test_report_rows_are_the_labelers_labels_and_evidence(demo):
    rows = demo.label_report(REPORT)
    expected = CheXpertLabeler().label_report_with_evidence(REPORT)
    assert [name for name, _, _ in rows] == list(CHEXPERT_CLASSES)
    names = {1.0: "positive", 0.0: "negative", -1.0: "uncertain", None: "not mentioned"}
    assert rows == [(name, names[label], span or "") for name, (label, span) in expected.items()]
    by_name = {name: (label, span) for name, label, span in rows}
    assert by_name["Cardiomegaly"] == ("positive", "cardiomegaly")
    assert by_name["Pleural Effusion"][0] == "negative" and by_name["Pleural Effusion"][1] in REPORT
    with pytest.raises(ValueError, match="empty"):
        demo.label_report("  ")


def test_typed_label_sets_are_cached_up_to_a_bound(model, processor, xray_path):
    demo = XrayDemo(model, processor)
    image = read_upload(xray_path, MAX_BYTES)
    for number in range(MAX_CACHED_CLASSIFIERS + 3):
        demo.classify(image, CUSTOM_LABELS, f"effusion {number}, normal")
    assert len(demo._classifiers) == MAX_CACHED_CLASSIFIERS
    first = demo._classifier(CUSTOM_LABELS, ("effusion 18", "normal"))
    assert demo._classifier(CUSTOM_LABELS, ("effusion 18", "normal")) is first
