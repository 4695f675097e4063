"""Contrastive pretraining of ConVIRT and MedCLIP with Accelerate, one role per module (as open_clip separates them):

- `arguments.py`: the argument dataclasses and their parsing (presets, JSON / YAML files, flags);
- `presets.py`: the named runs;
- `factory.py`: the model and processor from names;
- `optim.py`: parameter groups, optimizer, `transformers.get_scheduler`;
- `data.py`: the training streams from the builder registry, collation, loaders;
- `trainer.py`: [`ContrastiveTrainer`], the optimizer step (global-batch negatives, accumulation);
- `validation.py`: held-out loss and the evaluation tasks;
- `headline.py`: the tasks' headline numbers with patient-bootstrap confidence intervals, and their ROC curves;
- `loop.py`: [`train`], the run (state, loop, validate, save, finish).

Checkpoints and Hub uploads are in `modeling_medclip.checkpointing` and `modeling_medclip.hub`.
"""

from .arguments import (
    DataArguments,
    ModelArguments,
    OptimizationArguments,
    PretrainArguments,
    build_parser,
    parse_args,
)
from .data import MicroBatches, SeededCollate, build_train_stream
from .factory import build_model_and_processor
from .loop import TrainResult, train
from .optim import build_optimizer, build_scheduler, parameter_groups
from .presets import DEFAULT_PRESET, PRESETS
from .trainer import ContrastiveTrainer, StepOutput
from .validation import Validation, build_validation, evaluate, results_table

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "ContrastiveTrainer",
    "DataArguments",
    "MicroBatches",
    "ModelArguments",
    "OptimizationArguments",
    "PretrainArguments",
    "SeededCollate",
    "StepOutput",
    "TrainResult",
    "Validation",
    "build_model_and_processor",
    "build_optimizer",
    "build_parser",
    "build_scheduler",
    "build_train_stream",
    "build_validation",
    "evaluate",
    "parameter_groups",
    "parse_args",
    "results_table",
    "train",
]
