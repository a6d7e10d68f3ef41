"""Run a gated model exported by ``dynprune export`` with numpy and ONNX Runtime only.

This file is copied into every exported directory (``run_gated.py``) beside
``gated.onnx`` (+ ``gated.onnx.data``) and ``gated.json``, so a deployment needs
neither torch, transformers nor dynprune (run with ``PYTHONPATH=exported``, or from inside it)::

    from run_gated import GatedOnnx
    model = GatedOnnx("exported")
    outputs, flops_ratio = model(input_ids, attention_mask, budget=0.5)

Each sample runs alone, at its own length (its padding dropped), through the one
graph: embeddings -> router -> selection under its budget -> only the kept heads,
FFN slices and layers -> task head (dynprune.exec.whole_graph). The graph takes
the FLOPs the sample may spend and the per-unit costs at its length; they come
from the checkpoint's FLOPs model, saved as exact quadratics in the length.
It must import nothing from dynprune (tests/exec/test_export.py checks it
loads with torch unavailable).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = 1
FILES = ("gated.onnx", "gated.json")


class GatedOnnx:
    """An exported gated model (see the module docstring); ``threads`` intra-op threads."""

    def __init__(self, directory: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        root = Path(directory)
        missing = [f for f in FILES if not (root / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{root} is not an exported gated model: missing {', '.join(missing)}")
        meta = json.loads((root / "gated.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{root}/gated.json has format {meta.get('format')!r}, this runtime reads {FORMAT}"
            )
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.meta = meta
        self.token_inputs: list[str] = meta["token_inputs"]
        self._flops: dict[str, list[float]] = meta["flops"]
        so = ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.force_spinning_stop", "1")
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(root / "gated.onnx"), so, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise ValueError(f"ONNX Runtime cannot load {root / 'gated.onnx'}: {err}") from err

    def flops(self, name: str, seq: int) -> float:
        """``dense`` / ``fixed`` / ``head_cost`` / ``slice_cost`` FLOPs of one sample at length ``seq``."""
        a, b, c = self._flops[name]
        return a * seq * seq + b * seq + c

    def run_one(
        self, input_ids: np.ndarray, token_type_ids: np.ndarray | None, budget: float
    ) -> tuple[np.ndarray, float]:
        """One sample's tokens (T,) without padding -> (output (1, ...), executed FLOPs / dense)."""
        number = isinstance(budget, (int, float, np.floating)) and not isinstance(budget, bool)
        if not (number and math.isfinite(budget) and 0 < budget <= 1):
            raise ValueError(f"budget must be a number in (0, 1], got {budget!r}")
        seq = int(input_ids.shape[0])
        if seq < 1:
            raise ValueError("an input has no tokens")
        dense, fixed = self.flops("dense", seq), self.flops("fixed", seq)
        head, slice_ = self.flops("head_cost", seq), self.flops("slice_cost", seq)
        available = math.inf if budget >= 1 else budget * dense - fixed
        if available < 0:
            raise ValueError(
                f"budget {budget:.4f} is below the smallest this gated model can run at sequence length "
                f"{seq}: {fixed / dense:.4f} of dense FLOPs"
            )
        tokens = {
            "input_ids": input_ids[None].astype(np.int64),
            "attention_mask": np.ones((1, seq), dtype=np.int64),
            "token_type_ids": (np.zeros(seq) if token_type_ids is None else token_type_ids)[None].astype(
                np.int64
            ),
        }
        feed = {name: tokens[name] for name in self.token_inputs}
        feed.update(
            router_budget=np.array([budget], dtype=np.float32),
            available=np.array([available], dtype=np.float64),
            head_cost=np.array(head, dtype=np.float64),
            slice_cost=np.array(slice_, dtype=np.float64),
        )
        output, counts = self.session.run(None, feed)
        if budget >= 1:
            return output, 1.0
        keep, heads, slices = counts[0].T.astype(np.float64)  # (L,) each
        return output, (fixed + float((keep * (heads * head + slices * slice_)).sum())) / dense

    def __call__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        token_type_ids: Any = None,
        budget: float | list[float] = 0.5,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A batch (B, T) (any padding, given by ``attention_mask``) -> (outputs (B, ...), FLOPs ratios (B,))."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        budgets = list(budget) if isinstance(budget, (list, tuple, np.ndarray)) else [budget] * len(ids)
        if len(budgets) != len(ids):
            raise ValueError(f"{len(budgets)} budgets for a batch of {len(ids)}")
        types = None if token_type_ids is None else np.asarray(token_type_ids)
        outputs, ratios = [], []
        for row in range(len(ids)):
            keep = mask[row].astype(bool)
            out, ratio = self.run_one(
                ids[row][keep], None if types is None else types[row][keep], budgets[row]
            )
            outputs.append(out)
            ratios.append(ratio)
        return np.concatenate(outputs), np.array(ratios)
