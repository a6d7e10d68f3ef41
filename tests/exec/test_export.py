"""``dynprune export``: the gated checkpoint as one ONNX graph + a numpy/onnxruntime runner; its
predictions and executed FLOPs equal the GatedModel's, and it loads without torch."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import dynprune
from dynprune import GateConfig
from dynprune.exec import gated_runtime
from dynprune.exec.export import check_round_trip, export_gated, flops_quadratics, main
from dynprune.io import save_gated_model
from tests.helpers import ENCODER_TYPES, tiny_model


def _gated(model_type="bert", router="dynamic"):
    gated = dynprune.wrap(
        tiny_model(model_type, layers=3), GateConfig(ffn_slice_size=16, router=router)
    ).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in gated.router.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return gated


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_round_trip_equals_the_gated_model(tmp_path, model_type):
    gated = _gated(model_type)
    out = export_gated(gated, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == [
        "gated.json",
        "gated.onnx",
        "gated.onnx.data",
        "run_gated.py",
    ]
    g = torch.Generator().manual_seed(2)
    samples = [torch.randint(3, 120, (n,), generator=g) for n in (4, 19, 40)]
    assert check_round_trip(gated, out, samples) <= 1e-4


def test_padded_batch_runs_each_sample_at_its_length(tmp_path):
    """Rows of a padded batch equal batch-1 GatedModel calls on the unpadded rows (per-sample budgets)."""
    gated = _gated()
    out = export_gated(gated, tmp_path / "exported")
    runtime = gated_runtime.GatedOnnx(out)
    ids = torch.randint(3, 120, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    budgets = [0.3, 0.6, 1.0]
    outputs, ratios = runtime(ids.numpy(), mask.numpy(), budget=budgets)
    for row, budget in enumerate(budgets):
        keep = mask[row].bool()
        with torch.inference_mode():
            ref = gated(input_ids=ids[row][keep][None], budget=budget).logits
        np.testing.assert_allclose(outputs[row : row + 1], ref.numpy(), atol=1e-5)
        assert ratios[row] == pytest.approx(float(gated.last.flops_ratio[0]), abs=1e-12)


def test_runner_needs_no_torch(tmp_path):
    out = export_gated(_gated("roberta"), tmp_path / "exported")
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        "from run_gated import GatedOnnx; import numpy as np; "
        f"m = GatedOnnx({str(out)!r}, threads=1); o, r = m(np.array([[5, 6, 7, 8]]), budget=0.5); "
        "print(o.shape, float(r[0]))"
    )
    env = {**os.environ, "PYTHONPATH": str(out)}  # how a deployment imports the exported runner
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    shape, ratio = done.stdout.rsplit(" ", 1)
    assert shape == "(1, 2)" and 0 < float(ratio) <= 0.5


def test_flops_quadratics_are_the_flops_model(tmp_path):
    fm = _gated().flops
    quad = flops_quadratics(fm)
    for seq in (1, 9, 128, 513):
        for name, f in (
            ("dense", fm.dense),
            ("fixed", fm.fixed),
            ("head_cost", fm.head_cost),
            ("slice_cost", fm.slice_cost),
        ):
            a, b, c = quad[name]
            assert a * seq * seq + b * seq + c == pytest.approx(f(seq), rel=1e-12)


def test_unsupported_models_and_existing_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="learned routers"):
        export_gated(_gated(router="random"), tmp_path / "a")
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gated(_gated(), target)
    assert (target / "keep.txt").read_text() == "x"


def test_runner_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing gated\.onnx, gated\.json"):
        gated_runtime.GatedOnnx(tmp_path)
    out = export_gated(_gated(), tmp_path / "exported")
    runtime = gated_runtime.GatedOnnx(out)
    for budget in (0.0, -1, 1.5, float("nan"), True, "0.5", None):
        with pytest.raises(ValueError, match="budget must be"):
            runtime(np.array([[5, 6, 7]]), budget=budget)
    with pytest.raises(ValueError, match="below the smallest"):
        runtime(np.array([[5, 6, 7]]), budget=1e-6)
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        runtime(np.array([5, 6, 7]))
    with pytest.raises(ValueError, match="2 budgets for a batch of 1"):
        runtime(np.array([[5, 6, 7]]), budget=[0.5, 0.5])
    with pytest.raises(ValueError, match="threads must be"):
        gated_runtime.GatedOnnx(out, threads=0)
    meta = json.loads((out / "gated.json").read_text())
    (out / "gated.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        gated_runtime.GatedOnnx(out)
    (out / "gated.json").write_text(json.dumps(meta))
    (out / "gated.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot load"):
        gated_runtime.GatedOnnx(out)


def test_cli_exports_a_checkpoint_and_refuses_a_missing_one(tmp_path, capsys):
    save_gated_model(_gated(), tmp_path / "ckpt")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 0
    assert "round trip" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out2")]) == 2
    assert "not a saved gated model" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]) == 2
