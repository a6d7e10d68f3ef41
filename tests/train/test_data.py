"""Data: the Rotten Tomatoes split, local files of every format, labels, errors, batching."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from dynprune.train.config import DataConfig
from dynprune.train.data import (
    Collator,
    DataError,
    encode,
    epoch_batches,
    eval_batches,
    load_task_data,
    make_dataloader,
)

from tests.train.tiny import sentiment_rows, tiny_tokenizer, write_csv


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.real
def test_rotten_tomatoes_split_is_the_documented_one():
    data = load_task_data()
    sizes = data.sizes()
    assert data.label_names == ["rotten", "fresh"]
    assert sizes == {"train": 10201, "validation": 1276, "test": 1275}
    texts = {s: {t.strip() for t in data.splits[s]["text"]} for s in sizes}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    assert not (texts["validation"] & texts["test"])
    fresh = {s: sum(data.splits[s]["label"]) / sizes[s] for s in sizes}
    assert max(fresh.values()) - min(fresh.values()) < 0.01  # stratified
    assert load_task_data().splits["test"]["text"] == data.splits["test"]["text"]  # same every time


def test_csv_with_string_labels_and_three_classes(tmp_path):
    rows = sentiment_rows(300, classes=("neg", "neutral", "pos"))
    data = load_task_data(DataConfig(path=str(write_csv(tmp_path / "d.csv", rows))))
    assert data.label_names == ["neg", "neutral", "pos"] and data.num_labels == 3
    assert sum(data.sizes().values()) == 300
    counts = {s: Counter(data.splits[s]["label"]) for s in ("train", "validation", "test")}
    assert counts["train"] == {0: 80, 1: 80, 2: 80} and counts["test"] == {0: 10, 1: 10, 2: 10}
    again = load_task_data(DataConfig(path=str(tmp_path / "d.csv")))
    assert again.splits["train"]["text"] == data.splits["train"]["text"]
    other = load_task_data(DataConfig(path=str(tmp_path / "d.csv"), split_seed=1))
    assert other.splits["train"]["text"] != data.splits["train"]["text"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "tsv"])
def test_other_formats_and_columns(tmp_path, fmt):
    import pandas as pd

    rows = sentiment_rows(100)
    df = pd.DataFrame({"review": [t for t, _ in rows], "stars": [1 if y == "pos" else 0 for _, y in rows]})
    path = tmp_path / f"d.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dict("records")))
    elif fmt == "parquet":
        df.to_parquet(path)
    else:
        df.to_csv(path, sep="\t", index=False)
    data = load_task_data(DataConfig(path=str(path), text_column="review", label_column="stars"))
    assert data.label_names == ["0", "1"]
    assert sum(data.sizes().values()) == 100


def test_duplicates_are_dropped_before_splitting(tmp_path):
    rows = sentiment_rows(100)
    data = load_task_data(DataConfig(path=str(write_csv(tmp_path / "d.csv", rows + rows[:30]))))
    assert sum(data.sizes().values()) == 100


def test_separate_files_and_unseen_labels(tmp_path):
    train = write_csv(tmp_path / "train.csv", sentiment_rows(60))
    val = write_csv(tmp_path / "val.csv", sentiment_rows(10, seed=1))
    test = write_csv(tmp_path / "test.csv", sentiment_rows(10, seed=2))
    data = load_task_data(DataConfig(path=str(train), validation_path=str(val), test_path=str(test)))
    assert data.sizes() == {"train": 60, "validation": 10, "test": 10}
    bad = write_csv(tmp_path / "bad.csv", sentiment_rows(9, seed=3, classes=("neg", "pos", "meh")))
    with pytest.raises(DataError, match="never seen in training"):
        load_task_data(DataConfig(path=str(train), validation_path=str(val), test_path=str(bad)))
    with pytest.raises(DataError, match="never seen"):
        load_task_data(DataConfig(path=str(train)), label_names=["neg", "meh"])


def test_bad_files_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_task_data(DataConfig(path=str(empty)))
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_task_data(DataConfig(path=str(header)))
    good = write_csv(tmp_path / "good.csv", sentiment_rows(50))
    with pytest.raises(DataError, match=r"no column\(s\) \['sentence'\].*\['text', 'label'\]"):
        load_task_data(DataConfig(path=str(good), text_column="sentence"))
    one = write_csv(tmp_path / "one.csv", [(t, "pos") for t, _ in sentiment_rows(50)])
    with pytest.raises(DataError, match="only one class"):
        load_task_data(DataConfig(path=str(one)))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown format"):
        load_task_data(DataConfig(path=str(odd)))
    with pytest.raises(ValueError, match="does not exist"):
        DataConfig(path=str(tmp_path / "missing.csv"))


def test_truncation_and_dynamic_padding(tmp_path, tokenizer):
    rows = [(" ".join(["good"] * n) + f" {n}", "pos" if n % 2 else "neg") for n in range(1, 41)]
    data = load_task_data(DataConfig(path=str(write_csv(tmp_path / "d.csv", rows)), max_length=12))
    examples = encode(data, tokenizer, max_length=12)
    assert max(len(e["input_ids"]) for s in examples.values() for e in s) == 12
    batch = Collator(tokenizer.pad_token_id)([examples["train"][0], examples["train"][1]])
    lengths = [len(examples["train"][i]["input_ids"]) for i in (0, 1)]
    assert batch["input_ids"].shape == (2, max(lengths))  # padded to the batch's longest only
    assert batch["attention_mask"].sum(1).tolist() == lengths
    loader = make_dataloader(examples["test"], tokenizer, batch_size=2)
    widths = [b["input_ids"].shape[1] for b in loader]
    assert widths == sorted(widths, reverse=True)  # evaluation batches sorted by length


def test_epoch_batches_are_seeded_sharded_and_length_grouped():
    lengths = [(i * 37) % 50 + 1 for i in range(1000)]
    a = epoch_batches(lengths, 10, seed=3, epoch=0)
    assert a == epoch_batches(lengths, 10, seed=3, epoch=0)
    assert a != epoch_batches(lengths, 10, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1000))
    r0 = epoch_batches(lengths, 10, seed=3, epoch=0, world=2, rank=0)
    r1 = epoch_batches(lengths, 10, seed=3, epoch=0, world=2, rank=1)
    assert len(r0) == len(r1) == 50
    assert not ({i for b in r0 for i in b} & {i for b in r1 for i in b})

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(lengths, 10, seed=3, epoch=0, group_by_length=False)
    assert padding(a) < 0.2 * padding(plain)
    assert len(eval_batches([{"input_ids": [0] * n} for n in lengths], 64)) == 16
