"""The causal LM behind the server: batched ``GatedModel.generate`` with per-row budgets.

``GeneratorEngine.run`` is the only code that touches the model; the batcher calls it from
its single worker thread with the jobs of several requests. Jobs that may share one
``generate`` call (same ``max_new_tokens`` and sampling parameters, no seed) are
left-padded to one length and run together, each row at its own budget: the gates of a
row are chosen from its prompt at prefill and held for its whole generation
(docs/architecture.md, "KV cache"). A seeded request runs alone (HF samples from one
global RNG, so a seed is only reproducible for a batch of one).

Like classification, the router's choice depends on the padded length (a unit's FLOPs
cost does), so every answer reports its ``padded_len``; the same prompt alone, left-padded
to that length, at the same budget and sampling, gives the same gates and (greedy) the same
tokens — :meth:`GeneratorEngine.generate_alone`, which the tests and benchmarks compare with.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dynprune.model import GatedModel

from .config import ServeConfig

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sampling:
    """How one request decodes. ``temperature`` 0 = greedy; ``top_k`` 0 / ``top_p`` 1 = off."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def batch_key(self) -> tuple | None:
        """Jobs with equal keys may share a generate call; None: this job runs alone."""
        if self.seed is not None:
            return None
        return (self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    def generation_config(self, pad_id: int, eos_ids: list[int]) -> GenerationConfig:
        common = {"max_new_tokens": self.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_ids}
        if self.temperature == 0.0:
            return GenerationConfig(do_sample=False, **common)
        return GenerationConfig(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, **common
        )


@dataclass(eq=False)
class GenJob:
    """One prompt at one budget. ``on_token(token_id, text_delta)`` (stream requests) is called
    from the worker thread; setting ``cancel`` stops this row at the next decode step."""

    prompt_ids: tuple[int, ...]
    budget: float
    sampling: Sampling
    on_token: Callable[[int, str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class GenResult:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (end-of-sequence token), "length" (max_new_tokens), "cancelled"
    prompt_tokens: int
    padded_len: int
    flops_ratio: float  # of the prefill, where the gates were chosen (held for every decode step)
    batch_size: int


@dataclass(frozen=True)
class GenError:
    """A generate call that failed (the other groups of the batch are unaffected)."""

    message: str


class _Cancelled(StoppingCriteria):
    """Per-row stop: a row whose request gave up (timeout, disconnect) stops at the next step."""

    def __init__(self, jobs: list[GenJob]):
        self.jobs = jobs

    def __call__(self, input_ids: Tensor, scores: Any, **kwargs: Any) -> Tensor:
        return torch.tensor([j.cancel.is_set() for j in self.jobs], dtype=torch.bool, device=input_ids.device)


class _RowText:
    """Incremental detokenisation of one row: deltas whose concatenation is the final text."""

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: set[int]):
        self.decode, self.eos_ids = decode, eos_ids
        self.ids: list[int] = []
        self.sent = ""
        self.done = False

    def add(self, token: int) -> str | None:
        """The new text after ``token`` (None once the row has ended); held back while the text
        ends in an incomplete multi-byte character."""
        if self.done:
            return None
        if token in self.eos_ids:
            self.done = True
            return None
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


class _Streamer(BaseStreamer):
    """HF streamer for a batch: the first put is the prompt (B, P); then one (B,) per step."""

    def __init__(self, jobs: list[GenJob], rows: list[_RowText]):
        self.jobs, self.rows = jobs, rows
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for job, row, token in zip(self.jobs, self.rows, value.reshape(-1).tolist()):
            delta = row.add(int(token))
            if delta is not None and job.on_token is not None and not job.cancel.is_set():
                job.on_token(int(token), delta)

    def end(self) -> None:
        pass


def context_length(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


class GeneratorEngine:
    task = "generation"
    labels: tuple[str, ...] = ()  # /health: no labels for a causal LM
    trained_router = True  # False: --model, a plain model wrapped with an untrained router

    def __init__(self, gated: GatedModel, tokenizer: Any, cfg: ServeConfig, source: str):
        self.gated, self.tokenizer, self.cfg, self.source = gated, tokenizer, cfg, source
        self.context = context_length(gated.model.config)
        gen = gated.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = gen.pad_token_id if gen.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.pad_id = int(pad)
        fm = gated.flops
        # the smallest budget the router can honour: fixed costs (embeddings, router, LM head)
        # over dense, largest for a one-token prompt; longer (padded) prompts only lower it
        self.min_budget = math.ceil(fm.fixed(1) / fm.dense(1) * 1e4) / 1e4

    @property
    def model_name(self) -> str:
        return type(self.gated.model).__name__

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def warm_up(self) -> None:
        """Prefill + decode once (dense and gated, batch 1 and a full batch) before /health is ready."""
        ids = tuple(self.encode("warm up the model") or [self.pad_id])
        budgets = {1.0, max(0.5, self.min_budget)}
        for n in {1, self.cfg.max_batch}:
            for b in budgets:
                self.run([GenJob(ids, b, Sampling(max_new_tokens=2)) for _ in range(n)])

    # -- generation --------------------------------------------------------------------
    def run(self, jobs: list[GenJob]) -> list[GenResult | GenError]:
        """Worker thread: each group of compatible jobs in ONE generate call, each seeded job alone."""
        out: list[Any] = [None] * len(jobs)
        groups: dict[Any, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.sampling.batch_key or ("alone", i), []).append(i)
        for members in groups.values():
            group = [jobs[i] for i in members]
            try:
                results: list[Any] = self._generate(group)
            except Exception as err:
                results = [GenError(f"{type(err).__name__}: {err}")] * len(group)
            for i, r in zip(members, results):
                out[i] = r
        return out

    def generate_alone(self, job: GenJob, padded_len: int) -> GenResult:
        """The unbatched reference: ``job`` alone, left-padded to ``padded_len`` tokens."""
        return self._generate([job], pad_to=padded_len)[0]

    def padded_length(self, lengths: list[int], max_new_tokens: int) -> int:
        """The longest prompt rounded up to ``pad_multiple``, but never past the context."""
        longest = max(lengths)
        multiple = self.cfg.pad_multiple
        rounded = -(-longest // multiple) * multiple
        if self.context is not None:
            rounded = min(rounded, self.context - max_new_tokens)
        return max(rounded, longest)

    def _generate(self, jobs: list[GenJob], pad_to: int | None = None) -> list[GenResult]:
        sampling = jobs[0].sampling
        lengths = [len(j.prompt_ids) for j in jobs]
        width = pad_to if pad_to is not None else self.padded_length(lengths, sampling.max_new_tokens)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)  # (B, P), left-padded
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            n = len(job.prompt_ids)
            ids[row, width - n :] = torch.tensor(job.prompt_ids, dtype=torch.long)
            mask[row, width - n :] = 1
        budgets = torch.tensor([j.budget for j in jobs], dtype=torch.float64)
        rows = [_RowText(self.decode, set(self.eos_ids)) for _ in jobs]
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.gated.generate(
                ids,
                attention_mask=mask,
                budget=budgets,
                generation_config=sampling.generation_config(self.pad_id, self.eos_ids),
                stopping_criteria=StoppingCriteriaList([_Cancelled(jobs)]),
                streamer=_Streamer(jobs, rows),
            )
        info = self.gated.last
        routed = bool((budgets < 1.0).any()) and info is not None  # all dense: HF's generate ran alone
        ratios = info.flops_ratio.tolist() if routed else [1.0] * len(jobs)
        results = []
        for row, job in enumerate(jobs):
            new = out[row, width:].tolist()
            cut = next((k for k, t in enumerate(new) if t in self.eos_ids), None)
            tokens = new if cut is None else new[:cut]
            if job.cancel.is_set():
                reason = "cancelled"
            else:
                reason = "stop" if cut is not None else "length"
            results.append(
                GenResult(
                    token_ids=tuple(tokens),
                    text=self.decode(tokens),
                    finish_reason=reason,
                    prompt_tokens=len(job.prompt_ids),
                    padded_len=width,
                    flops_ratio=float(ratios[row]),
                    batch_size=len(jobs),
                )
            )
        return results
