"""The training loop shared by every stage: accelerate, accumulation, checkpoints, resume.

One optimiser step = ``grad_accum`` micro-batches per process. The data order
is a pure function of (seed, epoch) (:func:`dynprune.train.data.epoch_batches`),
so the data position is just the step count; a checkpoint stores it anyway,
together with model, optimiser, scheduler, objective state and every
process's RNG state, and resuming continues bit-for-bit on CPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dynprune.train import checkpoint as ckpt
from dynprune.train.data import Collator, epoch_batches
from dynprune.train.tracking import Tracker
from safetensors.torch import load_model, save_file, save_model


@dataclass
class StageSettings:
    name: str
    epochs: float
    lr: float
    batch_size: int
    grad_accum: int = 1
    router_lr: float | None = None  # the added parameters' LR (routers, exit heads); None: lr
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    group_by_length: bool = True
    seed: int = 0
    log_every: int = 20
    eval_every: int | None = None  # None: end of every epoch
    checkpoint_every: int = 200
    keep_last: int = 2
    progress: bool = True


def param_groups(module: torch.nn.Module, s: StageSettings) -> list[dict[str, Any]]:
    """Weights with decay, biases/norms without; the parameters a wrapper added to the pretrained
    model (``module.added_parameters()``: a GatedModel's router, an early-exit model's exit heads;
    they start from scratch) with their own LR (``s.router_lr``) and no decay."""
    added_of = getattr(module, "added_parameters", None)
    added = {id(p) for p in added_of()} if callable(added_of) else set()
    decay, no_decay, new = [], [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if id(p) in added:
            new.append(p)
        elif p.ndim < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "lr": s.lr, "weight_decay": s.weight_decay},
        {"params": no_decay, "lr": s.lr, "weight_decay": 0.0},
    ]
    if new:
        groups.append({"params": new, "lr": s.router_lr or s.lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


class Trainer:
    """Runs one stage. ``model`` is the plain module (HF model or GatedModel); accelerate wraps it."""

    def __init__(
        self,
        *,
        accelerator: Any,
        model: torch.nn.Module,
        objective: Any,
        examples: list[dict[str, Any]],
        collate: Collator,
        settings: StageSettings,
        checkpoint_root: Path | None,
        config_yaml: str = "",
        tracker: Tracker | None = None,
        evaluate_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
        extra_tensors: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.acc, self.objective, self.examples, self.collate = accelerator, objective, examples, collate
        self.s, self.root, self.config_yaml = settings, checkpoint_root, config_yaml
        self.tracker, self.evaluate_fn = tracker, evaluate_fn
        self.extra_tensors = extra_tensors or {}
        self.core = model
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.lengths = [len(e["input_ids"]) for e in examples]
        self.per_epoch = len(self._batches(0))
        if self.per_epoch < settings.grad_accum:
            raise ValueError(
                f"stage {settings.name}: {len(examples)} training examples give {self.per_epoch} batches of "
                f"{settings.batch_size} per process, fewer than grad_accum={settings.grad_accum}"
            )
        steps = int(settings.epochs * self.per_epoch) // settings.grad_accum
        self.total_steps = max(1, min(steps, settings.max_steps or steps))
        optimizer = torch.optim.AdamW(param_groups(model, settings), lr=settings.lr)
        warmup = int(settings.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _linear_warmup_decay(warmup, self.total_steps)
        )
        # the scheduler stays unprepared: accelerate's wrapper would step it once per process
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.last_logs: dict[str, float] = {}
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    # -- data --------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list[list[int]]:
        s = self.s
        return epoch_batches(
            self.lengths,
            s.batch_size,
            seed=s.seed,
            epoch=epoch,
            group_by_length=s.group_by_length,
            world=self.world,
            rank=self.rank,
        )

    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(index, self.per_epoch)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self._batches(epoch))
        batch = self.collate([self.examples[i] for i in self._epoch_cache[1][pos]])
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> Path | None:
        if self.root is None:
            return None

        def write_main(tmp: Path) -> None:
            save_model(self.core, str(tmp / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if self.extra_tensors:
                save_file(
                    {k: v.contiguous() for k, v in self.extra_tensors.items()}, str(tmp / "extra.safetensors")
                )
            (tmp / "config.yaml").write_text(self.config_yaml)
            state = {
                "stage": self.s.name,
                "step": self.step,
                "total_steps": self.total_steps,
                "micro_batches_done": self.step * self.s.grad_accum,
                "batches_per_epoch": self.per_epoch,
                "world_size": self.world,
                "objective": self.objective.state_dict(),
                "history": self.history,
                "seconds": self.seconds,
                "last_logs": self.last_logs,
            }
            ckpt.write_json(tmp / "state.json", state)

        return ckpt.save_checkpoint(
            self.root,
            self.step,
            write_main,
            keep_last=self.s.keep_last,
            rank=self.rank,
            barrier=self.acc.wait_for_everyone,
        )

    def resume(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        if state["world_size"] != self.world:
            raise ckpt.ResumeError(
                f"checkpoint {path} was written by {state['world_size']} processes; resume with the same number "
                f"(now {self.world}) to continue the same data order"
            )
        if state["total_steps"] != self.total_steps or state["batches_per_epoch"] != self.per_epoch:
            raise ckpt.ResumeError(
                f"checkpoint {path} belongs to a stage of {state['total_steps']} steps x {state['batches_per_epoch']} "
                f"batches/epoch, this one has {self.total_steps} x {self.per_epoch}: data or schedule changed"
            )
        try:
            load_model(self.core, str(path / "model.safetensors"), strict=True, device=str(self.acc.device))
            self.optimizer.load_state_dict(
                torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            )
        except (RuntimeError, ValueError) as err:
            raise ckpt.ResumeError(
                f"checkpoint {path} does not fit this model's parameters (written by an older dynprune, "
                f"whose router had other weights?): {str(err).splitlines()[0]}. Finished stages are "
                f"unaffected; to restart this stage, delete {path.parent}"
            ) from err
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        self.objective.load_state_dict(state["objective"])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]
        self.last_logs = state.get("last_logs", {})
        ckpt.load_rng(path, self.rank)

    # -- loop --------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        s, acc = self.s, self.acc
        bar = None
        if s.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps, initial=self.step, desc=s.name, unit="step", dynamic_ncols=True
            )
        window: dict[str, float] = {}
        n_window = 0
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            sched = self.objective.begin_step(self.step, self.total_steps)
            self.model.train()
            logs: dict[str, float] = {}
            for micro in range(s.grad_accum):
                batch = self._micro_batch(self.step * s.grad_accum + micro)
                sync = contextlib.nullcontext() if micro == s.grad_accum - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    loss, parts = self.objective.loss(self.model, batch, self.step, micro)
                    acc.backward(loss / s.grad_accum)
                for k, v in {"loss": loss.detach(), **parts}.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / s.grad_accum
            if s.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.objective.after_step(lambda t: acc.reduce(t.to(acc.device), reduction="mean").cpu())
            self.step += 1
            self.seconds += time.perf_counter() - t0
            logs.update(sched, lr=self.scheduler.get_last_lr()[0])
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            n_window += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    {k: f"{logs[k]:.3g}" for k in ("loss", "flops_ratio", "lambda1") if k in logs}
                )
            if self.step % s.log_every == 0 or self.step == self.total_steps:
                self.last_logs = {k: v / n_window for k, v in window.items()}
                self.last_logs["epoch"] = self.step * s.grad_accum / self.per_epoch
                if self.tracker is not None and acc.is_main_process:
                    self.tracker.log(s.name, self.step, self.last_logs)
                window, n_window = {}, 0
            if self._eval_due():
                self._evaluate()
            if self.step % s.checkpoint_every == 0 or self.step == self.total_steps:
                self.save()
        if bar is not None:
            bar.close()
        return {
            "steps": self.total_steps,
            "train_seconds": self.seconds,
            "examples_per_process": self.total_steps * s.grad_accum * s.batch_size,
            "world_size": self.world,
            "last_logs": self.last_logs,
            "history": self.history,
            "ranks_identical": self.ranks_identical(),
        }

    def _eval_due(self) -> bool:
        if self.evaluate_fn is None:
            return False
        if self.step == self.total_steps:
            return True
        if self.s.eval_every is not None:
            return self.step % self.s.eval_every == 0
        a = self.s.grad_accum
        return (self.step * a) // self.per_epoch != ((self.step - 1) * a) // self.per_epoch

    def _evaluate(self) -> None:
        assert self.evaluate_fn is not None
        metrics: dict[str, Any] = {}
        if self.acc.is_main_process:
            metrics = self.evaluate_fn(self.core)
            self.history.append({"step": self.step, **metrics})
            if self.tracker is not None:
                self.tracker.log(self.s.name, self.step, {f"val_{k}": v for k, v in metrics.items()})
        self.acc.wait_for_everyone()

    def ranks_identical(self) -> bool | None:
        """With several processes: do all ranks hold the same weights? (checksums gathered)."""
        if self.world == 1:
            return None
        with torch.no_grad():
            flat = [p.detach().double().flatten() for p in self.core.parameters()]
            pos = torch.arange(1, sum(f.numel() for f in flat) + 1, dtype=torch.float64)
            allp = torch.cat(flat)
            sums = torch.stack([allp.sum(), (allp * pos).sum() / pos.numel(), allp.pow(2).sum()])
        gathered = self.acc.gather(sums.to(self.acc.device)[None]).cpu()
        return bool((gathered == gathered[0]).all())


def _linear_warmup_decay(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor
