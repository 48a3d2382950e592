"""quantkit as an installed package: the wheel carries the recipes and the shipped text excerpts, and a
recipe quantizes with the default calibration text from outside the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import quantkit
import quantkit.io.texts as texts
from quantkit.io.calibration import SHIPPED_CALIB

SOURCES = ("pyproject.toml", "README.md", "quantkit", "recipes", "data")


def _run(args: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The wheel built from a copy of the source tree (offline, no build isolation), installed into a
    directory of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if name != "README.md"
                                        and (ROOT / name).is_dir() else {}))  # fmt: skip
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("quantkit-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", tmp / "site", wheel])
    return tmp / "site"


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_wheel_ships_recipes_and_texts(site, tmp_path):
    code = (
        "import quantkit, quantkit.quant.recipes as r, quantkit.io.texts as d;"
        "print(quantkit.__file__); print(r.RECIPES_DIR); print(d.default_calibration_text());"
        "print(d.default_evaluation_text());"
        "print(*(d.resolve_dataset(n)[1] for n in d.SHIPPED_TEXTS), sep=chr(10));"
        "import quantkit.io.calibration as c; print(*(s.path for s in c.calibration_sources('mix')), sep=chr(10))"
    )
    lines = _run([sys.executable, "-c", code], cwd=tmp_path, env=_env(site)).stdout.split()
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in lines), lines
    assert sorted(p.name for p in Path(lines[1]).glob("*.toml")) == sorted(
        p.name for p in (ROOT / "recipes").glob("*.toml")
    )
    named = [texts.SHIPPED_TEXTS[n] for n in texts.SHIPPED_TEXTS]  # --dataset wiki, code, fr, chat
    calib = list(SHIPPED_CALIB.values())  # --calib mix
    originals = ["wiki.valid.excerpt.txt", "wiki.test.excerpt.raw", *named, *calib]
    assert len(lines) == 4 + len(named) + len(calib)
    for shipped, original in zip(lines[2:], originals, strict=True):
        assert Path(shipped).read_bytes() == (ROOT / "data" / original).read_bytes()
    licences = {p.name for p in Path(lines[2]).parent.glob("LICENSE.*.txt")}
    assert licences == {"LICENSE.python.txt", "LICENSE.vim.txt"}  # the shipped texts' licences travel with them


def test_wheel_version(site, tmp_path):
    out = _run([sys.executable, "-m", "quantkit.cli", "--version"], cwd=tmp_path, env=_env(site)).stdout
    assert out.strip() == f"quantkit, version {quantkit.__version__}"


def test_recipe_and_default_texts_from_the_wheel(site, tiny_gemma2, tmp_path):
    """From a directory outside the repository, with only the wheel's quantkit importable."""
    env = _env(site)
    cli = [sys.executable, "-m", "quantkit.cli", "--quiet"]
    args = ["quantize", tiny_gemma2, "--recipe", "int4-g128-gptq", "--nsamples", "4", "--seqlen", "32"]
    _run([*cli, *args, "-o", "out", "--json"], cwd=tmp_path, env=env)
    report = json.loads((tmp_path / "out" / "quantkit.json").read_text())
    assert report["options"]["method"] == "gptq" and report["options"]["bits"] == 4
    assert report["options"]["group_size"] == 128 and report["options"]["calib"] is None  # the default text
    res = _run([*cli, "eval-ppl", tiny_gemma2, "--ctx", "64", "--chunks", "2", "--json"], cwd=tmp_path, env=env)
    assert json.loads(res.stdout)["chunks"] == 2
