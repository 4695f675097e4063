"""Embedding indexes and image / text retrieval with a ConVIRT / MedCLIP dual encoder.

[`embed_images`] and [`embed_texts`] compute L2-normalised embeddings in batches without gradients.
[`EmbeddingIndex`] holds such embeddings with their ids, saves them as safetensors (ids as JSON in the file's
metadata) and answers top-k cosine-similarity queries, exactly in memory (matmul + top-k) or with FAISS
(`backend="faiss"`, an exact `IndexFlatIP`, for large galleries; `pip install medclip-hf[faiss]`).
[`image_to_text`], [`text_to_image`] and [`image_to_image`] embed queries and search an index in one call; score
the rankings with [`modeling_medclip.metrics`].

Texts are tokenized per batch, padded to the longest text of the batch. With `config.text_pooling="medclip"` (an
unmasked mean over all positions, as the released MedCLIP code) a text's embedding therefore depends on its batch.
"""

import json
import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .modeling_medclip import DualEncoderModel

DEFAULT_TOKENIZER_KWARGS = {"padding": True, "truncation": True, "max_length": 77}
INDEX_FORMAT = "medclip-hf-embedding-index"


def embed_images(model: DualEncoderModel, processor, images, batch_size: int = 32) -> torch.Tensor:
    """L2-normalised image embeddings.

    Args:
        model: the dual encoder (run as it is: call `model.eval()` first), on any device.
        processor: a [`MedCLIPProcessor`] (or anything whose `__call__(images=...)` gives `pixel_values`).
        images: a sequence of PIL images, one PIL image, or `(N, C, H, W)` pixel values.
        batch_size: images per vision-tower call; PIL images are preprocessed one batch at a time.

    Returns:
        `(N, projection_dim)` embeddings on the model's device.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"`images` as pixel values must have shape (N, C, H, W), got {tuple(images.shape)}")
        batches = images.split(batch_size)
    else:
        if len(images) == 0:
            raise ValueError("`images` is empty: give at least one image")
        batches = (
            processor(images=list(images[start : start + batch_size]), return_tensors="pt")["pixel_values"]
            for start in range(0, len(images), batch_size)
        )
    parameter = next(model.parameters())
    chunks = []
    with torch.no_grad():
        for pixel_values in batches:
            pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
            chunks.append(F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1))
    return torch.cat(chunks)


def embed_texts(
    model: DualEncoderModel,
    processor,
    texts: Sequence[str],
    batch_size: int = 32,
    tokenizer_kwargs: dict | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings.

    Args:
        model: the dual encoder (run as it is: call `model.eval()` first).
        processor: a [`MedCLIPProcessor`] (rejects empty texts with a `ValueError`).
        texts: the reports or prompts.
        batch_size: texts per text-tower call; each batch is padded to its longest text.
        tokenizer_kwargs: tokenizer arguments, by default `padding=True, truncation=True, max_length=77`.

    Returns:
        `(len(texts), projection_dim)` embeddings on the model's device.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}")
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("`texts` must be a non-empty list of strings")
    kwargs = {**DEFAULT_TOKENIZER_KWARGS, **(tokenizer_kwargs or {})}
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tokens = processor(text=list(texts[start : start + batch_size]), return_tensors="pt", **kwargs)
            features = model.get_text_features(**tokens.to(device)).pooler_output
            chunks.append(F.normalize(features, dim=-1))
    return torch.cat(chunks)


class EmbeddingIndex:
    r"""
    A gallery of L2-normalised embeddings with ids, searched by cosine similarity.

    Args:
        embeddings (`torch.Tensor` of shape `(N, D)`): the gallery, kept as float32 on the CPU.
        ids (`list`, *optional*): one JSON-serialisable id (string or int) per row; defaults to `0 .. N-1`.
        backend (`str`, defaults to `"exact"`): `"exact"` (matmul + top-k in torch) or `"faiss"` (an exact
            `faiss.IndexFlatIP`, needs `faiss-cpu`). Both return the same results up to float rounding.
        normalize (`bool`, defaults to `True`): L2-normalise the rows (turn off only for rows already normalised,
            as [`load`] does, so that a saved index comes back bit for bit).

    Example:

    ```python
    >>> index = EmbeddingIndex.from_texts(model, processor, reports, ids=study_ids)
    >>> scores, indices = index.search(embed_images(model, processor, images), k=5)  # (Q, 5) each
    >>> [index.ids[i] for i in indices[0].tolist()]
    ```"""

    def __init__(
        self,
        embeddings: torch.Tensor,
        ids: Sequence[str | int] | None = None,
        backend: Literal["exact", "faiss"] = "exact",
        normalize: bool = True,
    ):
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or embeddings.shape[0] == 0:
            raise ValueError("`embeddings` must be a non-empty (N, D) tensor")
        if backend not in ("exact", "faiss"):
            raise ValueError(f"unknown backend {backend!r}; expected 'exact' or 'faiss'")
        ids = list(range(embeddings.shape[0])) if ids is None else list(ids)
        if len(ids) != embeddings.shape[0]:
            raise ValueError(f"got {len(ids)} ids for {embeddings.shape[0]} embeddings")
        for item in ids:
            if not isinstance(item, (str, int)):
                raise ValueError(f"ids must be strings or ints, got {item!r}")
        embeddings = embeddings.detach().to(device="cpu", dtype=torch.float32)
        self.embeddings = (F.normalize(embeddings, dim=-1) if normalize else embeddings).contiguous()
        self.ids = ids
        self.backend = backend
        self._faiss_index = self._build_faiss_index() if backend == "faiss" else None

    def _build_faiss_index(self):
        try:
            import faiss
        except ImportError as error:
            raise ImportError(
                "backend='faiss' needs the faiss-cpu package: `pip install medclip-hf[faiss]` (or "
                "`pip install faiss-cpu`)"
            ) from error
        index = faiss.IndexFlatIP(self.dim)
        index.add(self.embeddings.numpy())
        return index

    @classmethod
    def from_images(
        cls,
        model: DualEncoderModel,
        processor,
        images,
        ids: Sequence[str | int] | None = None,
        batch_size: int = 32,
        backend: Literal["exact", "faiss"] = "exact",
    ) -> "EmbeddingIndex":
        """An index of images (PIL images or `(N, C, H, W)` pixel values), embedded by [`embed_images`]."""
        return cls(embed_images(model, processor, images, batch_size), ids, backend)

    @classmethod
    def from_texts(
        cls,
        model: DualEncoderModel,
        processor,
        texts: Sequence[str],
        ids: Sequence[str | int] | None = None,
        batch_size: int = 32,
        backend: Literal["exact", "faiss"] = "exact",
        tokenizer_kwargs: dict | None = None,
    ) -> "EmbeddingIndex":
        """An index of texts, embedded by [`embed_texts`]."""
        return cls(embed_texts(model, processor, texts, batch_size, tokenizer_kwargs), ids, backend)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def search(self, query_embeddings: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
        """The `k` most similar gallery items of every query.

        Args:
            query_embeddings (`torch.Tensor` of shape `(Q, D)`): normalised here, on any device.
            k: how many items to return per query, `1 <= k <= len(self)`.

        Returns:
            `(scores, indices)`, both `(Q, k)` on the CPU, best first: cosine similarities (float32) and row
            indices into the gallery (int64; map them to ids with `self.ids`).
        """
        if query_embeddings.dim() != 2 or query_embeddings.shape[1] != self.dim:
            raise ValueError(
                f"`query_embeddings` must have shape (Q, {self.dim}), got {tuple(query_embeddings.shape)}"
            )
        if not 1 <= k <= len(self):
            raise ValueError(f"`k` must be in [1, {len(self)}] (the gallery size), got {k}")
        queries = F.normalize(query_embeddings.detach().to(device="cpu", dtype=torch.float32), dim=-1)
        if self._faiss_index is not None:
            scores, indices = self._faiss_index.search(queries.contiguous().numpy(), k)
            return torch.from_numpy(scores), torch.from_numpy(indices).long()
        return (queries @ self.embeddings.T).topk(k, dim=1)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the embeddings to a safetensors file, with the ids as JSON in its metadata."""
        metadata = {"format": INDEX_FORMAT, "ids": json.dumps(self.ids)}
        save_file({"embeddings": self.embeddings}, os.fspath(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, backend: Literal["exact", "faiss"] = "exact") -> "EmbeddingIndex":
        """Reads an index written by [`save`]."""
        path = os.fspath(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != INDEX_FORMAT or "ids" not in metadata:
            raise ValueError(f"{path} is not an embedding index saved by EmbeddingIndex.save")
        return cls(load_file(path)["embeddings"], json.loads(metadata["ids"]), backend, normalize=False)


def image_to_text(
    model: DualEncoderModel, processor, images, text_index: EmbeddingIndex, k: int = 10, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` reports of an index of texts for every image: `(scores, indices)`, each `(num_images, k)`."""
    return text_index.search(embed_images(model, processor, images, batch_size), k)


def text_to_image(
    model: DualEncoderModel,
    processor,
    texts: Sequence[str],
    image_index: EmbeddingIndex,
    k: int = 10,
    batch_size: int = 32,
    tokenizer_kwargs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` images of an index of images for every text: `(scores, indices)`, each `(num_texts, k)`."""
    return image_index.search(embed_texts(model, processor, texts, batch_size, tokenizer_kwargs), k)


def image_to_image(
    model: DualEncoderModel, processor, images, image_index: EmbeddingIndex, k: int = 10, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` images of an index of images for every query image: `(scores, indices)`, each `(num_images, k)`.

    A query that is also in the gallery retrieves itself first; search `k + 1` and drop it when that is unwanted.
    """
    return image_index.search(embed_images(model, processor, images, batch_size), k)


__all__ = ["EmbeddingIndex", "embed_images", "embed_texts", "image_to_image", "image_to_text", "text_to_image"]
