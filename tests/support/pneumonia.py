"""The pediatric pneumonia adaptation experiment of the PEFT tests: patient-disjoint splits of
`pediatric-pneumonia-cxr`, a briefly pretrained tiny MedCLIP base, AUCs with patient-bootstrap intervals (`modeling_medclip.metrics.bootstrap_ci`).

The base is pretrained here because no trained model ships with the tests, and on another population, as a
hospital would receive it: MedCLIP's decoupled semantic loss on the 1,000 adult NIH ChestX-ray14 images of
`nih-cxr14-1000` (their NIH labels mapped to CheXpert label vectors) against real IU X-ray report sentences with the
Stanford CheXpert labeler's labels (`chexpert-labeler-iu/sentences-dev.csv`). Adaptation then uses a few labels of
the *adaptation* patients of the pediatric set, and everything is scored on its *test* patients, disjoint from them.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from transformers import AutoTokenizer, BertConfig, ResNetConfig

from modeling_medclip import MedCLIPConfig, MedCLIPImageProcessor, MedCLIPModel, MedCLIPProcessor
from modeling_medclip.labeler import CHEXPERT_CLASSES
from modeling_medclip.metrics import ConfidenceInterval, bootstrap_ci

IMAGE_SIZE = 64
# share of the patients in each split, and at most this many images of the pretraining / test patients (speed)
SPLIT_FRACTIONS = {"adapt": 0.7, "test": 0.3}
MAX_IMAGES = {"test": 600}
# NIH ChestX-ray14 findings as CheXpert observations (Infiltration is read as Lung Opacity; the rest have no match)
NIH_TO_CHEXPERT = {
    "No Finding": "No Finding", "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
    "Consolidation": "Consolidation", "Edema": "Edema", "Effusion": "Pleural Effusion", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Infiltration": "Lung Opacity", "Mass": "Lung Lesion", "Nodule": "Lung Lesion",
}


@dataclass
class Split:
    """Preprocessed images of one patient split: `pixel_values` `(N, 1, S, S)`, `labels` `(N,)` (1 = pneumonia) and
    `patients` `(N,)` patient ids."""

    pixel_values: torch.Tensor
    labels: torch.Tensor
    patients: np.ndarray


def build_processor(tokenizer_dir, size: int = IMAGE_SIZE) -> MedCLIPProcessor:
    image_processor = MedCLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return MedCLIPProcessor(image_processor, AutoTokenizer.from_pretrained(tokenizer_dir))


def sample_xrays(root, per_class: int) -> tuple[list[Image.Image], torch.Tensor]:
    """The first `per_class` normal and pneumonia X-rays of `metadata.csv`, and their labels (1 = pneumonia)."""
    metadata = pd.read_csv(root / "metadata.csv")
    rows = pd.concat([metadata[metadata.label == "normal"].head(per_class),
                      metadata[metadata.label != "normal"].head(per_class)])
    images = [Image.open(root / path).convert("L") for path in rows.image]
    return images, torch.tensor((rows.label != "normal").to_numpy(), dtype=torch.long)


def patient_splits(root, seed: int = 0) -> dict[str, pd.DataFrame]:
    """`metadata.csv` split by patient (seeded) into adaptation and test rows that never share a patient."""
    metadata = pd.read_csv(root / "metadata.csv")
    patients = np.random.default_rng(seed).permutation(metadata.patient_id.unique())
    bounds = np.cumsum([int(round(fraction * len(patients))) for fraction in SPLIT_FRACTIONS.values()])
    groups = dict(zip(SPLIT_FRACTIONS, np.split(patients, bounds[:-1])))
    splits = {}
    for name, group in groups.items():
        rows = metadata[metadata.patient_id.isin(set(group))]
        if name in MAX_IMAGES and len(rows) > MAX_IMAGES[name]:
            rows = rows.sample(MAX_IMAGES[name], random_state=seed)
        splits[name] = rows.reset_index(drop=True)
    return splits


def load_split(root, rows: pd.DataFrame, processor: MedCLIPProcessor) -> Split:
    images = [Image.open(root / path) for path in rows.image]
    pixel_values = torch.cat([processor(images=images[i : i + 256], return_tensors="pt")["pixel_values"]
                              for i in range(0, len(images), 256)])
    labels = torch.tensor((rows.label != "normal").to_numpy(), dtype=torch.long)
    return Split(pixel_values, labels, rows.patient_id.to_numpy())


def label_fraction(split: Split, fraction: float, seed: int = 0) -> Split:
    """A seeded random `fraction` of the split's images (at least two of each class), as a labelled training set."""
    generator = np.random.default_rng(seed)
    labels = split.labels.numpy()
    chosen = generator.choice(len(labels), size=max(4, int(round(fraction * len(labels)))), replace=False)
    for label in (0, 1):  # both classes present
        if (labels[chosen] == label).sum() < 2:
            chosen = np.concatenate([chosen, generator.choice(np.flatnonzero(labels == label), 2, replace=False)])
    index = torch.from_numpy(np.sort(chosen))
    return Split(split.pixel_values[index], split.labels[index], split.patients[index.numpy()])


