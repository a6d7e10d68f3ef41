"""Early exit (DeeBERT / PABEE style): a classifier after every layer, exit when it is confident.

:class:`EarlyExitModel` wraps a fine-tuned HF encoder classifier (BERT, RoBERTa):
after layer ``k`` (1-based) an exit head — a copy of the model's own task head
(pooler + classifier) reading the mean of the real tokens; the last exit *is* that head,
reading CLS — predicts the label. At
inference a sample leaves at the first exit whose max softmax probability is
``>= threshold`` (the last exit always answers); the samples still running go
on as a smaller batch, so the layers after a sample's exit are really not
computed for it.

FLOPs (dynprune.flops conventions, per sample at the batch's padded length T):
leaving at exit ``k`` costs ``k * (layer_cost(T) + task_head(T))``: the layers
run plus every exit head evaluated on the way (softmax/max cost nothing).

Width and depth together (the sweep's ``static_early_exit``): the wrapped model may be a
physically pruned one (:func:`dynprune.eval.physical.physically_prune`) with its
:class:`~dynprune.eval.structure.Structure`; then layer ``k`` costs what its kept heads and
neurons cost (``Structure.layer_flops``) and there is one exit per kept layer.

Training (:class:`EarlyExitObjective`): every exit gets the dense objective
(labels + distillation from the same teacher, with the same weights as every
other method), averaged with PABEE's weights ``k / sum(k)``; the backbone and
all heads train together, with ``dynprune.train.finetune``'s loop and steps; exits 1..L-1
are new modules and get the added parameters' learning rate (``optim.router_lr``, what a gated
model's router gets): at the backbone's rate they did not learn on 20 Newsgroups in the
quick recipe's 124 steps (every early exit at chance, results/news20/quick_3seeds/).

:func:`calibrate_threshold` fits the threshold on the validation split so that
the mean FLOPs ratio is the largest one not above the target.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from dynprune.eval.runners import Batch, Runner
from dynprune.eval.structure import Structure
from dynprune.train.data import model_inputs
from safetensors.torch import load_model, save_model
from torch import nn

from dynprune.arch import layer_stack
from dynprune.flops import FlopsModel
from dynprune.governor import MeanGovernor
from dynprune.router import masked_mean

Tensor = torch.Tensor
SUPPORTED = ("bert", "roberta")


class ExitHead(nn.Module):
    """The task head of an HF ``*ForSequenceClassification`` model applied to a hidden state.

    ``mean_pool``: the head reads the mean of the sequence's real tokens instead of its first
    (CLS) token. Intermediate exits do: a shallow layer's CLS state carries little of the text
    (on 20 Newsgroups, exits 1-3 reading CLS stayed at chance after fine-tuning), the tokens'
    mean does (all-MiniLM-L6-v2 was itself trained as a mean-pooled sentence encoder)."""

    def __init__(
        self, pooler: nn.Module | None, dropout: nn.Module, classifier: nn.Module, mean_pool: bool = False
    ) -> None:
        super().__init__()
        self.pooler, self.dropout, self.classifier = pooler, dropout, classifier
        self.mean_pool = mean_pool

    @classmethod
    def of(cls, model: nn.Module) -> ExitHead:
        """The model's own head modules (shared, not copied)."""
        pooler = getattr(model.base_model, "pooler", None)
        return cls(pooler, getattr(model, "dropout", nn.Identity()), model.classifier)

    def forward(self, hidden: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, T, H), (B, T) -> (B, C)
        if self.mean_pool:  # the real tokens' mean stands in the CLS position the head reads
            hidden = masked_mean(hidden, mask)[:, None, :]  # (B, 1, H)
        if self.pooler is not None:  # BERT: pooler(CLS) -> dropout -> linear
            return self.classifier(self.dropout(self.pooler(hidden)))
        return self.classifier(hidden)  # RoBERTa's head takes the CLS position itself


