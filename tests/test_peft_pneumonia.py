"""Adaptation on real data: a LoRA fine-tune and CoOp prompts, each from 1% and 10% of the labels of the pediatric
pneumonia adaptation patients, against the zero-shot classifier of the same base on the held-out patients.

The base is a small MedCLIP pretrained in the test on adult NIH X-rays and IU report sentences (see
`tests/support/pneumonia.py`): a model with some zero-shot skill on another population, as a hospital would
receive it. Every AUC is printed with its 95% patient-bootstrap interval (`pytest -s` shows them).
"""

import math

import pytest
import torch

from modeling_medclip.adapters import apply_adapters
from modeling_medclip.prompt_learning import PromptContext, train_prompt_context
from modeling_medclip.prompts import generate_prompts
from modeling_medclip.zero_shot import ZeroShotClassifier, build_zero_shot_head
from support.pneumonia import (
    build_processor,
    iu_sentences,
    label_fraction,
    load_split,
    nih_images,
    patient_bootstrap_auc,
    patient_splits,
    pretrain_base,
)

pytestmark = pytest.mark.slow
FRACTIONS = (0.01, 0.1)
# the classifier's columns: 0 = pneumonia, 1 = normal (the order of the "rsna" prompt task)
PNEUMONIA = 0
COOP_STEPS = 1000


@pytest.fixture(scope="module")
def task(shared_data):
    processor = build_processor(shared_data / "bio-clinicalbert-tokenizer")
    root = shared_data / "pediatric-pneumonia-cxr"
    splits = {name: load_split(root, rows, processor) for name, rows in patient_splits(root, seed=0).items()}
    assert not set(splits["adapt"].patients) & set(splits["test"].patients)
    texts, text_labels = iu_sentences(shared_data)
    pixel_values, image_labels = nih_images(shared_data, processor)
    base = pretrain_base(pixel_values, image_labels, texts, text_labels, processor.tokenizer)
    zero_shot = ZeroShotClassifier(base, processor, generate_prompts("rsna", n_per_class=10, seed=0))
    test = splits["test"]
    test_embeddings = zero_shot.encode_images(test.pixel_values)
    scores = zero_shot.classify_embeddings(test_embeddings).probs[:, PNEUMONIA]
    baseline = patient_bootstrap_auc(test.labels, scores, test.patients)
    print(f"\nzero-shot, hand-written prompts: AUC {_format(baseline)} on "
          f"{len(test.labels)} images of {len(set(test.patients))} test patients")
    return dict(processor=processor, splits=splits, base=base, zero_shot=zero_shot,
                test_embeddings=test_embeddings, baseline=baseline)


def _format(interval) -> str:
    return f"{interval.value:.3f} [{interval.low:.3f}, {interval.high:.3f}]"


def _targets(labels: torch.Tensor) -> torch.Tensor:
    """Split labels (1 = pneumonia) as the classifier's column indices."""
    return torch.where(labels == 1, PNEUMONIA, 1 - PNEUMONIA)


def test_base_has_some_zero_shot_skill(task):
    assert task["baseline"].value > 0.55


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_lora_fine_tune_beats_zero_shot(task, fraction):
    train = label_fraction(task["splits"]["adapt"], fraction, seed=0)
    # the classifier starts as the zero-shot head (class embeddings of the prompts), LoRA on the vision tower
    model = apply_adapters(build_zero_shot_head(task["zero_shot"]), method="lora", towers=("vision",), r=8)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"\nLoRA fine-tune: {trainable:,} of {total:,} parameters trainable")
    # the towers are tiny (16-64 channels), so rank 8 is a large share of them; on ResNet-50 + BERT-base the same
    # defaults train 1.4% of the parameters (benchmarks/bench_peft.py)
    assert trainable < 0.25 * total
    targets = _targets(train.labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    epochs = max(3, 300 // len(targets))  # about 300 images seen at 1%, three epochs at 10%
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(16):
            model(pixel_values=train.pixel_values[batch], labels=targets[batch]).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    test = task["splits"]["test"]
    with torch.no_grad():
        scores = torch.cat([model(pixel_values=x).logits.softmax(-1)[:, PNEUMONIA] for x in test.pixel_values.split(128)])
    result, baseline = patient_bootstrap_auc(test.labels, scores, test.patients), task["baseline"]
    print(f"LoRA, {fraction:.0%} of the labels ({len(targets)} images, {epochs} epochs): AUC {_format(result)} vs "
          f"zero-shot {_format(baseline)}")
    assert result.value > baseline.value


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_coop_prompts_beat_hand_written_prompts(task, fraction):
    base, processor, zero_shot = task["base"], task["processor"], task["zero_shot"]
    train = label_fraction(task["splits"]["adapt"], fraction, seed=0)
    context = PromptContext.initialize(base, processor.tokenizer, ["pneumonia", "normal"],
                                       init_text="chest x-ray showing")
    epochs = math.ceil(COOP_STEPS / math.ceil(len(train.labels) / 32))  # the same number of steps at each fraction
    losses = train_prompt_context(base, processor.tokenizer, context, zero_shot.encode_images(train.pixel_values),
                                  _targets(train.labels), epochs=epochs, batch_size=32, learning_rate=2e-3)
    print(f"\nCoOp: {context.context.numel():,} trainable numbers; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    learned = ZeroShotClassifier(base, processor, context)
    test = task["splits"]["test"]
    scores = learned.classify_embeddings(task["test_embeddings"]).probs[:, PNEUMONIA]
    result, baseline = patient_bootstrap_auc(test.labels, scores, test.patients), task["baseline"]
    print(f"CoOp, {fraction:.0%} of the labels ({len(train.labels)} images): AUC {_format(result)} vs hand-written "
          f"prompts {_format(baseline)}")
    assert result.value > baseline.value
