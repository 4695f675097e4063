"""Contrastive losses of ConVIRT and MedCLIP, as pure functions of logits (and label vectors).

Every loss takes the similarity logits of a batch of `B_img` images against `B_txt` texts, already multiplied by the
logit scale. With several processes, build those logits from embeddings gathered by [`gather_with_grad`] so each
process sees the negatives of the whole global batch; in a single process it is the identity and needs no process
group.

Row `i` of `logits_per_image` is image `i` against every text; `logits_per_text` is its transpose. For the paired
losses (InfoNCE, ConVIRT, sigmoid) image `i` and text `i` are the positive pair, so `B_img == B_txt`.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """All-gather of equally sized `(B, ...)` shards along dim 0; backward: the summed gradient of this shard."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every process backpropagates the same global loss: sum their gradients
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` (shape `(B_local, ...)`) from all processes along dim 0, keeping the autograd graph.

    The backward pass sends each process the gradient of its own slice, summed over processes (every process computes
    the same global loss; with DDP's gradient averaging the update equals the single-process update on the
    concatenated batch). Returns `tensor` unchanged when no process group is initialised or there is one process.
    Processes may hold different `B_local` (the last batch of an epoch): sizes are exchanged first.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world_size = dist.get_world_size()
    local_size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(local_size) for _ in range(world_size)]
    dist.all_gather(sizes, local_size)
    sizes = [int(size.item()) for size in sizes]
    max_size = max(sizes)
    if tensor.shape[0] < max_size:
        padding = tensor.new_zeros((max_size - tensor.shape[0], *tensor.shape[1:]))
        tensor = torch.cat([tensor, padding])
    gathered = _AllGather.apply(tensor).split(max_size)
    return torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])


def _check_paired(logits_per_image: torch.Tensor, name: str) -> None:
    if logits_per_image.dim() != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"{name} needs paired batches (one text per image), got logits of shape {tuple(logits_per_image.shape)}"
        )


def clip_loss(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: the mean of the image->text and text->image cross-entropies.

    Args:
        logits_per_image: `(B, B)` scaled similarities, image `i` paired with text `i`.
        logits_per_text: `(B, B)`, the transpose of `logits_per_image`.

    Returns:
        A scalar tensor.
    """
    _check_paired(logits_per_image, "clip_loss")
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2


def convirt_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, convirt_lambda: float = 0.75
) -> torch.Tensor:
    """ConVIRT's bidirectional InfoNCE: `lambda * l(image->text) + (1 - lambda) * l(text->image)`.

    Args:
        logits_per_image: `(B, B)` scaled similarities (ConVIRT: cosine / tau with tau = 0.1).
        logits_per_text: `(B, B)`, the transpose of `logits_per_image`.
        convirt_lambda: weight of the image->text term (0.75 in the paper).

    Returns:
        A scalar tensor.
    """
    _check_paired(logits_per_image, "convirt_loss")
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_text, targets)
    return convirt_lambda * image_to_text + (1 - convirt_lambda) * text_to_image


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over rows.

    Args:
        logits: `(N, M)` unnormalised scores.
        targets: `(N, M)` rows that sum to one.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def semantic_matching_loss(
    logits_per_image: torch.Tensor,
    logits_per_text: torch.Tensor,
    image_labels: torch.Tensor,
    text_labels: torch.Tensor,
    label_similarity_scale: float = 1.0,
    normalize_label_vectors: bool = False,
) -> torch.Tensor:
    """MedCLIP's semantic matching loss on decoupled image and text batches.

    The soft targets are the row-softmax of the label similarity `s * image_labels @ text_labels.T`, so an image and a
    report with the same findings count as a match even when they come from different patients; the loss is the
    soft cross-entropy in both directions, averaged.

    With MedCLIP's binary label vectors and `s = 1` the similarities of a batch differ by about 1, so the targets are
    close to uniform and the loss can barely move from `log(B)`. With `normalize_label_vectors` the label vectors are
    L2-normalised first (the similarity becomes the cosine of the label vectors, in `[0, 1]` for non-negative labels;
    an all-zero vector stays zero), so `s` alone sets how sharp the targets are (`s` around 10 trains well).

    Ignored entries: a label vector may hold NaN where a label is to be ignored (an uncertain finding under the
    "ignore" policy). A pair whose agreement depends on it (NaN on one side, positive or NaN on the other) is masked
    out of both softmaxes, logits and targets: it is neither a match nor a negative, whereas writing 0 would make it a
    negative. Rows left with no pair are dropped from the mean.

    Args:
        logits_per_image: `(B_img, B_txt)` scaled similarities.
        logits_per_text: `(B_txt, B_img)`, the transpose of `logits_per_image`.
        image_labels: `(B_img, C)` label vectors of the images (e.g. the 14 CheXpert findings).
        text_labels: `(B_txt, C)` label vectors of the texts, from the report labeler.
        label_similarity_scale: `s` above (1.0 in MedCLIP).
        normalize_label_vectors: L2-normalise both label vectors before their dot product (MedCLIP: `False`).

    Returns:
        A scalar tensor.
    """
    if image_labels is None or text_labels is None:
        raise ValueError("semantic_matching_loss needs both `image_labels` and `text_labels`")
    expected = (logits_per_image.shape[0], logits_per_image.shape[1])
    if image_labels.dim() != 2 or text_labels.dim() != 2 or (image_labels.shape[0], text_labels.shape[0]) != expected:
        raise ValueError(
            f"label vectors of shapes {tuple(image_labels.shape)} (images) and {tuple(text_labels.shape)} (texts) do "
            f"not match logits of shape {tuple(logits_per_image.shape)}; expected (B_img, C) and (B_txt, C)"
        )
    if image_labels.shape[1] != text_labels.shape[1]:
        raise ValueError(
            f"image and text label vectors have different numbers of classes: {image_labels.shape[1]} vs "
            f"{text_labels.shape[1]}"
        )
    image_labels, text_labels = image_labels.float(), text_labels.float()
    undecided = _undecided_pairs(image_labels, text_labels)
    image_labels, text_labels = image_labels.nan_to_num(0.0), text_labels.nan_to_num(0.0)
    if normalize_label_vectors:
        image_labels, text_labels = F.normalize(image_labels, dim=1), F.normalize(text_labels, dim=1)
    label_similarity = label_similarity_scale * (image_labels @ text_labels.T)
    image_side = _masked_soft_cross_entropy(logits_per_image, label_similarity, undecided)
    text_side = _masked_soft_cross_entropy(logits_per_text, label_similarity.T, undecided.T)
    return (image_side + text_side) / 2


def _undecided_pairs(image_labels: torch.Tensor, text_labels: torch.Tensor) -> torch.Tensor:
    """`(B_img, B_txt)` bool: pairs where an ignored (NaN) entry meets a positive or ignored entry of the other side."""
    image_ignored, text_ignored = image_labels.isnan().float(), text_labels.isnan().float()
    image_open = image_ignored + (image_labels.nan_to_num(0.0) > 0).float()
    text_open = text_ignored + (text_labels.nan_to_num(0.0) > 0).float()
    return (image_ignored @ text_open.T + image_open @ text_ignored.T) > 0


def _masked_soft_cross_entropy(logits: torch.Tensor, similarity: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """[`soft_cross_entropy`] against the row-softmax of `similarity`, both softmaxes leaving out the `masked`
    pairs; rows with nothing left are dropped."""
    kept = ~masked
    targets = similarity.masked_fill(masked, float("-inf")).softmax(dim=1).to(logits.dtype)
    log_probs = logits.masked_fill(masked, float("-inf")).log_softmax(dim=-1)
    row_losses = -torch.where(kept, targets * log_probs, 0.0).sum(dim=-1)
    rows = kept.any(dim=1)
    return row_losses[rows].mean() if rows.any() else logits.sum() * 0.0


def sigmoid_loss(logits_per_image: torch.Tensor, logit_bias: torch.Tensor | float = 0.0) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: every (image, text) pair is a binary match / no-match problem.

    Args:
        logits_per_image: `(B, B)` scaled similarities, image `i` paired with text `i`.
        logit_bias: the learnable bias `b` added to every logit.

    Returns:
        A scalar tensor: the summed pair losses divided by the number of images.
    """
    _check_paired(logits_per_image, "sigmoid_loss")
    logits = logits_per_image + logit_bias
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]


__all__ = [
    "clip_loss",
    "convirt_loss",
    "gather_with_grad",
    "semantic_matching_loss",
    "sigmoid_loss",
    "soft_cross_entropy",
]