@dataclass
class ExitResult:
    logits: Tensor  # (B, C) of the exit each sample left at
    exit_layer: Tensor  # (B,) int64, 1-based
    flops: Tensor  # (B,) float64


class EarlyExitModel(nn.Module):
    """A classifier with an exit after every layer (see module docstring)."""

    def __init__(self, model: nn.Module, structure: Structure | None = None) -> None:
        """``structure``: the kept units when ``model`` is physically pruned (None: unpruned)."""
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in SUPPORTED:
            raise ValueError(f"early_exit supports model types {SUPPORTED}, got {model_type!r}")
        self.model = model
        self.parts = layer_stack(model)
        if structure is not None and sum(structure.layers) != self.parts.n_layers:
            raise ValueError(
                f"early_exit: the structure keeps {sum(structure.layers)} layers, the model has "
                f"{self.parts.n_layers}: pass the structure the model was pruned to"
            )
        self.structure = structure
        final = ExitHead.of(model)
        # exits 1..L-1 start as copies of the fine-tuned head reading the tokens' mean; exit L is the
        # model's own head
        early = [copy.deepcopy(final) for _ in range(self.parts.n_layers - 1)]
        for head in early:
            head.mean_pool = True
        self.heads = nn.ModuleList([*early, final])

    @property
    def n_exits(self) -> int:
        return len(self.heads)

    def exit_costs(self, fm: FlopsModel, seq_len: int) -> np.ndarray:
        """FLOPs of leaving at exit 1..L for one sample at padded length ``seq_len``: (L,)."""
        return exit_costs(fm, seq_len, self.n_exits, self.structure)

    def added_parameters(self) -> Iterator[nn.Parameter]:
        """The exit heads 1..L-1 (the last exit is the model's own head): new modules, trained with
        the added parameters' learning rate, as a gated model's router is
        (``dynprune.train.trainer.param_groups``)."""
        return self.heads[:-1].parameters()

    def _embed(self, inputs: Batch) -> tuple[Tensor, Tensor | None]:
        from transformers.masking_utils import create_bidirectional_mask

        emb = self.parts.embeddings(
            input_ids=inputs["input_ids"], token_type_ids=inputs.get("token_type_ids")
        )  # (B, T, H)
        mask = inputs.get("attention_mask")
        if mask is None:
            return emb, None
        # the mask HF's encoders build for their attention implementation, (B, 1, T|1, T) or None
        # (public API: the backbone's private _create_attention_masks changed its signature in 5.25)
        attn = create_bidirectional_mask(
            config=self.parts.backbone.config, inputs_embeds=emb, attention_mask=mask
        )
        return emb, attn

    def _layer(self, k: int, hidden: Tensor, attn: Tensor | None) -> Tensor:
        out = self.parts.layers[k](hidden, attention_mask=attn)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, **inputs: Tensor) -> SimpleNamespace:
        """Every exit on every sample (training): ``.exit_logits`` (L, B, C), ``.logits`` = last exit."""
        hidden, attn = self._embed(inputs)
        mask = inputs.get("attention_mask")
        exits = []
        for k in range(self.n_exits):
            hidden = self._layer(k, hidden, attn)
            exits.append(self.heads[k](hidden, mask))
        stacked = torch.stack(exits)
        return SimpleNamespace(logits=stacked[-1], exit_logits=stacked)

    @torch.inference_mode()
    def exit_profile(self, batch: Batch) -> Tensor:
        """Max softmax probability of every exit: (L, B) (for calibration)."""
        out = self(**model_inputs(batch))
        return out.exit_logits.float().softmax(-1).amax(-1)

    @torch.inference_mode()
    def infer(self, batch: Batch, threshold: float, fm: FlopsModel) -> ExitResult:
        """Exit each sample at its first exit with confidence >= threshold; later layers not run for it."""
        inputs = model_inputs(batch)
        hidden, attn = self._embed(inputs)
        mask = inputs.get("attention_mask")  # (B, T): the rows still running, like attn
        n, seq = hidden.shape[0], hidden.shape[1]
        costs = torch.from_numpy(self.exit_costs(fm, seq))  # (L,) float64, cumulative
        active = torch.arange(n, device=hidden.device)  # rows of the batch still running
        logits: Tensor | None = None
        exit_layer = torch.zeros(n, dtype=torch.int64)
        for k in range(self.n_exits):
            hidden = self._layer(k, hidden, attn)
            out = self.heads[k](hidden, mask)  # (A, C) for the A rows still running
            if logits is None:
                logits = out.new_zeros(n, out.shape[-1])
            last = k == self.n_exits - 1
            leave = (
                torch.ones_like(active, dtype=torch.bool)
                if last
                else out.float().softmax(-1).amax(-1) >= threshold
            )
            logits[active[leave]] = out[leave]
            exit_layer[active[leave].cpu()] = k + 1
            keep = ~leave
            if not bool(keep.any()):
                break
            active, hidden = active[keep], hidden[keep]
            attn = None if attn is None else attn[keep]
            mask = None if mask is None else mask[keep]
        assert logits is not None
        return ExitResult(logits, exit_layer, costs[exit_layer - 1])


