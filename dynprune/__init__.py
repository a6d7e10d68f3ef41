"""dynprune: input-adaptive structured pruning of Hugging Face Transformers.

gated = dynprune.wrap(model, dynprune.GateConfig(...))
out = gated(input_ids=..., attention_mask=..., budget=0.5)
gated.last.flops_ratio          # executed FLOPs / dense, per sample
"""

from dynprune.arch import ARCH_TABLE, ArchSpec, UnsupportedModelError
from dynprune.budget import MeanBudget, TimeBudget, parse_budget
from dynprune.calibration import BudgetModeError, Calibration, GovernedMean, MissingCalibrationError, govern
from dynprune.config import GateConfig
from dynprune.cost_model import CostTable, IncompatibleCostTableError, MissingCostTableError
from dynprune.gates import Gates, GateScores, UnitMasks
from dynprune.io import IncompatibleGatesError, load_gated_model, load_gates, save_gated_model, save_gates
from dynprune.kv_cache import GatedKVCache
from dynprune.model import GatedModel, unwrap, wrap
from dynprune.state import ForwardInfo

__version__ = "0.1.0"

__all__ = [
    "ARCH_TABLE",
    "ArchSpec",
    "BudgetModeError",
    "Calibration",
    "CostTable",
    "ForwardInfo",
    "GateConfig",
    "GateScores",
    "GatedKVCache",
    "GatedModel",
    "Gates",
    "GovernedMean",
    "IncompatibleCostTableError",
    "IncompatibleGatesError",
    "MeanBudget",
    "MissingCalibrationError",
    "MissingCostTableError",
    "TimeBudget",
    "UnitMasks",
    "UnsupportedModelError",
    "__version__",
    "govern",
    "load_gated_model",
    "load_gates",
    "parse_budget",
    "save_gated_model",
    "save_gates",
    "unwrap",
    "wrap",
]
