"""The losses against values computed by hand in the test, plus their invariants."""

import math

import pytest
import torch

from modeling_medclip.losses import (
    clip_loss,
    convirt_loss,
    gather_with_grad,
    semantic_matching_loss,
    sigmoid_loss,
    soft_cross_entropy,
)

# A 2 x 2 case small enough to write out: image i should match text i.
LOGITS = torch.tensor([[2.0, 0.0], [1.0, 3.0]])


def _log_softmax_at(row, index):
    return row[index] - math.log(sum(math.exp(v) for v in row))


def test_clip_loss_matches_hand_computation():
    rows, cols = LOGITS.tolist(), LOGITS.T.tolist()
    image_to_text = -(_log_softmax_at(rows[0], 0) + _log_softmax_at(rows[1], 1)) / 2
    text_to_image = -(_log_softmax_at(cols[0], 0) + _log_softmax_at(cols[1], 1)) / 2
    expected = (image_to_text + text_to_image) / 2
    assert clip_loss(LOGITS, LOGITS.T).item() == pytest.approx(expected, abs=1e-6)


def test_convirt_loss_weights_the_two_directions():
    rows, cols = LOGITS.tolist(), LOGITS.T.tolist()
    image_to_text = -(_log_softmax_at(rows[0], 0) + _log_softmax_at(rows[1], 1)) / 2
    text_to_image = -(_log_softmax_at(cols[0], 0) + _log_softmax_at(cols[1], 1)) / 2
    assert convirt_loss(LOGITS, LOGITS.T, 0.75).item() == pytest.approx(
        0.75 * image_to_text + 0.25 * text_to_image, abs=1e-6
    )
    assert convirt_loss(LOGITS, LOGITS.T, 1.0).item() == pytest.approx(image_to_text, abs=1e-6)
    assert convirt_loss(LOGITS, LOGITS.T, 0.5).item() == pytest.approx(clip_loss(LOGITS, LOGITS.T).item(), abs=1e-6)


def _semantic_loss_by_hand(logits: torch.Tensor, similarity: list[list[float | None]]) -> float:
    """The semantic loss written out: soft cross-entropy against the row-softmax of `similarity`, both ways; a `None`
    similarity is a masked pair, left out of both softmaxes."""

    def row_loss(logit_row, similarity_row):
        kept = [j for j, value in enumerate(similarity_row) if value is not None]
        total = sum(math.exp(similarity_row[j]) for j in kept)
        kept_logits = [logit_row[j] for j in kept]
        return -sum(math.exp(similarity_row[j]) / total * _log_softmax_at(kept_logits, n) for n, j in enumerate(kept))

    def side(logit_rows, similarity_rows):
        losses = [row_loss(r, s) for r, s in zip(logit_rows, similarity_rows)]
        return sum(losses) / len(losses)

    image_side = side(logits.tolist(), similarity)
    text_side = side(logits.T.tolist(), [list(column) for column in zip(*similarity)])
    return (image_side + text_side) / 2


# 2 images, 3 texts, 2 classes: image 0 has class 0, image 1 both classes; texts: class 0, class 1, none.
SEMANTIC_LOGITS = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
IMAGE_LABELS = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
TEXT_LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])


def test_semantic_loss_matches_hand_computation():
    similarity = [[1, 0, 0], [1, 1, 0]]  # image_labels @ text_labels.T written out
    loss = semantic_matching_loss(SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, IMAGE_LABELS, TEXT_LABELS)
    assert loss.item() == pytest.approx(_semantic_loss_by_hand(SEMANTIC_LOGITS, similarity), abs=1e-6)


def test_semantic_loss_with_normalized_label_vectors_matches_hand_computation():
    # cosines of the label vectors: image 1 = (1, 1) / sqrt(2) against text 0 = (1, 0) gives 1 / sqrt(2); the
    # all-zero text stays at 0; then scaled by 10
    r = 1 / math.sqrt(2)
    similarity = [[10 * 1, 0, 0], [10 * r, 10 * r, 0]]
    loss = semantic_matching_loss(
        SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, IMAGE_LABELS, TEXT_LABELS, 10.0, normalize_label_vectors=True
    )
    assert loss.item() == pytest.approx(_semantic_loss_by_hand(SEMANTIC_LOGITS, similarity), abs=1e-6)
    # a label vector's length no longer matters: doubling one image's labels leaves the loss unchanged
    doubled = semantic_matching_loss(
        SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, IMAGE_LABELS * torch.tensor([[2.0], [1.0]]), TEXT_LABELS, 10.0,
        normalize_label_vectors=True,
    )  # fmt: skip
    assert doubled.item() == pytest.approx(loss.item(), abs=1e-6)


