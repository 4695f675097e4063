#!/usr/bin/env python
"""Evaluate a pretrained ConVIRT / MedCLIP model on evaluation tasks: zero-shot classification or retrieval.

    python run_eval.py --model_name_or_path outputs/cpu-demo/final --eval_tasks covid-cxr
    python run_eval.py --model_name_or_path outputs/run/final --task retrieval --eval_tasks covid-cxr
    python run_eval.py --model_name_or_path my-org/medclip --eval_tasks chexpert-5x200=/data/CheXpert-v1.0-small \\
        --push_to_hub --hub_model_id my-org/medclip

Tasks come from the registry in `dataset_scripts/tasks.py` (`--help` lists them); a task's corpus is read from the
path given as `NAME=PATH`, else from its folder in the shared data folder (`$MEDCLIP_SHARED_DATA`). Writes
`eval_results.json` (per task), the ids of each split (`eval_splits/<task>.json`) and the model card to `--output_dir`:
the results are merged into a card that exists there (a training run's), else a new card is written. Prints a
Markdown table. Thin CLI: the protocols live in `modeling_medclip.evaluation`.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import AutoModel, AutoProcessor, HfArgumentParser

from dataset_scripts.tasks import expand_tasks, tasks_help
from modeling_medclip.evaluation import evaluate_split, format_results_table
from modeling_medclip.hub import push_final
from modeling_medclip.model_card import merge_evaluation, write_model_card
from modeling_medclip.training.arguments import HelpFormatter


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Saved model folder or Hub repo id (a ConVIRT or MedCLIP model)."})
    eval_tasks: list[str] = field(metadata={"help": "Evaluation tasks, NAME or NAME=PATH: " + tasks_help() + "."})
    task: Literal["zero-shot", "retrieval"] = field(
        default="zero-shot", metadata={"help": "The protocol: zero-shot classification or retrieval."}
    )
    eval_tasks: list[str] = field(
        default_factory=lambda: ["covid-cxr"],
        metadata={"help": "Evaluation tasks, NAME or NAME=PATH: " + tasks_help() + "."},
    )
    split: Literal["train", "test"] = field(
        default="test", metadata={"help": "Patient-disjoint part to evaluate: the held-out (test) or training patients."}
    )
    test_size: float = field(default=0.2, metadata={"help": "Fraction of patients held out by the split."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient split (use the training run's)."})
    max_eval_images: int | None = field(
        default=None, metadata={"help": "Evaluate each task on at most this many images (seeded subset)."}
    )
    prompts_per_class: int = field(default=10, metadata={"help": "Zero-shot prompts drawn per class."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the prompt draw (reproducible prompts)."})
    batch_size: int = field(default=32, metadata={"help": "Images or texts per forward pass."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where eval_results.json and README.md go. Default: the model folder, or eval/<repo name>."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load with the code saved in the folder instead of the installed package."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload eval_results.json and the model card."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Repo to push to. Default: --model_name_or_path."}
    )
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def resolve_output_dir(args: EvalArguments) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if Path(args.model_name_or_path).is_dir():
        return Path(args.model_name_or_path)
    return Path("eval") / args.model_name_or_path.split("/")[-1]


def evaluate_tasks(model, processor, args: EvalArguments, output_dir: Path) -> dict[str, dict[str, float]]:
    """`{task: metrics}` of the protocol on every task (with its companions); writes each split's ids."""
    results = {}
    for task, location in expand_tasks(args.eval_tasks):
        split = task.split(location, test_size=args.test_size, seed=args.split_seed, part=args.split,
                           max_samples=args.max_eval_images)  # fmt: skip
        task.write_split_ids(split, output_dir / "eval_splits")
        prompts = task.prompts_for(split.class_names, args.prompts_per_class, args.prompt_seed)
        results[task.name] = evaluate_split(model, processor, split, prompts, batch_size=args.batch_size,
                                            protocols=[args.task])  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser(EvalArguments, formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    output_dir = resolve_output_dir(args)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_tasks(model, processor, args, output_dir)

    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = {f"{task}/{name}": value for task, values in results.items() for name, value in values.items()}
    table = format_results_table({args.model_name_or_path: rows})
    notes = (
        f"{args.task} on the patient-disjoint `{args.split}` part (test size {args.test_size}, split seed "
        f"{args.split_seed}) of {', '.join(f'`{task}`' for task in results)}"
        + (f"; {args.prompts_per_class} prompts per class (seed {args.prompt_seed})." if args.task == "zero-shot" else ".")
    )
    card = output_dir / "README.md"
    if card.is_file():
        merge_evaluation(card, results, title=f"{args.task} ({', '.join(results)})", results_table=table, notes=notes)
    else:
        write_model_card(output_dir, model, results, repo_id=args.hub_model_id, results_table=table,
                         evaluation_notes=notes)  # fmt: skip
    print(table)
    if args.push_to_hub:
        push_final(
            output_dir,
            args.hub_model_id or args.model_name_or_path,
            revision=args.hub_revision,
            commit_message="Add evaluation results and model card",
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
