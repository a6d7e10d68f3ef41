"""`dynprune train` with ``task: causal_lm``: an optional dense fine-tune of the causal LM on the
training windows (next-token cross-entropy), then its routers (and optionally the base) learn by
distillation from the dense model under the Lagrangian FLOPs target.

Output directory::

    OUTPUT_DIR/config.yaml, run.json
    OUTPUT_DIR/dense/                with stages [dense, gated]: the fine-tuned dense model (HF
                                     model dir + tokenizer; the gated stage's start and teacher)
    OUTPUT_DIR/gated/gates/          the learned routers (dynprune.save_gates); base frozen
    OUTPUT_DIR/gated/base/           only with lm.tune_base: the tuned base (HF model dir)
    OUTPUT_DIR/<stage>/metrics.json  validation metrics (marks the stage done)
    OUTPUT_DIR/checkpoints/<stage>/step-XXXXXXXX/   resumable training state

The dense stage runs as many steps as the gated stage (``optim.gated_epochs`` / ``max_steps``)
at ``optim.dense_lr``. The gated stage starts from the dense stage's saved model (or the base
itself with ``stages: [gated]``); its teacher is that model, frozen. Per training window a budget
is drawn (GatedObjective.sample_budgets); the router reads the whole window and its gates hold
for every position (the per-sequence decision a generation makes at prefill,
docs/architecture.md "KV cache"). Evaluation here routes each validation window the same way;
``dynprune eval perplexity --gates OUTPUT_DIR/gated/gates`` scores held-out books with the
decision taken from the prompt only.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from dynprune.train import checkpoint as ckpt
from dynprune.train.config import TrainConfig
from dynprune.train.lm_data import LMData, load_lm_data
from dynprune.train.losses import logits_distillation
from dynprune.train.objectives import DenseObjective, GatedObjective
from dynprune.train.preflight import PreflightError, check_output_dir

import dynprune

Tensor = torch.Tensor
Teacher = Callable[[Tensor], Tensor]  # input_ids (B, T) -> logits (B, T, V), no grad


def stack_windows(examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Equal-length windows -> {"input_ids": (B, T)} (the Trainer's collate)."""
    return {"input_ids": torch.stack([e["input_ids"] for e in examples])}