def iu_sentences(shared_data) -> tuple[list[str], torch.Tensor]:
    """The labelled IU X-ray sentences: texts and `(N, 14)` CheXpert label vectors (1 = positive, else 0)."""
    frame = pd.read_csv(shared_data / "chexpert-labeler-iu" / "sentences-dev.csv")
    frame = frame[frame.Reports.str.strip().str.len() > 0]
    labels = torch.tensor((frame[list(CHEXPERT_CLASSES)] == 1.0).to_numpy(), dtype=torch.float32)
    return frame.Reports.str.strip().tolist(), labels


def nih_images(shared_data, processor: MedCLIPProcessor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 NIH images as pixel values and `(N, 14)` CheXpert label vectors of their NIH findings."""
    root = shared_data / "nih-cxr14-1000"
    frame = pd.read_csv(root / "Data_Entry_2017_v2020.csv")
    vectors = torch.zeros(len(frame), len(CHEXPERT_CLASSES))
    for row, findings in enumerate(frame["Finding Labels"]):
        for finding in findings.split("|"):
            if finding in NIH_TO_CHEXPERT:
                vectors[row, CHEXPERT_CLASSES.index(NIH_TO_CHEXPERT[finding])] = 1.0
    images = [Image.open(root / "images" / name) for name in frame["Image Index"]]
    return processor(images=images, return_tensors="pt")["pixel_values"], vectors


def pretrain_base(pixel_values: torch.Tensor, image_labels: torch.Tensor, texts: list[str],
                  text_labels: torch.Tensor, tokenizer, steps: int = 200, batch_size: int = 32,
                  seed: int = 0) -> MedCLIPModel:
    """A small MedCLIP (ResNet 16-32-64, 2-layer BERT-64) trained `steps` decoupled steps of the semantic loss."""
    torch.manual_seed(seed)
    config = MedCLIPConfig(
        vision_config=ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1]),
        text_config=BertConfig(vocab_size=28996, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=128),
        projection_dim=64, text_pooling="mean", label_similarity_scale=10.0,
    )
    model = MedCLIPModel(config).train()
    # half of every text batch mentions a finding (few IU sentences do), so abnormal images meet their texts
    abnormal = torch.nonzero(text_labels[:, CHEXPERT_CLASSES.index("No Finding")] == 0).squeeze(1)
    normal = torch.nonzero(text_labels[:, CHEXPERT_CLASSES.index("No Finding")] == 1).squeeze(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        images = torch.randint(len(image_labels), (batch_size,), generator=generator)
        text_index = torch.cat([abnormal[torch.randint(len(abnormal), (batch_size // 2,), generator=generator)],
                                normal[torch.randint(len(normal), (batch_size // 2,), generator=generator)]])
        tokens = tokenizer([texts[i] for i in text_index], padding=True, truncation=True, max_length=48,
                           return_tensors="pt")
        loss = model(**tokens, pixel_values=pixel_values[images], image_labels=image_labels[images],
                     text_labels=text_labels[text_index], return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def patient_bootstrap_auc(labels: torch.Tensor, scores: torch.Tensor, patients: np.ndarray) -> ConfidenceInterval:
    """ROC AUC and its 95% interval over 1,000 bootstrap resamples of whole patients."""
    return bootstrap_ci(roc_auc_score, labels.numpy(), scores.detach().numpy(), groups=patients)