def exit_costs(fm: FlopsModel, seq_len: int, n_exits: int, structure: Structure | None = None) -> np.ndarray:
    """FLOPs of leaving at exit 1..L for one sample at padded length ``seq_len``: (L,): the layers
    run plus every exit head on the way. ``structure``: a pruned model's kept units (one exit per
    kept layer, each layer at its own cost); None: ``n_exits`` full layers."""
    layers = (
        np.full(n_exits, fm.layer_cost(seq_len))
        if structure is None
        else np.array(structure.layer_flops(fm, seq_len))
    )
    if len(layers) != n_exits:
        raise ValueError(f"exit_costs: {n_exits} exits but the structure keeps {len(layers)} layers")
    return np.cumsum(layers + fm.task_head(seq_len))


def exits_at(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """1-based exit of every sample: the first exit with confidence >= threshold, else the last.

    confidence (L, N) -> (N,)."""
    hit = confidence >= threshold
    hit[-1] = True
    return hit.argmax(0) + 1


def calibrate_threshold(confidence: np.ndarray, ratios: np.ndarray, target: float) -> tuple[float, float]:
    """The threshold whose mean FLOPs ratio on these samples is the largest one <= ``target``.

    confidence (L, N): max softmax of every exit; ratios (L, N): FLOPs ratio to dense of leaving at
    each exit. A higher threshold exits later (more FLOPs), so the mean ratio is monotone in it.
    Returns (threshold, mean ratio it gives here).
    """
    if not 0.0 < target <= 1.5:
        raise ValueError(f"early-exit target must be a mean FLOPs ratio in (0, 1.5], got {target}")
    n = confidence.shape[1]
    candidates = np.unique(np.concatenate([confidence[:-1].ravel(), [0.0, np.inf]]))

    def mean_ratio(t: float) -> float:
        return float(ratios[exits_at(confidence, t) - 1, np.arange(n)].mean())

    lo, hi = 0, len(candidates) - 1  # mean_ratio(candidates[lo]) is the cheapest possible
    if mean_ratio(candidates[lo]) > target:
        raise ValueError(
            f"early exit cannot reach a mean FLOPs ratio of {target}: leaving every sample at the first "
            f"exit already costs {mean_ratio(candidates[lo]):.3f} of dense"
        )
    while lo < hi:  # the largest candidate index whose mean ratio is <= target
        mid = (lo + hi + 1) // 2
        if mean_ratio(candidates[mid]) <= target:
            lo = mid
        else:
            hi = mid - 1
    t = float(candidates[lo])
    return t, mean_ratio(t)


def threshold_governor(
    confidence: np.ndarray, ratios: np.ndarray, target: float, prior: int = 128
) -> MeanGovernor:
    """A :class:`MeanGovernor` whose knob is the exit threshold, solved by :func:`calibrate_threshold`
    on these samples (confidence, ratios: (L, N)); it may aim anywhere between every sample leaving
    at the first exit and every sample running to the last."""
    bounds = (float(ratios[0].mean()), float(ratios[-1].mean()))
    return MeanGovernor(target, lambda aim: calibrate_threshold(confidence, ratios, aim), bounds, prior)


class EarlyExitObjective:
    """The dense objective (labels + distillation) at every exit, PABEE-weighted (k / sum k)."""

    name = "early_exit"

    def __init__(self, distill: Any) -> None:
        from dynprune.train.objectives import DenseObjective

        self.dense = DenseObjective(distill)

    def begin_step(self, step: int, total: int) -> dict[str, float]:
        return self.dense.begin_step(step, total)

    def loss(self, model: nn.Module, batch: dict[str, Tensor], step: int, micro: int):
        out = model(**model_inputs(batch))
        n = out.exit_logits.shape[0]
        total, logs = 0.0, {}
        for k in range(n):  # the one dense loss, applied to exit k's logits
            exit_k = SimpleNamespace(logits=out.exit_logits[k])
            loss_k, logs = self.dense.loss(lambda _o=exit_k, **_: _o, batch, step, micro)
            total = total + (k + 1) / (n * (n + 1) / 2) * loss_k
        return total, logs  # logs of the last exit

    def after_step(self, reduce: Any) -> None:
        self.dense.after_step(reduce)

    def state_dict(self) -> dict[str, Any]:
        return self.dense.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dense.load_state_dict(state)


def save_early_exit(model: EarlyExitModel, path: Path, info: dict[str, Any]) -> None:
    """The whole multi-exit model (the backbone is fine-tuned too) plus ``info`` as JSON; the
    last exit shares its modules with the wrapped model (safetensors' save_model stores them once)."""
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path / "early_exit.safetensors"))
    (path / "early_exit.json").write_text(json.dumps(info, indent=1))


