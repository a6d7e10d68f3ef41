"""`dynprune bench cpu` with the ONNX Runtime engines on a tiny model (no timed assertions), and its
errors before timing: bad thread counts, an engine that is not installed, an ONNX file that fails to load."""

import csv
import importlib.util

import pytest

pytest.importorskip("onnxruntime")

from dynprune.cli import main as cli_main
from tests.helpers import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_bert_ort")
    tiny_model("bert", layers=2, heads=4, hidden=64, ffn=256).save_pretrained(path)
    return path


def _argv(tiny_dir, out, *extra):
    return ["bench", "cpu", "--model", str(tiny_dir), "--out", str(out), "--batches", "1", "3", "--seqs", "12",
            "--budgets", "0.5", "--modes", "per_sample", "--repeats", "2", "--warmup", "1", "--block", "1",
            "--pause-ms", "1", "--threads", "1", "--env", "keep", "--engines", "eager", "ort", *extra]  # fmt: skip


def test_bench_cpu_ort_engines(tiny_dir, tmp_path):
    out = tmp_path / "bench.csv"
    assert cli_main(_argv(tiny_dir, out)) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for r in rows:
        # the default CPU path: the whole forward at batch 1 (routing in the graph, timed there);
        # a per-sample batch of 3 distinct masks is handed over to the PyTorch path
        one = r["batch"] == "1"
        assert r["gated_engine"] == ("onnxruntime (batch 1: whole forward)" if one else "torch (handed over)")
        assert r["router_engine"] == ("onnxruntime (in the whole graph)" if one else "torch")
        assert 0 <= float(r["router_share"]) < 1
        assert r["fastest_dense"] in ("eager", "ort")
        for key in ("ort_ms", "limit_ort_ms", "gated_torch_ms", "speedup_vs_ort", "gated_vs_limit_ort"):
            assert float(r[key]) > 0
    md = out.with_suffix(".md").read_text()
    assert "vs ONNX Runtime dense" in md and "spinning" in md


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_bad_thread_count(tiny_dir, tmp_path, threads):
    argv = _argv(tiny_dir, tmp_path / "x.csv")
    argv[argv.index("--threads") + 1] = threads
    with pytest.raises(SystemExit, match="threads must be >= 1"):
        cli_main(argv)
    assert not (tmp_path / "x.csv").exists()


def test_engine_not_installed(tiny_dir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(SystemExit, match=r"dynprune\[onnx\]"):
        cli_main(_argv(tiny_dir, tmp_path / "x.csv"))


def test_onnx_file_that_fails_to_load(tiny_dir, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="cannot load"):
        cli_main(_argv(tiny_dir, tmp_path / "x.csv", "--dense-onnx", str(bad)))
    assert not (tmp_path / "x.csv").exists()
