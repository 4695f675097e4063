"""Embedding indexes, image / text retrieval and the retrieval and zero-shot metrics."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertConfig, ResNetConfig

from modeling_medclip import MedCLIPConfig, MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.metrics import (
    label_relevance,
    mean_reciprocal_rank,
    pair_relevance,
    precision_at_k,
    recall_at_k,
    retrieval_metrics,
    zero_shot_metrics,
)
from modeling_medclip.retrieval import (
    EmbeddingIndex,
    embed_images,
    embed_texts,
    image_to_image,
    image_to_text,
    text_to_image,
)

# ------------------------------------------------------------------------------------------------- metrics

# 4 queries, a gallery of 4 items. Gallery labels [0, 1, 0, 2]; query labels [0, 1, 2, 3].
GALLERY_LABELS = [0, 1, 0, 2]
QUERY_LABELS = [0, 1, 2, 3]
RANKING = torch.tensor([
    [1, 0, 3, 2],  # q0 (label 0): relevant items 0 and 2 sit at ranks 2 and 4
    [1, 2, 0, 3],  # q1 (label 1): its only relevant item 1 is at rank 1
    [0, 1, 2, 3],  # q2 (label 2): its only relevant item 3 is at rank 4
    [3, 2, 1, 0],  # q3 (label 3): nothing in the gallery is relevant
])


def test_label_relevance_metrics_by_hand():
    relevant = label_relevance(QUERY_LABELS, GALLERY_LABELS)
    assert relevant.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [False, False, False, True],
        [False, False, False, False],
    ]
    # P@1: only q1 hits at rank 1 -> 1/4. P@2: q0 and q1 have one hit each in the top 2 -> (1/2 + 1/2) / 4.
    assert precision_at_k(RANKING, relevant, 1) == pytest.approx(0.25)
    assert precision_at_k(RANKING, relevant, 2) == pytest.approx(0.25)
    # recall averages over q0..q2 (q3 has nothing relevant): R@1 = (0/2 + 1 + 0) / 3, R@2 = (1/2 + 1 + 0) / 3
    assert recall_at_k(RANKING, relevant, 1) == pytest.approx(1 / 3)
    assert recall_at_k(RANKING, relevant, 2) == pytest.approx(0.5)
    assert recall_at_k(RANKING, relevant, 4) == pytest.approx(1.0)
    # first relevant ranks 2, 1, 4 and none: (1/2 + 1 + 1/4 + 0) / 4
    assert mean_reciprocal_rank(RANKING, relevant) == pytest.approx(0.4375)
    assert retrieval_metrics(RANKING, relevant, ks=(1, 2, 10)) == pytest.approx(
        {"precision@1": 0.25, "recall@1": 1 / 3, "precision@2": 0.25, "recall@2": 0.5, "mrr": 0.4375}
    )


def test_multi_hot_label_relevance():
    queries = np.array([[1, 0, 0], [0, 1, 1]])
    gallery = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    assert label_relevance(queries, gallery).tolist() == [[True, False, False], [True, True, False]]


def test_pair_relevance_with_shared_reports():
    # three reports a, b, c; images 0 and 1 both belong to report a
    image_pairs = ["a", "a", "b", "c"]
    text_pairs = ["a", "b", "c"]
    text_to_image_relevant = pair_relevance(text_pairs, image_pairs)
    assert text_to_image_relevant.tolist() == [
        [True, True, False, False],
        [False, False, True, False],
        [False, False, False, True],
    ]
    assert pair_relevance(image_pairs, text_pairs).sum(axis=1).tolist() == [1, 1, 1, 1]
    assert pair_relevance([{"a", "c"}], text_pairs).tolist() == [[True, False, True]]
    # report a ranks image 1 then image 3: recall@1 = 1/2 (one of its two images), recall@2 still 1/2
    ranking = torch.tensor([[1, 3], [2, 0], [0, 3]])
    assert recall_at_k(ranking, text_to_image_relevant, 1) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert recall_at_k(ranking, text_to_image_relevant, 2) == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert mean_reciprocal_rank(ranking, text_to_image_relevant) == pytest.approx((1 + 1 + 1 / 2) / 3)


def test_metrics_reject_bad_shapes():
    relevant = label_relevance(QUERY_LABELS, GALLERY_LABELS)
    with pytest.raises(ValueError, match="k"):
        precision_at_k(RANKING, relevant, 5)
    with pytest.raises(ValueError, match="gallery size"):
        mean_reciprocal_rank(RANKING + 1, relevant)
    with pytest.raises(ValueError, match="same Q"):
        mean_reciprocal_rank(RANKING[:2], relevant)
    with pytest.raises(ValueError, match="undefined"):
        recall_at_k(RANKING, np.zeros((4, 4), dtype=bool), 1)


def test_zero_shot_metrics_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3]])
    labels = np.array([0, 1, 1, 0, 1])
    result = zero_shot_metrics(probs, labels, class_names=["a", "b", "c"])
    assert result["accuracy"] == pytest.approx(3 / 5)  # argmax [0, 1, 0, 2, 1]: samples 0, 1 and 4 are right
    # class a: positives score .7 and .1 against negatives .2 .6 .3 -> .7 wins 3 of 6 pairs
    assert result["per_class_auc"]["a"] == pytest.approx(0.5)
    # class b: positives .5 .3 .4 against negatives .2 .3 -> 2 + (1 + tie 1/2) + 2 = 5.5 of 6 pairs
    assert result["per_class_auc"]["b"] == pytest.approx(5.5 / 6)
    assert math.isnan(result["per_class_auc"]["c"])  # no positives: left out of the macro mean
    assert result["macro_auc"] == pytest.approx((0.5 + 5.5 / 6) / 2)

    multilabel = zero_shot_metrics(torch.tensor([[0.8, 0.4], [0.3, 0.6], [0.6, 0.2]]),
                                   torch.tensor([[1, 0], [0, 1], [0, 0]]))
    assert multilabel["accuracy"] == pytest.approx(5 / 6)  # only sample 2's class 0 is wrong at 0.5
    assert multilabel["macro_auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels"):
        zero_shot_metrics(probs, np.array([0, 1, 3, 0, 1]))


# --------------------------------------------------------------------------------------------------- index

GALLERY = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])


def test_exact_search_by_hand():
    index = EmbeddingIndex(GALLERY, ids=["x", "y", "xy", "z"])
    scores, indices = index.search(torch.tensor([[2.0, 0.2, 0.0], [0.0, 0.0, -1.0]]), k=2)
    # the first query points almost along x: item 0 (cos 0.995), then the diagonal item 2 (cos 0.774)
    assert indices.tolist()[0] == [0, 2]
    assert scores[0].tolist() == pytest.approx([2 / math.sqrt(4.04), 2.2 / math.sqrt(4.04) / math.sqrt(2)])
    # the second points against z: item 3 is the least similar (-1), the others tie at 0
    assert scores[1, 0].item() == pytest.approx(0.0) and 3 not in indices[1].tolist()
    assert [index.ids[i] for i in indices[0].tolist()] == ["x", "xy"]
    with pytest.raises(ValueError, match="k"):
        index.search(GALLERY, k=5)
    with pytest.raises(ValueError, match="shape"):
        index.search(torch.ones(2, 4), k=1)
    with pytest.raises(ValueError, match="ids"):
        EmbeddingIndex(GALLERY, ids=["x"])


def test_index_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    index = EmbeddingIndex(torch.randn(7, 5), ids=[f"study-{i}" for i in range(6)] + [42])
    index.save(tmp_path / "gallery.safetensors")
    loaded = EmbeddingIndex.load(tmp_path / "gallery.safetensors")
    assert loaded.ids == index.ids
    torch.testing.assert_close(loaded.embeddings, index.embeddings, rtol=0, atol=0)
    torch.testing.assert_close(loaded.embeddings.norm(dim=1), torch.ones(7))
    queries = torch.randn(3, 5)
    for ours, theirs in zip(loaded.search(queries, 4), index.search(queries, 4)):
        torch.testing.assert_close(ours, theirs)

    save_file({"embeddings": torch.randn(2, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an embedding index"):
        EmbeddingIndex.load(tmp_path / "other.safetensors")


def test_faiss_backend_equals_exact_search():
    try:
        import faiss  # noqa: F401
    except ImportError:
        pytest.skip("faiss-cpu is not installed (pip install medclip-hf[faiss]); the FAISS backend is untested")
    torch.manual_seed(0)
    gallery, queries = torch.randn(300, 16), torch.randn(20, 16)
    exact = EmbeddingIndex(gallery).search(queries, 10)
    approximate = EmbeddingIndex(gallery, backend="faiss").search(queries, 10)
    torch.testing.assert_close(approximate[0], exact[0], atol=1e-5, rtol=0)
    assert torch.equal(approximate[1], exact[1])


# ----------------------------------------------------------------------------------------- with a model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = MedCLIPConfig(
        vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
        text_config=BertConfig(
            vocab_size=28996, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37
        ),
        projection_dim=16,
        text_pooling="medclip",
    )
    return MedCLIPModel(config).eval()


@pytest.fixture(scope="module")
def processor(tokenizer_dir):
    return MedCLIPProcessor(MedCLIPImageProcessor(), AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def pairs(covid_cxr_dir):
    metadata = pd.read_csv(covid_cxr_dir / "metadata.csv")
    metadata = metadata[metadata["has_text"] == 1].drop_duplicates("text").head(5)
    images = [Image.open(covid_cxr_dir / name) for name in metadata["file_name"]]
    return images, metadata["text"].tolist()


def test_embeddings_are_batched_and_normalised(model, processor, pairs):
    images, texts = pairs
    by_two = embed_images(model, processor, images, batch_size=2)
    with torch.no_grad():
        features = model.get_image_features(processor(images=images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(by_two, F.normalize(features.pooler_output, dim=-1), atol=1e-5, rtol=1e-4)

    text_embeds = embed_texts(model, processor, texts, batch_size=len(texts))
    with torch.no_grad():
        features = model.get_text_features(**processor(text=texts, return_tensors="pt")).pooler_output
    torch.testing.assert_close(text_embeds, F.normalize(features, dim=-1))
    torch.testing.assert_close(text_embeds.norm(dim=1), torch.ones(len(texts)))
    with pytest.raises(ValueError, match="text #1"):
        embed_texts(model, processor, ["effusion", " "])


def test_retrieval_helpers(model, processor, pairs):
    images, texts = pairs
    image_index = EmbeddingIndex.from_images(model, processor, images, ids=list(range(10, 15)), batch_size=2)
    text_index = EmbeddingIndex.from_texts(model, processor, texts, batch_size=8)
    similarity = image_index.embeddings @ text_index.embeddings.T  # (images, texts)

    scores, indices = image_to_text(model, processor, images, text_index, k=5, batch_size=2)
    torch.testing.assert_close(scores, similarity.sort(dim=1, descending=True).values, atol=1e-5, rtol=0)
    scores, indices = text_to_image(model, processor, texts, image_index, k=3, batch_size=8)
    torch.testing.assert_close(scores, similarity.T.sort(dim=1, descending=True).values[:, :3], atol=1e-5, rtol=0)

    scores, indices = image_to_image(model, processor, images, image_index, k=2)
    assert indices[:, 0].tolist() == list(range(5))  # every image finds itself first
    torch.testing.assert_close(scores[:, 0], torch.ones(5), atol=1e-5, rtol=0)
