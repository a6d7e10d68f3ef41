"""Run under torchrun by test_ddp.py: a few gated training steps on a tiny model, then every
rank writes its final weights, multipliers and the examples it saw to OUT_DIR/rank<r>.*"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from dynprune.train.config import DistillConfig, GateSection, RegularizerConfig
from dynprune.train.data import Collator
from dynprune.train.objectives import GatedObjective
from dynprune.train.pipeline import make_accelerator, seed_everything
from dynprune.train.trainer import StageSettings, Trainer
from safetensors.torch import save_file

import dynprune
from tests.helpers import VOCAB, tiny_model


class RecordingCollator(Collator):
    def __init__(self) -> None:
        super().__init__(pad_token_id=0)
        self.seen: list[int] = []

    def __call__(self, examples):
        self.seen += [e["index"] for e in examples]
        return super().__call__(examples)


def main(out: Path) -> None:
    acc = make_accelerator()
    seed_everything(0, True)
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(96):
        n = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * n, "labels": i % 2, "index": i})
    gate = GateSection(ffn_slice_size=32, router_hidden=16, hard_from=0.5, importance_batches=1)
    gated = dynprune.wrap(tiny_model(layers=2, hidden=64, ffn=128), gate.gate_config())
    objective = GatedObjective(
        gated,
        gate,
        RegularizerConfig(),
        DistillConfig(task_weight=1.0, logits_weight=0.0),
        0,
        acc.process_index,
    )
    collate = RecordingCollator()
    settings = StageSettings(
        name="gated", epochs=2, lr=1e-3, batch_size=8, grad_accum=2, router_lr=1e-2, progress=False
    )
    trainer = Trainer(
        accelerator=acc,
        model=gated,
        objective=objective,
        examples=examples,
        collate=collate,
        settings=settings,
        checkpoint_root=None,
    )
    result = trainer.fit()
    r = acc.process_index
    save_file({k: v.contiguous() for k, v in gated.state_dict().items()}, str(out / f"rank{r}.safetensors"))
    info = {
        "world": acc.num_processes,
        "steps": result["steps"],
        "seen": collate.seen,
        "lambdas": objective.lagrangian.state_dict(),
        "ranks_identical": result["ranks_identical"],
    }
    (out / f"rank{r}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
