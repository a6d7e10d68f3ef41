"""dynprune.train: fine-tune HF models with learned gates to FLOPs budgets.

Public API in :mod:`dynprune.train.api` (re-exported here); the command line
is ``dynprune train`` (:mod:`dynprune.train.cli`); docs/training.md explains the recipe.
"""

from dynprune.train.api import (
    DataConfig,
    DataError,
    OptimConfig,
    Records,
    TaskData,
    TrainConfig,
    collect,
    encode,
    eval_dataloader,
    evaluate,
    finetune,
    load_config,
    load_task_data,
    make_dataloader,
    summarize,
    train,
)

__all__ = [
    "DataConfig",
    "DataError",
    "OptimConfig",
    "Records",
    "TaskData",
    "TrainConfig",
    "collect",
    "encode",
    "eval_dataloader",
    "evaluate",
    "finetune",
    "load_config",
    "load_task_data",
    "make_dataloader",
    "summarize",
    "train",
]
