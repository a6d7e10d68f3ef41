"""`dynprune train` with ``task: causal_lm``: routers (and optionally the base) of a causal LM
learn by distillation from the dense, frozen base, under the Lagrangian FLOPs target.

Output directory::

    OUTPUT_DIR/config.yaml, run.json
    OUTPUT_DIR/gated/gates/          the learned routers (dynprune.save_gates); base frozen
    OUTPUT_DIR/gated/base/           only with lm.tune_base: the tuned base (HF model dir)
    OUTPUT_DIR/gated/metrics.json    validation KL / perplexity / FLOPs per budget (marks done)
    OUTPUT_DIR/checkpoints/gated/step-XXXXXXXX/   resumable training state

Per training window a budget is drawn (GatedObjective.sample_budgets); the router reads the
whole window and its gates hold for every position (the per-sequence decision a generation
makes at prefill, docs/architecture.md "KV cache"). Evaluation here routes each validation
window the same way; ``dynprune eval perplexity --gates OUTPUT_DIR/gated/gates`` scores
held-out books with the decision taken from the prompt only.
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
from dynprune.train.objectives import GatedObjective
from dynprune.train.preflight import PreflightError, check_output_dir

import dynprune

Tensor = torch.Tensor
Teacher = Callable[[Tensor], Tensor]  # input_ids (B, T) -> logits (B, T, V), no grad


def stack_windows(examples: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Equal-length windows -> {"input_ids": (B, T)} (the Trainer's collate)."""
    return {"input_ids": torch.stack([e["input_ids"] for e in examples])}


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
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
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
def evaluate_lm(
    gated, teacher: Teacher, data: Tensor, budgets: list[float], batch_size: int
) -> dict[str, float]:
    """Per budget on the windows ``data`` (N, T): mean per-token KL(teacher ‖ student), perplexity
    of the whole window's next tokens, executed FLOPs ratio (the router reads each whole window)."""
    was = gated.training
    gated.eval()
    out: dict[str, float] = {}
    try:
        for b in [1.0, *budgets]:
            kl = nll = tokens = 0.0
            ratios = []
            for i in range(0, data.shape[0], batch_size):
                ids = data[i : i + batch_size]
                t = teacher(ids)
                s = gated(input_ids=ids, budget=b, use_cache=False).logits.float()
                ratios.append(gated.last.flops_ratio.double())
                kl += float(logits_distillation(s.flatten(0, 1), t.flatten(0, 1), 1.0)) * ids.numel()
                nll += float(F.cross_entropy(s[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
                tokens += ids[:, 1:].numel()
            out[f"kl@{b}"] = kl / data.numel()
            out[f"perplexity@{b}"] = math.exp(nll / tokens)
            out[f"flops_ratio@{b}"] = float(torch.cat(ratios).mean())
    finally:
        gated.train(was)
    return out


def load_base(cfg: TrainConfig):
    """(model, tokenizer): model.path, or the packaged SmolLM2-135M when it is null."""
    import transformers

    if cfg.model.path is None:
        from dynprune.assets import load_smollm2

        return load_smollm2()
    path = cfg.model.path
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, transformers.AutoTokenizer.from_pretrained(path)


def _check_budget(gated, cfg: TrainConfig) -> None:
    fm, t = gated.flops, cfg.lm.seq_len
    least = fm.fixed(t) / fm.dense(t)
    if cfg.gate.budget_min <= least:
        raise PreflightError(
            f"gate.budget_min={cfg.gate.budget_min} is below what this gated model can run at: the router, "
            f"embeddings, LM head and {cfg.gate.router_layer} dense layer(s) alone cost {least:.3f} of dense FLOPs"
        )
    positions = getattr(gated.model.config, "max_position_embeddings", None)
    if positions is not None and t > positions:
        raise PreflightError(f"lm.seq_len={t} is longer than the model's context ({positions})")


def run_causal_lm(cfg: TrainConfig, config_yaml: str) -> dict[str, Any]:
    """The causal-LM gated stage (see the module docstring); returns the stage's metrics."""
    import transformers
    from dynprune.train.pipeline import make_accelerator, seed_everything, stage_settings
    from dynprune.train.tracking import Tracker
    from dynprune.train.trainer import Trainer

    from dynprune.io import atomic_write_bytes

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.output_dir)
    check_output_dir(cfg, out)
    target = out / "gated"
    if (target / "metrics.json").is_file():  # finished (a --resume of a done run)
        return json.loads((target / "metrics.json").read_text())
    acc = make_accelerator(cfg.optim.mixed_precision)
    seed_everything(cfg.seed, cfg.deterministic)
    base, tokenizer = load_base(cfg)
    data: LMData = load_lm_data(cfg.lm, tokenizer)  # bad text fails here, before any training
    teacher_copy = copy_teacher(base) if cfg.lm.tune_base else None
    base.requires_grad_(cfg.lm.tune_base)
    gated = dynprune.wrap(base, cfg.gate.gate_config())
    _check_budget(gated, cfg)
    teacher = teacher_copy or frozen_self_teacher(gated)
    if not (out / "config.yaml").is_file():
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(
            out / "run.json", {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "data": data.source}
        )
        atomic_write_bytes(out / "config.yaml", config_yaml.encode())
    tracker = Tracker(cfg.logging, out, cfg.to_dict(), enabled=acc.is_main_process)
    try:
        examples = [{"input_ids": w} for w in data.train]
        budgets = list(cfg.evaluation.budgets)
        bs = cfg.optim.eval_batch_size
        evaluate_fn = lambda m: evaluate_lm(m, teacher, data.validation, budgets, bs)  # noqa: E731
        settings = stage_settings(cfg, "gated", cfg.optim.gated_epochs, cfg.optim.gated_lr, 1)
        objective = CausalLMObjective(gated, cfg, cfg.seed + 1, teacher, acc.process_index)
        trainer = Trainer(
            accelerator=acc,
            model=gated,
            objective=objective,
            examples=examples,
            collate=stack_windows,
            settings=settings,
            checkpoint_root=out / "checkpoints" / "gated",
            config_yaml=config_yaml,
            tracker=tracker,
            evaluate_fn=evaluate_fn,
            extra_tensors={"head_perm": gated.head_perm.cpu(), "ffn_perm": gated.ffn_perm.cpu()},
        )
        root = out / "checkpoints" / "gated"
        ckpt.remove_stale_temporaries(root)
        resume = ckpt.latest_checkpoint(root) if cfg.resume else None
        if resume is not None:
            trainer.resume(resume)
        result = trainer.fit()
        metrics = {
            "stage": "gated",
            "task": "causal_lm",
            "data": data.source,
            "train_windows": int(data.train.shape[0]),
            "tune_base": cfg.lm.tune_base,
            "train": result,
            "multipliers": objective.lagrangian.state_dict(),
            "validation": evaluate_fn(gated),
        }
        if acc.is_main_process:
            _save(gated, target, tokenizer, cfg.lm.tune_base)
            atomic_write_bytes(target / "config.yaml", config_yaml.encode())
            ckpt.write_json(target / "metrics.json", metrics)  # last: marks the stage done
        return metrics
    finally:
        tracker.finish()


def _save(gated, target: Path, tokenizer: Any, tune_base: bool) -> None:
    """gates/ always; base/ only when the base was tuned (a frozen base is the one it came from)."""
    from dynprune.io import save_gated_model, save_gates

    if not tune_base:
        save_gates(gated, target / "gates")
        return
    # a GGUF-loaded base refuses save_pretrained: save a fresh model of its class with its weights
    with gated.original_unit_order() as base:
        fresh = type(base)(base.config)
        fresh.load_state_dict(base.state_dict())
    staged = dynprune.wrap(fresh, gated.gate_config, orders=(gated.head_perm, gated.ffn_perm))
    staged.router.load_state_dict(gated.router.state_dict())
    save_gated_model(staged, target, tokenizer)
