"""quantkit ladder on a tiny checkpoint: its files are the separate quantize / export commands' files, byte
for byte, sequentially and on a 2-worker local Ray cluster; its report is eval-ppl's numbers; a ladder killed
with SIGKILL and rerun makes only what was missing and ends with the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import CALIB_TEXT, ROOT, TEST_TEXT

from quantkit.cli import cli
from quantkit.formats.gguf.policy import FILE_TYPES
from quantkit.formats.gguf.stream import torch_threads

TYPES = "q4_0,q8_0"
CALIB = ["--nsamples", "4", "--seqlen", "32", "--calib", str(CALIB_TEXT)]
EVAL = ["--dataset", str(TEST_TEXT), "--ctx", "32", "--chunks", "4", "--threads", "1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _ladder_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["ladder", str(model), "--types", TYPES, *CALIB, *EVAL, "-o", str(out), "--json", *extra]


def _invoke(args: list[str]):
    with torch_threads(1):  # the separate commands run with the ladder's one thread per job
        return CliRunner().invoke(cli, args)


def _ok(args: list[str]) -> dict:
    res = _invoke(args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _ggufs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.gguf"))}


@pytest.fixture(scope="module")
def ladder(tiny_gemma2, tmp_path_factory) -> tuple[Path, dict]:
    """A sequential GPTQ ladder of two types, and its report."""
    out = tmp_path_factory.mktemp("ladder") / "seq"
    return out, _ok(_ladder_args(tiny_gemma2, out))


def test_ladder_files_are_the_separate_commands_files(tiny_gemma2, ladder, tmp_path):
    out, report = ladder
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["quantkit.json", "report.json", "README.md", "quality.png", "gemma2-Q4_0.gguf", "gemma2-Q8_0.gguf"]
    )
    for t in TYPES.split(","):
        sep = tmp_path / f"{t}.gguf"
        _ok(["quantize", str(tiny_gemma2), "--method", "gptq", "--format", "gguf", "--type", t, *CALIB,
             "-o", str(sep), "--json"])  # fmt: skip
        assert sep.read_bytes() == (out / f"gemma2-{t.upper()}.gguf").read_bytes(), t
    # the report is eval-ppl's one pass over the same files
    files = [str(out / r["file"]) for r in report["types"]]
    ev = _ok(["eval-ppl", str(tiny_gemma2), *[a for f in files for a in ("--quantized", f)], *EVAL[:6], "--json"])
    assert report["reference"] == ev["reference"]
    for got, want in zip(report["types"], ev["models"], strict=True):
        assert {k: got[k] for k in want if k != "name"} == {k: v for k, v in want.items() if k != "name"}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gguf" in card and "![quality against size](quality.png)" in card
    assert f"| Q4_0 | {report['types'][0]['size_bytes'] / 1e6:.1f} |" in card


def test_rtn_ladder_is_the_plain_export(tiny_gemma3, tmp_path):
    out = tmp_path / "rtn"
    report = _ok(["ladder", str(tiny_gemma3), "--types", "q4_k_m", "--method", "rtn", *EVAL, "-o", str(out), "--json"])
    assert [b["method"] for b in report["built"]] == ["export"]
    _ok(["export", str(tiny_gemma3), "--type", "q4_k_m", "-o", str(tmp_path / "e.gguf"), "--json"])
    assert (tmp_path / "e.gguf").read_bytes() == (out / "gemma3-Q4_K_M.gguf").read_bytes()


def test_rerun_of_a_finished_ladder_does_nothing(tiny_gemma2, ladder):
    out, report = ladder
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = _ok(_ladder_args(tiny_gemma2, out))
    assert again == report and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_refusals_are_one_line_and_leave_nothing(tiny_gemma2, ladder, tmp_path, monkeypatch):
    out, _ = ladder
    new, foreign = tmp_path / "new", tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("x")
    cases = [
        (
            ["ladder", str(tiny_gemma2), "--types", "q4_0,q3_0", "-o", str(new)],
            f"(supported: {', '.join(FILE_TYPES)})",
        ),
        (
            ["ladder", str(tiny_gemma2), "--types", "q4_0,iq2_m", "--method", "rtn", "-o", str(new)],
            "--type iq2_m requires an importance matrix",
        ),
        ([*_ladder_args(tiny_gemma2, out), "--seed", "7"], "a ladder of other settings (differs in calibration.seed)"),
        (_ladder_args(tiny_gemma2, foreign), "not empty and not a quantkit ladder"),
    ]
    for args, want in cases:
        res = _invoke(args)
        assert res.exit_code == 2 and want in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    res = _invoke(_ladder_args(tiny_gemma2, new, "--ray"))
    assert res.exit_code == 2 and res.stderr.startswith("quantkit: error: --ray: Ray is not installed")
    assert "pip install 'quantkit[ray]'" in res.stderr and len(res.stderr.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"] and [p.name for p in foreign.iterdir()] == [
        "mine.txt"
    ]


def test_ray_gives_the_same_files_and_report(tiny_gemma2, ladder, tmp_path):
    ray = pytest.importorskip("ray")
    out, report = ladder
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}
    )
    try:
        on_ray = _ok(_ladder_args(tiny_gemma2, tmp_path / "ray", "--ray", "--workers", "2"))
    finally:
        ray.shutdown()
    assert _ggufs(tmp_path / "ray") == _ggufs(out)
    assert on_ray["mode"] == "ray" and sorted(b["type"] for b in on_ray["built"]) == sorted(TYPES.split(","))
    assert on_ray["types"] == report["types"] and on_ray["reference"] == report["reference"]


# Runs the CLI in this process and SIGKILLs it once the second type's GPTQ has finished 2 of its layers.
_KILL = """
import os, signal, sys
from quantkit.quant.run_state import RunState
n = int(sys.argv.pop(1))
real, calls = RunState.end_layer, []
def end_layer(self, writer, i, *args, **kwargs):
    real(self, writer, i, *args, **kwargs)
    calls.append(i)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)
RunState.end_layer = end_layer
from quantkit.cli import cli
cli(sys.argv[1:])
"""


def test_killed_ladder_reruns_only_what_is_missing(tiny_gemma2, ladder, tmp_path):
    out = tmp_path / "out"
    args = _ladder_args(tiny_gemma2, out)
    proc = subprocess.run([sys.executable, "-c", _KILL, "6", *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = out / "gemma2-Q4_0.gguf"  # 4 layers: the first type is done, the second 2 layers in
    assert first.is_file() and not (out / "gemma2-Q8_0.gguf").exists() and not (out / "report.json").exists()
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", *args], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "resuming at layer 2 of 4" in proc.stderr  # the second type continued where it was cut
    assert [b["type"] for b in json.loads(proc.stdout)["built"]] == ["q8_0"]
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # never written again
    assert _ggufs(out) == _ggufs(ladder[0])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
