"""dynprune.train: fine-tune HF models with learned gates to FLOPs budgets.

Public API in :mod:`dynprune.train.api` (re-exported here); the command line
is ``dynprune train`` (:mod:`dynprune.train.cli`); docs/training.md explains the recipe.
"""

from dynprune.train import api as _api
from dynprune.train.api import *  # noqa: F403  (the public API, listed once in api.__all__)

__all__ = list(_api.__all__)