def test_semantic_loss_masks_pairs_that_depend_on_an_ignored_label():
    # text 0 has class 0 ignored (NaN): its pair with image 0 (class 0) is undecided and masked; its pair with image 1
    # (class 1 only) is decided (text 0 does not have class 1), a negative
    image_labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_labels = torch.tensor([[float("nan"), 0.0], [0.0, 1.0], [0.0, 0.0]])
    similarity = [[None, 0, 0], [0, 1, 0]]
    loss = semantic_matching_loss(SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, image_labels, text_labels)
    assert loss.item() == pytest.approx(_semantic_loss_by_hand(SEMANTIC_LOGITS, similarity), abs=1e-6)
    written_zero = semantic_matching_loss(SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, image_labels, text_labels.nan_to_num(0.0))
    assert abs(written_zero.item() - loss.item()) > 1e-3  # 0 would make the pair a negative
    normalized = semantic_matching_loss(
        SEMANTIC_LOGITS, SEMANTIC_LOGITS.T, image_labels, text_labels, 10.0, normalize_label_vectors=True
    )
    assert normalized.item() == pytest.approx(
        _semantic_loss_by_hand(SEMANTIC_LOGITS, [[None, 0, 0], [0, 10, 0]]), abs=1e-6
    )
    logits = SEMANTIC_LOGITS.clone().requires_grad_(True)
    semantic_matching_loss(logits, logits.T, image_labels, text_labels).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 0] == 0  # a masked pair gets no gradient


def test_semantic_loss_equals_infonce_for_identity_labels_with_large_scale():
    torch.manual_seed(0)
    logits = torch.randn(5, 5) * 3
    labels = torch.eye(5)
    semantic = semantic_matching_loss(logits, logits.T, labels, labels, label_similarity_scale=100.0)
    assert semantic.item() == pytest.approx(clip_loss(logits, logits.T).item(), abs=1e-5)
    # with the MedCLIP scale of 1 the targets are soft, and the losses differ
    soft = semantic_matching_loss(logits, logits.T, labels, labels, label_similarity_scale=1.0)
    assert abs(soft.item() - clip_loss(logits, logits.T).item()) > 1e-2


def test_sigmoid_loss_matches_hand_computation():
    bias = -1.0
    values = LOGITS.tolist()
    expected = 0.0
    for i in range(2):
        for j in range(2):
            sign = 1.0 if i == j else -1.0
            expected += math.log(1 + math.exp(-sign * (values[i][j] + bias)))
    assert sigmoid_loss(LOGITS, bias).item() == pytest.approx(expected / 2, abs=1e-6)


def test_soft_cross_entropy_with_one_hot_targets_is_cross_entropy():
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1]), 2).float()
    assert soft_cross_entropy(LOGITS, targets).item() == pytest.approx(
        torch.nn.functional.cross_entropy(LOGITS, torch.tensor([0, 1])).item(), abs=1e-6
    )


@pytest.mark.parametrize("name", ["clip", "convirt", "semantic", "sigmoid"])
def test_losses_are_permutation_equivariant(name):
    torch.manual_seed(1)
    logits = torch.randn(6, 6)
    labels = (torch.rand(6, 4) > 0.5).float()
    permutation = torch.randperm(6)
    permuted = logits[permutation][:, permutation]

    def loss(lg, lb):
        if name == "clip":
            return clip_loss(lg, lg.T)
        if name == "convirt":
            return convirt_loss(lg, lg.T, 0.75)
        if name == "semantic":
            return semantic_matching_loss(lg, lg.T, lb, lb)
        return sigmoid_loss(lg, -2.0)

    assert loss(permuted, labels[permutation]).item() == pytest.approx(loss(logits, labels).item(), abs=1e-5)


def test_semantic_loss_allows_unequal_batches_and_checks_shapes():
    logits = torch.randn(3, 5)
    loss = semantic_matching_loss(logits, logits.T, torch.rand(3, 14), torch.rand(5, 14))
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="do not match logits"):
        semantic_matching_loss(logits, logits.T, torch.rand(5, 14), torch.rand(3, 14))
    with pytest.raises(ValueError, match="different numbers of classes"):
        semantic_matching_loss(logits, logits.T, torch.rand(3, 14), torch.rand(5, 13))


def test_paired_losses_reject_unpaired_batches():
    logits = torch.randn(3, 5)
    for loss in (lambda: clip_loss(logits, logits.T), lambda: convirt_loss(logits, logits.T), lambda: sigmoid_loss(logits)):
        with pytest.raises(ValueError, match="paired batches"):
            loss()


def test_gather_with_grad_is_identity_without_process_group():
    tensor = torch.randn(4, 3, requires_grad=True)
    gathered = gather_with_grad(tensor)
    assert gathered is tensor


def test_model_loss_follows_normalize_label_vectors_in_config():
    from conftest import tiny_config

    from modeling_medclip import MedCLIPModel

    logits = torch.randn(4, 6)
    image_labels, text_labels = torch.randint(0, 2, (4, 14)).float(), torch.randint(0, 2, (6, 14)).float()
    for normalize in (False, True):
        model = MedCLIPModel(tiny_config(label_similarity_scale=10.0, normalize_label_vectors=normalize))
        expected = semantic_matching_loss(logits, logits.T, image_labels, text_labels, 10.0, normalize)
        assert model.compute_loss(logits, logits.T, image_labels, text_labels).item() == pytest.approx(expected.item())