def load_early_exit(
    base: nn.Module, path: Path, structure: Structure | None = None
) -> tuple[EarlyExitModel, dict[str, Any]]:
    """``base``: a model of the same architecture (e.g. the dense model, or the pruned model of
    ``structure``); its weights are replaced."""
    model = EarlyExitModel(base, structure)
    load_model(model, str(path / "early_exit.safetensors"))
    return model.eval(), json.loads((path / "early_exit.json").read_text())


class EarlyExitRunner(Runner):
    """The sweep's runner: exit at ``threshold``; FLOPs per sample as counted by :meth:`infer`.

    With a ``governor`` (:class:`dynprune.governor.MeanGovernor`) the threshold is the governor's
    knob (``threshold`` is then only its starting point's record), and every call reports what it
    spent so the next one lands the running mean on its target. ``exit_log``: the exit layers of
    every call of the accuracy pass, in call order (:meth:`end_evaluation` stops it: timing calls
    add nothing)."""

    def __init__(
        self,
        model: EarlyExitModel,
        threshold: float,
        fm: FlopsModel,
        name: str = "early_exit",
        governor: MeanGovernor | None = None,
    ):
        super().__init__()
        self.model, self.threshold, self.fm, self.name = model, threshold, fm, name
        self.governor = governor
        self.last_exits: Tensor | None = None
        self.exit_log: list[Tensor] = []

    def __call__(self, batch: Batch) -> Tensor:
        threshold = self.threshold if self.governor is None else self.governor.knob
        res = self.model.infer(batch, threshold, self.fm)
        self.last_flops, self.last_exits = res.flops, res.exit_layer
        if self.evaluating:
            self.exit_log.append(res.exit_layer)
        if self.governor is not None:
            self.governor.observe((res.flops / self.fm.dense(batch["input_ids"].shape[1])).numpy())
        return res.logits
