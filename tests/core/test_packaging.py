"""A real (non-editable) wheel holds every sub-package, remapped under dynprune.*, and no
top-level `kernels`/`train`/`eval` (HF's `kernels` is another PyPI package)."""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REMAPPED = {
    "gpu_kernels": "dynprune/kernels",
    "train": "dynprune/train",
    "eval": "dynprune/eval",
    "dynprune": "dynprune",
}


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        env={"PATH": "/usr/bin:/bin", "TMPDIR": str(build), "PIP_NO_INDEX": "1"},
        cwd=build,
    )
    (wheel,) = out.glob("dynprune-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_every_source_package_and_module_is_in_the_wheel(wheel_files):
    missing = []
    for src, dst in REMAPPED.items():
        assert (ROOT / src / "__init__.py").is_file(), f"{src}/ is not a package of this repository"
        for py in (ROOT / src).rglob("*.py"):
            rel = py.relative_to(ROOT / src)
            if "__pycache__" in rel.parts:
                continue
            if f"{dst}/{rel.as_posix()}" not in wheel_files:
                missing.append(f"{src}/{rel.as_posix()}")
    assert not missing, f"not in the wheel (list the sub-package in pyproject.toml): {missing}"
    assert "dynprune/py.typed" in wheel_files


def test_no_colliding_top_level_names(wheel_files):
    tops = {
        name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"dynprune"}, tops


def test_console_script_is_declared(wheel_files):
    entry = next(n for n in wheel_files if n.endswith("entry_points.txt"))
    assert entry


def test_no_repository_package_shadows_an_installed_one():
    """pytest and `python -m` put the repository root first on sys.path: a package directory
    there named like an installed module (HF's `kernels`, which transformers >= 5.25 imports)
    would be imported in its place."""
    installed = importlib.metadata.packages_distributions()
    ours = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} - {"dynprune", "tests"}
    assert ours, "no top-level packages found: is ROOT the repository root?"
    shadowing = {name: installed[name] for name in ours if name in installed}
    assert not shadowing, f"rename these directories (and their package-dir in pyproject.toml): {shadowing}"