def next_token_ce(logits: Tensor, ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the next-token predictions of (B, T, V) logits on the windows (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction=reduction)


class NextTokenObjective(DenseObjective):
    """The causal-LM dense stage: next-token cross-entropy on the training windows."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], step: int, micro: int):
        ids = batch["input_ids"]
        ce = next_token_ce(model(input_ids=ids, use_cache=False).logits, ids)
        return ce, {"loss_task": ce.detach()}


class CausalLMObjective(GatedObjective):
    """KL(teacher ‖ student) on every next-token distribution (+ optional next-token CE) + the
    GatedObjective's Lagrangian FLOPs target, schedules and budget sampling."""

    name = "gated"

    def __init__(self, core, cfg: TrainConfig, seed: int, teacher: Teacher, rank: int = 0) -> None:
        super().__init__(core, cfg.gate, cfg.regularizer, cfg.distill, seed, rank)
        self.teacher_logits = teacher

    def loss(self, model: torch.nn.Module, batch: dict[str, Tensor], step: int, micro: int):
        ids = batch["input_ids"]  # (B, T)
        teacher = self.teacher_logits(ids)  # before the student: the student's forward sets core.last
        budgets = self.sample_budgets(ids.shape[0], step, micro).to(ids.device)
        logits = model(input_ids=ids, budget=budgets, use_cache=False).logits  # (B, T, V)
        d = self.distill
        logs: dict[str, Any] = {}
        loss = logits.new_zeros(())
        if d.logits_weight > 0:
            kd = logits_distillation(logits.flatten(0, 1), teacher.flatten(0, 1), d.temperature)  # per token
            loss = loss + d.logits_weight * kd
            logs["loss_kd"] = kd.detach()
        if d.task_weight > 0:
            ce = next_token_ce(logits, ids)
            loss = loss + d.task_weight * ce
            logs["loss_task"] = ce.detach()
        return loss + self.flops_penalty(budgets, logs), logs


def frozen_self_teacher(gated) -> Teacher:
    """The dense base as teacher when it is frozen: the gated model at budget 1.0 (HF's own
    forward), eval mode (no dropout), no grad."""

    def logits(ids: Tensor) -> Tensor:
        was = gated.training
        gated.eval()
        try:
            with torch.no_grad():
                return gated(input_ids=ids, budget=1.0, use_cache=False).logits.float()
        finally:
            gated.train(was)

    return logits


def copy_teacher(base: torch.nn.Module) -> Teacher:
    """A frozen copy of the base (made before wrapping) as teacher, for lm.tune_base."""
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    return lambda ids: teacher(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Tensor, batch_size: int) -> float:
    """Perplexity of a plain causal LM on the next tokens of the windows ``data`` (N, T), eval mode."""
    was = model.training
    model.eval()
    try:
        nll = sum(
            float(next_token_ce(model(input_ids=ids, use_cache=False).logits, ids, "sum"))
            for ids in data.split(batch_size)
        )
    finally:
        model.train(was)
    return math.exp(nll / data[:, 1:].numel())


@torch.no_grad()
def evaluate_lm(
    gated, teacher: Teacher, data: Tensor, budgets: list[float], batch_size: int
) -> dict[str, float]:
    """Per budget on the windows ``data`` (N, T): mean per-token KL(teacher ‖ student), perplexity
    of the whole window's next tokens, executed FLOPs ratio (the router reads each whole window);
    and the teacher's own perplexity."""
    was = gated.training
    gated.eval()
    out: dict[str, float] = {}
    try:
        teacher_nll = 0.0
        for b in [1.0, *budgets]:
            kl = nll = 0.0
            ratios = []
            for ids in data.split(batch_size):
                t = teacher(ids)
                s = gated(input_ids=ids, budget=b, use_cache=False).logits.float()
                ratios.append(gated.last.flops_ratio.double())
                kl += float(logits_distillation(s.flatten(0, 1), t.flatten(0, 1), 1.0)) * ids.numel()
                nll += float(next_token_ce(s, ids, "sum"))
                if b == 1.0:
                    teacher_nll += float(next_token_ce(t, ids, "sum"))
            out[f"kl@{b}"] = kl / data.numel()
            out[f"perplexity@{b}"] = math.exp(nll / data[:, 1:].numel())
            out[f"flops_ratio@{b}"] = float(torch.cat(ratios).mean())
        out["teacher_perplexity"] = math.exp(teacher_nll / data[:, 1:].numel())
    finally:
        gated.train(was)
    return out


def load_base(cfg: TrainConfig, path: str | Path | None = None):
    """(model, tokenizer): ``path``, else model.path, else the packaged SmolLM2-135M."""
    import transformers

    path = path or cfg.model.path
    if path is None:
        from dynprune.assets import load_smollm2

        return load_smollm2()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _check_budget(base, cfg: TrainConfig) -> None:
    """The gated stage's budgets fit this model (on a temporary wrap, undone before returning)."""
    from dataclasses import replace

    gated = dynprune.wrap(base, replace(cfg.gate.gate_config(), unit_order="none"))
    try:
        fm, t = gated.flops, cfg.lm.seq_len
        least = fm.fixed(t) / fm.dense(t)
    finally:
        dynprune.unwrap(gated)
    if cfg.gate.budget_min <= least:
        raise PreflightError(
            f"gate.budget_min={cfg.gate.budget_min} is below what this gated model can run at: the router, "
            f"embeddings, LM head and {cfg.gate.router_layer} dense layer(s) alone cost {least:.3f} of dense FLOPs"
        )


def _done(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_causal_lm(cfg: TrainConfig, config_yaml: str) -> dict[str, Any]:
    """The causal-LM stages (see the module docstring); returns the last stage's metrics."""
    import transformers
    from dynprune.train.pipeline import make_accelerator, seed_everything
    from dynprune.train.tracking import Tracker

    from dynprune.io import atomic_write_bytes

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.output_dir)
    check_output_dir(cfg, out)
    finished = [_done(out / s) for s in cfg.stages]
    if all(finished):  # a --resume of a done run
        return finished[-1]  # type: ignore[return-value]
    dense_dir = out / "dense" if "dense" in cfg.stages else None
    acc = make_accelerator(cfg.optim.mixed_precision)
    seed_everything(cfg.seed, cfg.deterministic)
    dense_done = dense_dir is not None and finished[0] is not None
    base, tokenizer = load_base(cfg, dense_dir if dense_done else None)
    data: LMData = load_lm_data(cfg.lm, tokenizer)  # bad text fails here, before any training
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and cfg.lm.seq_len > positions:
        raise PreflightError(f"lm.seq_len={cfg.lm.seq_len} is longer than the model's context ({positions})")
    if "gated" in cfg.stages:
        _check_budget(base, cfg)
    if not (out / "config.yaml").is_file():
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(
            out / "run.json", {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data.source}
        )
        atomic_write_bytes(out / "config.yaml", config_yaml.encode())
    tracker = Tracker(cfg.logging, out, cfg.to_dict(), enabled=acc.is_main_process)
    run = _Stages(cfg, config_yaml, out, acc, tracker, tokenizer, data)
    try:
        metrics = finished[0]
        if dense_dir is not None and not dense_done:
            metrics = run.dense(base, dense_dir)
            del base
            if "gated" in cfg.stages:  # the gated stage starts from what was saved, as a resume would
                base, _ = load_base(cfg, dense_dir)
        if "gated" in cfg.stages:
            metrics = run.gated(base, dense_dir)
        return metrics  # type: ignore[return-value]
    finally:
        tracker.finish()


class _Stages:
    """The two causal-LM stages on one run's settings, data and tracker."""

    def __init__(self, cfg: TrainConfig, config_yaml: str, out: Path, acc, tracker, tokenizer, data: LMData):
        self.cfg, self.config_yaml, self.out, self.acc = cfg, config_yaml, out, acc
        self.tracker, self.tokenizer, self.data = tracker, tokenizer, data
        self.examples = [{"input_ids": w} for w in data.train]

    def _fit(self, name: str, model, objective, lr: float, offset: int, evaluate_fn, extra=None):
        from dynprune.train.pipeline import stage_settings
        from dynprune.train.trainer import Trainer

        cfg = self.cfg
        root = self.out / "checkpoints" / name
        trainer = Trainer(
            accelerator=self.acc,
            model=model,
            objective=objective,
            examples=self.examples,
            collate=stack_windows,
            settings=stage_settings(cfg, name, cfg.optim.gated_epochs, lr, offset),  # same steps both stages
            checkpoint_root=root,
            config_yaml=self.config_yaml,
            tracker=self.tracker,
            evaluate_fn=evaluate_fn,
            extra_tensors=extra,
        )
        ckpt.remove_stale_temporaries(root)
        resume = ckpt.latest_checkpoint(root) if cfg.resume else None
        if resume is not None:
            trainer.resume(resume)
        return trainer.fit()

    def dense(self, base, target: Path) -> dict[str, Any]:
        """Fine-tune the base with next-token cross-entropy; save it (HF dir + tokenizer) to ``target``."""
        from dynprune.train.pipeline import _finish_stage, _save_dir

        val, bs = self.data.validation, self.cfg.optim.eval_batch_size
        before = perplexity(base, val, bs)
        base.requires_grad_(True)
        evaluate_fn = lambda m: {"perplexity": perplexity(m, val, bs)}  # noqa: E731
        result = self._fit("dense", base, NextTokenObjective(), self.cfg.optim.dense_lr, 0, evaluate_fn)
        metrics = {
            "stage": "dense",
            "task": "causal_lm",
            "data": self.data.source,
            "train_windows": int(self.data.train.shape[0]),
            "train": result,
            "validation": {"perplexity": perplexity(base, val, bs), "perplexity_before": before},
        }
        if self.acc.is_main_process:
            plain = _plain_copy(base)  # a GGUF-loaded model refuses save_pretrained
            _save_dir(target, lambda tmp: (plain.save_pretrained(tmp), self.tokenizer.save_pretrained(tmp)))
            _finish_stage(self.config_yaml, target, metrics)
        return metrics

    def gated(self, base, dense_dir: Path | None) -> dict[str, Any]:
        from dynprune.train.pipeline import _finish_stage, seed_everything

        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)  # the router's initialisation
        teacher_copy = copy_teacher(base) if cfg.lm.tune_base else None
        base.requires_grad_(cfg.lm.tune_base)
        gated = dynprune.wrap(base, cfg.gate.gate_config())
        teacher = teacher_copy or frozen_self_teacher(gated)
        budgets, bs = list(cfg.evaluation.budgets), cfg.optim.eval_batch_size
        evaluate_fn = lambda m: evaluate_lm(m, teacher, self.data.validation, budgets, bs)  # noqa: E731
        objective = CausalLMObjective(gated, cfg, cfg.seed + 1, teacher, self.acc.process_index)
        perms = {"head_perm": gated.head_perm.cpu(), "ffn_perm": gated.ffn_perm.cpu()}
        result = self._fit("gated", gated, objective, cfg.optim.gated_lr, 1, evaluate_fn, perms)
        metrics = {
            "stage": "gated",
            "task": "causal_lm",
            "data": self.data.source,
            "base": str(dense_dir) if dense_dir is not None else (cfg.model.path or "packaged SmolLM2-135M"),
            "train_windows": int(self.data.train.shape[0]),
            "tune_base": cfg.lm.tune_base,
            "train": result,
            "multipliers": objective.lagrangian.state_dict(),
            "validation": evaluate_fn(gated),
        }
        target = self.out / "gated"
        if self.acc.is_main_process:
            _save(gated, target, self.tokenizer, cfg.lm.tune_base)
            _finish_stage(self.config_yaml, target, metrics)
        return metrics


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A fresh model of the same class and config holding ``model``'s weights."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def _save(gated, target: Path, tokenizer: Any, tune_base: bool) -> None:
    """gates/ always; base/ only when the base was tuned (a frozen base is the one it came from)."""
    from dynprune.io import save_gated_model, save_gates

    if not tune_base:
        save_gates(gated, target / "gates")
        return
    with gated.original_unit_order() as base:
        fresh = _plain_copy(base)
    staged = dynprune.wrap(fresh, gated.gate_config, orders=(gated.head_perm, gated.ffn_perm))
    staged.router.load_state_dict(gated.router.state_dict())
    save_gated_model(staged, target, tokenizer)
