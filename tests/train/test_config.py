"""Configs: YAML <-> dataclasses one-to-one, typed CLI overrides, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from dynprune.train.cli import ConfigError, dump_config, main, parse_config
from dynprune.train.config import GateSection, TrainConfig
from dynprune.train.config_compat import config_diff

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = [
    "configs/minilm_rt.yaml",
    "configs/minilm_rt_quick.yaml",
    "configs/smollm2_kjv.yaml",
    "configs/smollm2_kjv_quick.yaml",
]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_parse_and_round_trip(name, tmp_path):
    cfg = parse_config(["--config", str(ROOT / name)])
    assert isinstance(cfg, TrainConfig)
    assert cfg.gate.router == "dynamic"
    assert cfg.stages[0] == ("gated" if cfg.task == "causal_lm" else "dense")
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert parse_config([f"--config={dumped}"]) == cfg


def test_quick_config_is_a_quick_start():
    cfg = parse_config(["--config", str(ROOT / "configs/minilm_rt_quick.yaml")])
    assert cfg.stages == [
        "dense",
        "gated",
        "static",
    ]  # the static control: the quick sweep compares against it
    assert cfg.data.max_train_examples is not None


def test_overrides_are_typed_and_applied():
    cfg = parse_config(
        [
            "--gate.temperature=0.5",
            "--optim.batch_size",
            "8",
            "--evaluation.budgets=[0.3,0.6]",
            "--model.path=null",
            "--resume",
        ]
    )
    assert cfg.gate.temperature == 0.5 and isinstance(cfg.gate.temperature, float)
    assert cfg.optim.batch_size == 8
    assert cfg.evaluation.budgets == [0.3, 0.6]
    assert cfg.model.path is None
    assert cfg.resume is True


@pytest.mark.parametrize(
    "args, key",
    [
        (["--gate.temperature=abc"], "gate.temperature"),
        (["--gate.bogus=1"], "gate.bogus"),
        (["--optim.batch_size=2.5"], "optim.batch_size"),
        (["--gate.router=sometimes"], "gate.router"),
        (["--gate.budget_min=0"], "gate.budget_min"),
        (["--gate.budget_min=0.6", "--gate.budget_max=0.4"], "gate.budget_min"),
        (["--gate.temperature=-1"], "gate.temperature"),
        (["--evaluation.budgets=[0.95]"], "evaluation.budgets"),
        (["--evaluation.budgets=[1.5]"], "evaluation.budgets"),
        (["--stages=[gated,dense]"], "stages"),
        (["--data.path=/nonexistent/file.csv"], "data.path"),
        (["--model.path=/nonexistent/model"], "model.path"),
        (["-x"], "-x"),
    ],
)
def test_bad_overrides_name_the_key(args, key):
    with pytest.raises(ConfigError) as err:
        parse_config(args)
    assert key in str(err.value)


def test_unknown_and_mistyped_yaml_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("gate:\n  temperature: 0.5\n  temprature: 0.1\n")
    with pytest.raises(ConfigError, match="temprature"):
        parse_config(["--config", str(bad)])
    bad.write_text("optim:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"optim\.batch_size"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_cli_reports_errors_without_touching_disk(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([f"--output_dir={out}", "--gate.temperature=hot"]) == 2
    assert "gate.temperature" in capsys.readouterr().err
    assert not out.exists()


def test_config_diff_names_changed_keys():
    a, b = TrainConfig().to_dict(), TrainConfig().to_dict()
    b["gate"]["router_layer"] = 1
    b["logging"]["log_every"] = 3  # logging may change on resume
    diff = config_diff(a, b)
    assert len(diff) == 1 and diff[0].startswith("gate.router_layer")


def test_config_diff_field_added_after_checkpoint():
    defaults = TrainConfig().to_dict()
    saved, now = TrainConfig().to_dict(), TrainConfig().to_dict()
    del saved["gate"]["backend"]  # checkpoint written before the field existed
    assert config_diff(saved, now, defaults=defaults) == []
    now["gate"]["backend"] = "torch"  # a non-default value changes behaviour
    diff = config_diff(saved, now, defaults=defaults)
    assert len(diff) == 1 and diff[0].startswith("gate.backend")


def test_config_diff_removed_keys_resume_when_their_behaviour_is_built_in():
    defaults, now = TrainConfig().to_dict(), TrainConfig().to_dict()
    saved = TrainConfig().to_dict()
    saved["gate"].update(budget_to_hidden=True, router_input_init=0.0)  # written before the removal
    assert config_diff(saved, now, defaults=defaults) == []
    saved["gate"]["budget_to_hidden"] = False  # a router this version cannot build
    diff = config_diff(saved, now, defaults=defaults)
    assert len(diff) == 1 and "gate.budget_to_hidden" in diff[0] and "cannot continue" in diff[0]


@pytest.mark.parametrize("key", ["budget_to_hidden", "router_input_init"])
def test_removed_keys_fail_with_a_note(tmp_path, key):
    with pytest.raises(ConfigError, match=f"gate.{key} was removed"):
        parse_config([f"--gate.{key}=1"])
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text(f"gate:\n  {key}: true\n")
    with pytest.raises(ConfigError, match=f"gate.{key} was removed.*delete it"):
        parse_config(["--config", str(yaml_file)])


def test_gate_section_is_the_core_config_plus_its_schedule():
    from dataclasses import fields

    from dynprune.config import GateConfig

    core = {f.name for f in fields(GateConfig)}
    assert core <= {f.name for f in fields(GateSection)}
    cfg = parse_config(["--gate.router_hidden=32", "--gate.backend=torch", "--gate.unit_order=taylor"])
    g = cfg.gate.gate_config(router="static")
    assert (g.router_hidden, g.backend, g.router, g.unit_order) == (32, "torch", "static", "weight_norm")
    with pytest.raises(ConfigError, match="budget_conditioned must be true"):
        parse_config(["--gate.budget_conditioned=false"])
    with pytest.raises(ConfigError, match=r"evaluation\.execution"):
        parse_config(["--gate.execution=gathered"])


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"did you mean: gate\.temprature -> gate\.temperature"):
        parse_config(["--gate.temprature=0.5"])


def test_mixed_precision_no_is_a_string_not_yaml_false(tmp_path):
    """YAML reads a bare `no` as False: the documented value must still work, from the command line
    and from a file, and survive a round trip through the dumped config."""
    cfg = parse_config(["--optim.mixed_precision=no"])
    assert cfg.optim.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  mixed_precision: no\n")
    assert parse_config(["--config", str(path)]).optim.mixed_precision == "no"
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert parse_config(["--config", str(again)]).optim.mixed_precision == "no"
    assert parse_config(["--optim.mixed_precision=bf16"]).optim.mixed_precision == "bf16"
