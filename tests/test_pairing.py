"""Decoupled (MedCLIP) and paired (ConVIRT) batches: shapes, labels, seeding, epochs, resuming and sharding."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from dataset_scripts import DecoupledBatches, PairedBatches, build_covid_cxr, build_iu_xray, report_sentences
from dataset_scripts.pairing import sample_sentence
from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.collator import MedCLIPCollator
from modeling_medclip.image_processing_medclip import MedCLIPImageProcessor
from modeling_medclip.labeler import CheXpertLabeler, split_sentences


REPO_ROOT = Path(__file__).resolve().parents[1]


def _image_ids(batches):
    return [example["image_id"] for batch in batches for example in batch["images"]]


def test_report_sentences_carry_sentence_labels(iu_reports_dir):
    reports = list(build_iu_xray(iu_reports_dir).take(20))
    sentences = list(report_sentences(build_iu_xray(iu_reports_dir).take(20)))
    assert [s["text"] for s in sentences] == [t for r in reports for t in split_sentences(r["text"])]
    labeler = CheXpertLabeler()
    assert all(s["labels"] == labeler.label_vector(s["text"], level="sentence") for s in sentences)
    assert sentences[0]["image_id"] == f"{reports[0]['study_id']}#0"


def test_ignore_policy_reaches_the_semantic_loss_as_a_mask(iu_reports_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    from modeling_medclip.losses import semantic_matching_loss

    reports = build_iu_xray(iu_reports_dir, num_shards=1).take(400)
    ignored = [s for s in report_sentences(reports, uncertain="ignore") if any(math.isnan(v) for v in s["labels"])]
    assert ignored, "the first 400 IU reports hold uncertain sentences"
    positive = {s["text"]: s["labels"] for s in report_sentences(reports, uncertain="positive")}
    for sentence in ignored:  # NaN exactly where U-Ones writes the uncertain 1.0
        nan_columns = [c for c, v in enumerate(sentence["labels"]) if math.isnan(v)]
        assert all(positive[sentence["text"]][c] == 1.0 for c in nan_columns)
    collator = MedCLIPCollator(
        AutoTokenizer.from_pretrained(tokenizer_dir), build_augmentation("medclip", MedCLIPImageProcessor())
    )
    text_labels = collator({"images": [], "texts": ignored[:4], "paired": False})["text_labels"]
    assert text_labels.isnan().any()
    image_labels = torch.nan_to_num(text_labels, nan=1.0)  # images positive where the texts are uncertain
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    masked = semantic_matching_loss(logits, logits.T, image_labels, text_labels, 10.0, True)
    written_zero = semantic_matching_loss(logits, logits.T, image_labels, text_labels.nan_to_num(0.0), 10.0, True)
    assert torch.isfinite(masked) and not torch.isclose(masked, written_zero)


def test_decoupled_batches_shapes_and_labels(covid_cxr_dir, iu_reports_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    texts = report_sentences(build_iu_xray(iu_reports_dir, num_shards=4).take(200))
    batches = DecoupledBatches(
        build_covid_cxr(covid_cxr_dir), texts, image_batch_size=6, text_batch_size=10, seed=0, shuffle_buffer_size=64
    )
    collator = MedCLIPCollator(
        AutoTokenizer.from_pretrained(tokenizer_dir), build_augmentation("medclip", MedCLIPImageProcessor())
    )
    raw = next(iter(batches))
    batch = collator(raw)
    assert len(raw["images"]) == 6 and len(raw["texts"]) == 10 and not raw["paired"]
    assert batch["pixel_values"].shape == (6, 1, 224, 224)
    assert batch["image_labels"].shape == (6,) and batch["image_labels"].dtype == torch.int64
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == 10
    assert batch["input_ids"].shape[1] <= 77
    assert batch["text_labels"].shape == (10, 14) and batch["text_labels"].dtype == torch.float32
    labeler = CheXpertLabeler()
    expected = [labeler.label_vector(t["text"], level="sentence") for t in raw["texts"]]
    assert batch["text_labels"].tolist() == expected
    assert batch["position"] == [0, 0, 1, 0]


def test_decoupled_epoch_covers_images_once_and_is_seeded(covid_cxr_dir):
    images = build_covid_cxr(covid_cxr_dir, num_shards=8)
    texts = report_sentences(build_covid_cxr(covid_cxr_dir, require_text=True, num_shards=4))

    def run(seed, epoch, drop_last=False):
        batches = DecoupledBatches(
            images, texts, image_batch_size=32, text_batch_size=48, seed=seed, drop_last=drop_last,
            shuffle_buffer_size=100,
        )
        batches.set_epoch(epoch)
        return list(batches)

    first = run(seed=0, epoch=0)
    ids = _image_ids(first)
    assert sorted(ids) == sorted(row["image_id"] for row in images) and len(set(ids)) == 495
    assert [len(b["images"]) for b in first] == [32] * 15 + [15] and all(len(b["texts"]) == 48 for b in first)
    again = run(seed=0, epoch=0)
    assert ids == _image_ids(again) and [t["text"] for b in first for t in b["texts"]] == [
        t["text"] for b in again for t in b["texts"]
    ]
    assert ids != _image_ids(run(seed=0, epoch=1)) and ids != _image_ids(run(seed=1, epoch=0))
    dropped = run(seed=0, epoch=0, drop_last=True)
    assert len(dropped) == 15 and _image_ids(dropped) == ids[: 15 * 32]


def test_decoupled_text_stream_cycles_when_shorter(covid_cxr_dir, iu_reports_dir):
    texts = report_sentences(build_iu_xray(iu_reports_dir, num_shards=2).take(10))
    num_sentences = sum(1 for _ in texts)
    batches = list(
        DecoupledBatches(build_covid_cxr(covid_cxr_dir).take(64), texts, image_batch_size=16, text_batch_size=32)
    )
    text_ids = [t["image_id"] for b in batches for t in b["texts"]]
    assert len(text_ids) == 4 * 32 > num_sentences
    assert set(Counter(text_ids[:num_sentences]).values()) == {1}  # one full pass before any repetition


def test_paired_batches_resample_sentences_per_epoch(covid_cxr_dir):
    dataset = build_covid_cxr(covid_cxr_dir, require_text=True)

    def sentences(seed, epoch):
        batches = PairedBatches(dataset, batch_size=16, seed=seed, shuffle_buffer_size=None)
        batches.set_epoch(epoch)
        return {e["image_id"]: e["text"] for b in batches for e in b["images"]}

    epoch0, epoch1 = sentences(0, 0), sentences(0, 1)
    assert epoch0 == sentences(0, 0)
    reports = {row["image_id"]: row["text"] for row in dataset}
    assert all(sentence in split_sentences(reports[image_id]) for image_id, sentence in epoch0.items())
    multi = [image_id for image_id in epoch0 if len(split_sentences(reports[image_id])) > 1]
    changed = sum(epoch0[i] != epoch1[i] for i in multi)
    assert changed > len(multi) // 3  # a new draw per epoch, not a fixed sentence
    assert sentences(1, 0) != epoch0
    batch = next(iter(PairedBatches(dataset, batch_size=4)))
    assert batch["paired"] and batch["images"] is batch["texts"] and batch["images"][0]["report"] in reports.values()
    assert sample_sentence("", seed=0, epoch=0, image_id="x") is None


def test_resume_mid_epoch_with_two_workers_yields_exactly_the_rest(covid_cxr_dir):
    def make():
        batches = PairedBatches(build_covid_cxr(covid_cxr_dir, num_shards=4), batch_size=16, seed=5)
        batches.set_epoch(2)
        return batches

    def loader(batches):
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)

    full = [(b["position"], [e["image_id"] for e in b["images"]]) for b in loader(make())]
    run = make()
    for step, batch in enumerate(loader(run)):
        run.record(batch)
        if step == 6:
            break
    state = json.loads(json.dumps(run.state_dict()))
    assert state["epoch"] == 2 and state["num_workers"] == 2 and state["consumed"] == {"0": 4, "1": 3}

    resumed = make()
    resumed.load_state_dict(state)
    rest = [(b["position"], [e["image_id"] for e in b["images"]]) for b in loader(resumed)]
    # the same remaining batches, each worker in its own order; the DataLoader restarts its round-robin at worker 0
    assert sorted(rest) == sorted(full[7:])
    assert [b for b in rest if b[0][1] == 1] == [b for b in full[7:] if b[0][1] == 1]
    resumed.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(loader(resumed))) == len(full)
    with pytest.raises(ValueError, match="2 DataLoader workers"):
        again = make()
        again.load_state_dict(state)
        list(again)


@pytest.mark.slow
def test_two_processes_read_disjoint_shards(covid_cxr_dir, tmp_path):
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO_ROOT / "tests" / "_shard_worker.py"), "--covid_dir", str(covid_cxr_dir), "--output_dir", str(tmp_path),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert all(r["world_size"] == 2 for r in ranks)
    seen = [ranks[0]["images"], ranks[1]["images"]]
    assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
    everything = seen[0] + seen[1]
    assert len(everything) == len(set(everything)) == 495  # drop_last=False: none dropped, none repeated
    assert not set(ranks[0]["texts"]) & set(ranks[1]["texts"])  # the text stream is split by process too
    assert {tuple(p[1:3]) for p in ranks[0]["positions"]} == {(0, 2), (1, 2)}  # both DataLoader workers read


def _labelled_images(num_images: int, num_shards: int = 4):
    """Undecoded image examples with 14-dim label vectors: Pneumonia, Cardiomegaly, No Finding, and none, in turn."""
    from datasets import Dataset

    from modeling_medclip.labeler import CHEXPERT_CLASSES

    cycle = [["Pneumonia"], ["Cardiomegaly", "Pleural Effusion"], ["No Finding"], []]
    rows = {"image": [], "labels": [], "image_id": []}
    for index in range(num_images):
        positive = cycle[index % len(cycle)]
        rows["image"].append(f"image-{index}.png")
        rows["labels"].append([float(name in positive) for name in CHEXPERT_CLASSES])
        rows["image_id"].append(f"image-{index}")
    return Dataset.from_dict(rows).to_iterable_dataset(num_shards=num_shards)


def _shares_a_class(image: dict, text: dict) -> bool:
    return any(a > 0 and b > 0 for a, b in zip(image["labels"], text["labels"]))


def test_label_matched_texts_follow_the_image_labels(covid_cxr_dir, iu_reports_dir):
    texts = report_sentences(build_iu_xray(iu_reports_dir, num_shards=2).take(600))
    no_finding = [t["labels"][0] > 0 for t in texts]
    assert sum(no_finding) / len(no_finding) > 0.7  # the IU sentences are mostly "No Finding"

    def batches(text_sampling):
        return list(
            DecoupledBatches(
                _labelled_images(128), texts, image_batch_size=16, text_batch_size=24, seed=3,
                shuffle_buffer_size=64, text_sampling=text_sampling,
            )
        )  # fmt: skip

    matched, uniform = batches("label_matched"), batches("uniform")
    assert [len(b["texts"]) for b in matched] == [24] * 8
    for batch in matched:
        for k, text in enumerate(batch["texts"]):
            image = batch["images"][k % 16]
            if any(value > 0 for value in image["labels"]):
                assert _shares_a_class(image, text), (image["labels"], text["labels"])

    def share(batch_list):
        pairs = [(b["images"][k % 16], t) for b in batch_list for k, t in enumerate(b["texts"])]
        labelled = [(i, t) for i, t in pairs if any(v > 0 for v in i["labels"])]
        return sum(_shares_a_class(i, t) for i, t in labelled) / len(labelled)

    assert share(matched) == 1.0 and share(uniform) < 0.6
    assert sum(t["labels"][7] > 0 for b in matched for t in b["texts"]) > 4 * sum(
        t["labels"][7] > 0 for b in uniform for t in b["texts"]
    )  # Pneumonia sentences: a quarter of the images ask for them
    with pytest.raises(ValueError, match="text_sampling"):
        DecoupledBatches(_labelled_images(8), texts, image_batch_size=4, text_batch_size=4, text_sampling="by_label")
    covid = DecoupledBatches(
        build_covid_cxr(covid_cxr_dir), texts, image_batch_size=4, text_batch_size=4, text_sampling="label_matched",
    )  # fmt: skip
    with pytest.raises(ValueError, match="label vectors of length 14"):
        next(iter(covid))  # covid-cxr images carry a class index, not a label vector


def test_label_matched_texts_are_seeded_and_resume_with_two_workers(iu_reports_dir):
    texts = report_sentences(build_iu_xray(iu_reports_dir, num_shards=4).take(400))

    def make(seed=5, epoch=1):
        batches = DecoupledBatches(
            _labelled_images(160), texts, image_batch_size=8, text_batch_size=8, seed=seed, shuffle_buffer_size=32,
            text_sampling="label_matched",
        )  # fmt: skip
        batches.set_epoch(epoch)
        return batches

    def loader(batches):
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2)

    def content(batch):
        return (batch["position"], [e["image_id"] for e in batch["images"]], [t["image_id"] for t in batch["texts"]])

    full = [content(b) for b in loader(make())]
    assert full == [content(b) for b in loader(make())]
    assert [c[2] for c in full] != [c[2] for c in (content(b) for b in loader(make(epoch=2)))]
    assert [c[2] for c in full] != [c[2] for c in (content(b) for b in loader(make(seed=6)))]
    run = make()
    for step, batch in enumerate(loader(run)):
        run.record(batch)
        if step == 6:
            break
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    assert sorted(content(b) for b in loader(resumed)) == sorted(full[7:])  # the same images and the same texts
