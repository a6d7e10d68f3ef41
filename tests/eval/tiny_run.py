"""A tiny but real `dynprune train` run (tiny BERT + synthetic reviews, a few steps per stage)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch

GOOD = ["good", "great", "superb", "charming", "funny", "moving"]
BAD = ["bad", "awful", "dull", "boring", "weak", "tedious"]
OTHER = ["the", "a", "film", "movie", "plot", "cast", "is", "was", "and", "very", "quite", "story"]
NUMBERS = [str(i) for i in range(10)]


def tiny_model_dir(path: Path, layers: int = 2, hidden: int = 64, ffn: int = 128) -> Path:
    """A random tiny BERT classifier with a small WordPiece tokenizer, saved as a HF model dir."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *OTHER, *GOOD, *BAD, *NUMBERS]
    words += [f"##{n}" for n in NUMBERS]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(words), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=ffn, max_position_embeddings=64, num_labels=2,
    )  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def write_reviews(path: Path, n: int, seed: int = 0) -> Path:
    """CSV (text, label) of synthetic reviews whose label is carried by a sentiment word."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            label = "pos" if i % 2 else "neg"
            words = [rng.choice(OTHER) for _ in range(rng.randint(2, 12))]
            words.insert(rng.randrange(len(words) + 1), rng.choice(GOOD if label == "pos" else BAD))
            w.writerow([" ".join([*words, str(i)]), label])
    return path


def _train_args(root: Path, steps: int) -> list[str]:
    model = tiny_model_dir(root / "model", layers=4)  # 4 layers: early exit can reach a 0.3 budget
    data = write_reviews(root / "data.csv", 240)
    return [
        f"--output_dir={root / 'run'}",
        f"--model.path={model}",
        f"--data.path={data}",
        "--data.max_length=32",
        "--gate.ffn_slice_size=32",
        "--gate.unit_order=weight_norm",
        "--gate.router_hidden=16",
        "--gate.budget_min=0.2",  # a cascade at 0.3 has a first pass below it
        "--optim.batch_size=16",
        f"--optim.max_steps={steps}",
        "--optim.dense_epochs=1",
        "--optim.gated_epochs=1",
        "--logging.report_to=none",
        "--logging.progress=false",
        "--evaluation.budgets=[0.3,0.5]",
    ]


def make_training_run(root: Path, steps: int = 3) -> Path:
    """Run the real `dynprune train` pipeline (a few steps per stage) into ROOT/run."""
    import draccus
    from dynprune.train.config import TrainConfig
    from dynprune.train.pipeline import run

    cfg = draccus.parse(TrainConfig, args=_train_args(root, steps))
    out = Path(cfg.output_dir)
    try:
        run(cfg, draccus.dump(cfg))
    except Exception:
        # the sweep needs the three stages, not the training run's own final report
        if not all((out / stage / "metrics.json").is_file() for stage in ("dense", "gated", "static")):
            raise
    return out


def fake_training_run(root: Path) -> Path:
    """The same directory layout as `dynprune train` writes (docs/training.md), without training:
    dense/ (HF dir + tokenizer), gated/ and static/ (dynprune.save_gated_model: untrained routers,
    the static one input-independent), metrics.json markers and the resolved config.yaml."""
    import json

    import draccus
    from dynprune.train.config import TrainConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import dynprune

    cfg = draccus.parse(TrainConfig, args=_train_args(root, 3))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(draccus.dump(cfg))
    model_dir = Path(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dense = AutoModelForSequenceClassification.from_pretrained(
        model_dir, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}
    )
    dense.save_pretrained(out / "dense")
    tokenizer.save_pretrained(out / "dense")
    for stage, router in (("gated", "dynamic"), ("static", "static")):
        student = AutoModelForSequenceClassification.from_pretrained(out / "dense")
        gated = dynprune.wrap(student, cfg.gate.gate_config(router=router))
        torch.manual_seed(1)
        with torch.no_grad():  # routers that choose different units per input (and per budget)
            for p in gated.router.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        dynprune.save_gated_model(gated, out / stage, tokenizer)
        (out / stage / "config.yaml").write_text(draccus.dump(cfg))
    for stage in ("dense", "gated", "static"):
        (out / stage / "metrics.json").write_text(json.dumps({"stage": stage, "train": {"steps": 3}}))
    return out
