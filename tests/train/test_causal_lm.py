"""Causal-LM training (task: causal_lm): the dense fine-tune, KL distillation from the dense model
+ FLOPs target.

A tiny local Llama (GQA) with its own small tokenizer and synthetic text; no SmolLM2 here."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from dynprune.train.config import DistillConfig, GateSection, RegularizerConfig, TrainConfig
from dynprune.train.data import DataError
from dynprune.train.lm import (
    CausalLMObjective,
    NextTokenObjective,
    evaluate_lm,
    frozen_self_teacher,
    perplexity,
    stack_windows,
)
from dynprune.train.lm_config import LMSection
from dynprune.train.lm_data import load_lm_data, read_texts
from dynprune.train.pipeline import run

import dynprune
from tests.helpers import tiny_decoder
from tests.train.tiny import sentiment_rows, tiny_tokenizer

SEQ = 24


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A tiny Llama causal LM (4 query / 2 KV heads) + tokenizer, briefly fitted to the text so the
    teacher has structure worth keeping (a random teacher is near-uniform)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = tiny_tokenizer(path)
    model = tiny_decoder("llama", seed=0, layers=3, vocab=len(tok), context=128).train()
    ids = _windows(tok, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(40):
        batch = ids[(step * 8) % 64 :][:8]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t, _ in sentiment_rows(400, seed=1)) + "\n")
    return path


def _windows(tok, n: int) -> torch.Tensor:
    text = " ".join(t for t, _ in sentiment_rows(600, seed=3))
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    return ids[: n * SEQ].view(n, SEQ)


def _gated(lm_dir: Path, gate: GateSection):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lm_dir).requires_grad_(False)
    return dynprune.wrap(base, gate.gate_config())


GATE = GateSection(unit_order="weight_norm", ffn_slice_size=32, budget_min=0.5, budget_max=0.5, hard_from=1.0)


def test_router_steps_reduce_the_kl_and_move_flops_to_the_target(lm_dir):
    from transformers import AutoTokenizer

    # at 0.3 the untrained router's choice costs KL (at 0.5 on this tiny model, ranking its nearly
    # equal logits by unit index happens to keep almost everything that matters)
    gate = replace(GATE, budget_min=0.3, budget_max=0.3)
    torch.manual_seed(0)
    gated = _gated(lm_dir, gate)
    batch = _windows(AutoTokenizer.from_pretrained(lm_dir), 8)
    teacher = frozen_self_teacher(gated)
    cfg = TrainConfig(
        task="causal_lm",
        stages=["gated"],
        gate=gate,
        regularizer=RegularizerConfig(target_warmup=0.0, lambda_lr=0.05),
        distill=DistillConfig(task_weight=0.0, logits_weight=1.0, temperature=1.0),
        evaluation=replace(TrainConfig().evaluation, budgets=[0.3]),
    )
    objective = CausalLMObjective(gated, cfg, seed=0, teacher=teacher)
    before = evaluate_lm(gated, teacher, batch, [0.3], batch_size=8)
    assert before["kl@1.0"] < 1e-6 < before["kl@0.3"]  # dense = teacher; gated differs
    opt = torch.optim.AdamW(gated.router.parameters(), lr=1e-2)
    gaps = []
    gated.train()
    for step in range(40):
        objective.begin_step(step, 40)
        loss, logs = objective.loss(gated, {"input_ids": batch}, step, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        objective.after_step(lambda t: t)
        gaps.append(float(logs["abs_gap"]))
    after = evaluate_lm(gated, teacher, batch, [0.3], batch_size=8)
    assert after["kl@0.3"] < 0.8 * before["kl@0.3"], (before, after)
    assert after["flops_ratio@0.3"] <= 0.3 + 1e-6
    # the router starts all-on (expected FLOPs ~1, gap ~0.7) and the Lagrangian pulls it to 0.3
    assert gaps[0] > 0.3 and sum(gaps[-5:]) / 5 < 0.5 * gaps[0], gaps


def _config(tmp: Path, lm_dir: Path, text: Path, stages=("gated",), **lm) -> TrainConfig:
    return TrainConfig(
        task="causal_lm",
        output_dir=str(tmp / "run"),
        stages=list(stages),
        model=replace(TrainConfig().model, path=str(lm_dir)),
        lm=LMSection(path=str(text), seq_len=SEQ, train_windows=48, eval_windows=4, **lm),
        gate=replace(GATE, budget_min=0.4, budget_max=0.8, hard_from=0.7),
        optim=replace(TrainConfig().optim, batch_size=8, eval_batch_size=8, max_steps=12, router_lr=1e-2),
        distill=DistillConfig(task_weight=0.0, logits_weight=1.0, temperature=1.0),
        evaluation=replace(TrainConfig().evaluation, budgets=[0.5]),
        logging=replace(TrainConfig().logging, report_to="none", progress=False),
        checkpoint=replace(TrainConfig().checkpoint, every_steps=1000, keep_last=1),
    )


@pytest.mark.parametrize("tune_base", [False, True])
def test_trained_gates_reload_and_generate(tmp_path, lm_dir, text_file, tune_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(tmp_path, lm_dir, text_file, tune_base=tune_base)
    metrics = run(cfg, "task: causal_lm\n")
    out = Path(cfg.output_dir) / "gated"
    assert metrics["train"]["steps"] == 12 and (out / "metrics.json").is_file()
    assert metrics["validation"]["flops_ratio@0.5"] <= 0.5 + 1e-6
    if tune_base:
        gated, tok = dynprune.load_gated_model(out)
    else:
        assert not (out / "base").exists()  # the frozen base is the one it came from
        gated = dynprune.load_gates(AutoModelForCausalLM.from_pretrained(lm_dir), out / "gates").eval()
        tok = AutoTokenizer.from_pretrained(lm_dir)
    val = load_lm_data(cfg.lm, tok).validation
    again = evaluate_lm(gated, frozen_self_teacher(gated), val, [0.5], batch_size=8)
    if not tune_base:  # the same gates on the same base: the same validation numbers
        assert again["kl@0.5"] == pytest.approx(metrics["validation"]["kl@0.5"], rel=1e-4)
    prompt = val[:2, :8]
    new = gated.generate(
        prompt, attention_mask=torch.ones_like(prompt), budget=0.5, max_new_tokens=5, do_sample=False
    )
    assert new.shape == (2, 13) and torch.equal(new[:, :8], prompt)
    # a finished run is not overwritten: a second run into it is refused
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, "task: causal_lm\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "good movie"}\n{"txt": "bad"}\n', "line 2: no 'text' field"),
        ('{"text": "good movie"}\nnot json\n', "line 2: not a JSON object"),
        ('{"text": 3}\n', "'text' is int, not a string"),
        ("\n\n", "holds no text"),
    ],
)
def test_malformed_text_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_texts(path)


def test_bad_text_input_fails_before_training(tmp_path, lm_dir, text_file):
    with pytest.raises(ValueError, match="does not exist"):
        LMSection(path=str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="neither plain text nor JSON lines"):
        LMSection(path=str(csv))
    short = tmp_path / "short.txt"
    short.write_text("good movie")
    cfg = _config(tmp_path, lm_dir, short)
    with pytest.raises(DataError, match="windows of 24"):
        run(cfg, "task: causal_lm\n")
    assert not (Path(cfg.output_dir) / "config.yaml").exists()  # nothing written before the data loaded


def test_causal_lm_config_rules():
    for stages in (["dense", "gated", "static"], ["static"], ["gated", "dense"]):
        with pytest.raises(ValueError, match=r"runs stages \[gated\].*\[dense, gated\]"):
            TrainConfig(task="causal_lm", stages=stages, gate=GateSection(unit_order="weight_norm"))
    TrainConfig(task="causal_lm", stages=["dense", "gated"], gate=GateSection(unit_order="weight_norm"))
    with pytest.raises(ValueError, match="unit_order taylor"):
        TrainConfig(task="causal_lm", stages=["gated"], gate=GateSection(unit_order="taylor"))
    assert stack_windows([{"input_ids": torch.arange(4)}] * 3)["input_ids"].shape == (3, 4)


def test_perplexity_learned_method_needs_gates(tmp_path):
    from dynprune.eval.perplexity_sweep import PerplexityConfig

    with pytest.raises(ValueError, match="go together"):
        PerplexityConfig(methods=("dense", "learned"))
    with pytest.raises(ValueError, match="holds no saved gates"):
        PerplexityConfig(methods=("learned",), gates=str(tmp_path))


def test_next_token_steps_lower_the_loss_on_a_fixed_batch(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(lm_dir).train()
    batch = _windows(AutoTokenizer.from_pretrained(lm_dir), 8)
    objective = NextTokenObjective()
    first, _ = objective.loss(model, {"input_ids": batch}, 0, 0)
    want = model(input_ids=batch, labels=batch).loss  # HF's own shifted cross-entropy
    assert float(first.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(20):
        loss, _ = objective.loss(model, {"input_ids": batch}, step, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after, _ = objective.loss(model, {"input_ids": batch}, 20, 0)
    assert float(after.detach()) < 0.8 * float(first.detach())
    assert perplexity(model, batch, 3) == pytest.approx(float(torch.exp(after.detach())), rel=1e-4)


@pytest.mark.parametrize("tune_base", [False, True])
def test_dense_then_gated_distils_from_the_saved_fine_tuned_model(tmp_path, lm_dir, text_file, tune_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(tmp_path, lm_dir, text_file, stages=("dense", "gated"), tune_base=tune_base)
    cfg = replace(cfg, optim=replace(cfg.optim, dense_lr=3e-3))
    metrics = run(cfg, "task: causal_lm\n")
    out = Path(cfg.output_dir)
    dense_metrics = json.loads((out / "dense" / "metrics.json").read_text())
    assert dense_metrics["train"]["steps"] == metrics["train"]["steps"] == 12  # the same steps
    val = dense_metrics["validation"]
    assert val["perplexity"] < val["perplexity_before"]  # fine-tuning fitted the text
    tok = AutoTokenizer.from_pretrained(out / "dense")
    dense = AutoModelForCausalLM.from_pretrained(out / "dense").eval()  # a plain HF model dir
    windows = load_lm_data(cfg.lm, tok).validation
    assert perplexity(dense, windows, 8) == pytest.approx(val["perplexity"], rel=1e-5)
    original = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    # the gated stage's teacher is the saved fine-tuned dense model, not the original base
    teacher_ppl = metrics["validation"]["teacher_perplexity"]
    assert teacher_ppl == pytest.approx(val["perplexity"], rel=1e-5)
    assert abs(perplexity(original, windows, 8) / teacher_ppl - 1) > 0.01
    if tune_base:
        gated, _ = dynprune.load_gated_model(out / "gated")
        assert metrics["validation"]["kl@1.0"] > 0  # the base moved away from its teacher
    else:
        gated = dynprune.load_gates(dense, out / "gated" / "gates").eval()
        assert metrics["validation"]["kl@1.0"] < 1e-6  # budget 1.0 is the teacher itself
    again = evaluate_lm(gated, frozen_self_teacher(gated), windows, [0.5], batch_size=8)
    assert again["perplexity@0.5"] == pytest.approx(metrics["validation"]["perplexity@0.5"], rel=1e-4)


def test_dense_then_gated_resumes_to_the_same_models(tmp_path, lm_dir, text_file):
    import shutil

    from safetensors.torch import load_file

    def cfg_in(d: Path, **kw) -> TrainConfig:
        c = _config(d, lm_dir, text_file, stages=("dense", "gated"))
        return replace(c, checkpoint=replace(c.checkpoint, every_steps=4, keep_last=5), **kw)

    full = cfg_in(tmp_path / "a")
    run(full, yaml.safe_dump(full.to_dict()))
    crashed = Path(cfg_in(tmp_path / "b").output_dir)
    shutil.copytree(full.output_dir, crashed)
    # as if killed during the dense stage's step 5-8: no dense/ or gated/ output, checkpoint 4 only
    shutil.rmtree(crashed / "dense")
    shutil.rmtree(crashed / "gated")
    shutil.rmtree(crashed / "checkpoints" / "gated")
    for step in (8, 12):
        shutil.rmtree(crashed / "checkpoints" / "dense" / f"step-{step:08d}")
    again = cfg_in(tmp_path / "b", resume=True)
    resumed = run(again, yaml.safe_dump(again.to_dict()))
    a, b = Path(full.output_dir), crashed
    dense_a, dense_b = (
        load_file(a / "dense" / "model.safetensors"),
        load_file(b / "dense" / "model.safetensors"),
    )
    assert all(torch.equal(dense_a[k], dense_b[k]) for k in dense_a)
    gates_a = json.loads((a / "gated" / "metrics.json").read_text())["validation"]
    assert resumed["validation"] == gates_a
