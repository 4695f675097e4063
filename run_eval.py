#!/usr/bin/env python
"""Evaluate a pretrained ConVIRT / MedCLIP folder: zero-shot classification and retrieval, results and a model card.

    python run_eval.py --model_name_or_path outputs/cpu-demo/final
    python run_eval.py --model_name_or_path my-org/medclip-covid --push_to_hub --hub_model_id my-org/medclip-covid

Writes `eval_results.json` and a filled-in model card (`README.md`, from `model_card.md`) to `--output_dir`, and
prints a Markdown table. Thin CLI: everything it does lives in `modeling_medclip.evaluation`.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoModel, AutoProcessor, HfArgumentParser

from modeling_medclip.evaluation import (
    covid_cxr_split,
    covid_prompts,
    evaluate_split,
    format_results_table,
    write_model_card,
)
from modeling_medclip.hub import push_final

DEFAULT_COVID_CXR = Path(__file__).resolve().parent.parent / "shared" / "data" / "covid-cxr"


@dataclass
class EvalArguments:
    model_name_or_path: str = field(metadata={"help": "Saved model folder or Hub repo id (a ConVIRT or MedCLIP model)."})
    data_dir: str = field(
        default=str(DEFAULT_COVID_CXR),
        metadata={"help": "COVID-19 image collection folder (metadata.csv + images/, the shared/data/covid-cxr layout)."},
    )
    split: str = field(default="test", metadata={"help": "Patient-disjoint split to evaluate: train or test."})
    test_size: float = field(default=0.2, metadata={"help": "Fraction of patients held out by the split."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the patient split (use the training run's)."})
    prompts_per_class: int = field(default=10, metadata={"help": "Zero-shot prompts sampled per class."})
    prompt_seed: int = field(default=0, metadata={"help": "Seed of the prompt sampling (reproducible prompts)."})
    batch_size: int = field(default=32, metadata={"help": "Images or texts per forward pass."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where eval_results.json and README.md go (default: the model folder, or eval/<repo name>)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Load with the code saved in the folder instead of the installed package."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload eval_results.json and the model card."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Repo to push to (default: model_name_or_path)."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to."})


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code).eval()
    processor = AutoProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    split = covid_cxr_split(args.data_dir, args.split, args.test_size, args.split_seed)
    prompts = covid_prompts(split.class_names, args.prompts_per_class, args.prompt_seed)
    results = evaluate_split(model, processor, split, prompts, batch_size=args.batch_size)

    if args.output_dir:
        output_dir = Path(args.output_dir)
    elif Path(args.model_name_or_path).is_dir():
        output_dir = Path(args.model_name_or_path)
    else:
        output_dir = Path("eval") / args.model_name_or_path.split("/")[-1]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    table = format_results_table({args.model_name_or_path: results})
    notes = (
        f"COVID-19 image collection, patient-disjoint `{args.split}` split ({results['num_images']} images); "
        f"{args.prompts_per_class} prompts per class (seed {args.prompt_seed})."
    )
    write_model_card(output_dir, model, results, repo_id=args.hub_model_id, results_table=table, evaluation_notes=notes)
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
