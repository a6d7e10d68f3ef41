"""`dynprune bench generate`: bad arguments are refused before the model is loaded."""

from dynprune.eval import bench_generate


def test_bench_generate_refuses_bad_budgets_and_existing_outputs(tmp_path, capsys):
    assert bench_generate.main(["--budget", "1.5"]) == 2
    assert "budgets must be in (0, 1)" in capsys.readouterr().err
    out = tmp_path / "r.csv"
    out.write_text("keep me")
    assert bench_generate.main(["--out", str(out)]) == 2
    assert out.read_text() == "keep me"


def test_rows_of_a_run_write_to_csv(tmp_path):
    """Every key a run's row has is a CSV column (a run once died at the very end writing its CSV)."""
    import csv

    row = {c: 1 for c in bench_generate.COLUMNS}
    row["select"] = "uniform"
    bench_generate.write_rows(tmp_path / "r.csv", [row])
    with open(tmp_path / "r.csv") as f:
        assert next(csv.DictReader(f))["select"] == "uniform"


def test_llama_cpp_without_its_package_is_refused_before_any_model_loads(capsys):
    import importlib.util

    import pytest

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed here")
    assert bench_generate.main(["--llama-cpp", "--quick"]) == 2
    assert "pip install 'dynprune[llama]'" in capsys.readouterr().err
