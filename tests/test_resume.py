"""Resumable quantize: a run killed with SIGKILL after layer k continues from layer k when the same command
is run again, and ends with the same bytes as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CALIB_TEXT, ROOT, make_tiny_checkpoint

N_LAYERS = 8
GPTQ = ["--method", "gptq", "--fast", "--nsamples", "8", "--seqlen", "64", "--calib", str(CALIB_TEXT), "--seed", "3"]
RTN = ["--method", "rtn", "--group", "64"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def deep_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("deep") / "m", "gemma2", num_hidden_layers=N_LAYERS)


def _cmd(model: Path, out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "quantize", str(model), "-o", str(out), "--json", *args]


def _quantize(model: Path, out: Path, args: list[str]) -> dict:
    proc = subprocess.run(_cmd(model, out, args), env=ENV, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _files(out: Path) -> dict[str, bytes]:
    """Every file of an artifact except quantkit.json (it records time, memory and the resume point); the
    model card with its directory's name taken out (it names the artifact)."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "quantkit.json"}
    return files | {"README.md": re.sub(rb"\b%s\b" % out.name.encode(), b"OUT", files["README.md"])}


def _layers_done(partial: Path) -> int:
    try:
        return json.loads((partial / "resume-state.json").read_text())["progress"]["layers_done"]
    except (OSError, ValueError, KeyError):  # not there yet, or being replaced right now
        return 0


# Runs the CLI in this process and SIGKILLs it right after layer K's state is on disk: a hard kill at a
# known layer, whatever the machine's speed.
_KILL_AFTER = """
import os, signal, sys
from quantkit.quant.run_state import RunState
k = int(sys.argv.pop(1))
real = RunState.end_layer
def end_layer(self, writer, i, *args, **kwargs):
    real(self, writer, i, *args, **kwargs)
    if i + 1 == k:
        os.kill(os.getpid(), signal.SIGKILL)
RunState.end_layer = end_layer
from quantkit.cli import cli
cli(sys.argv[1:])
"""


@pytest.mark.parametrize("args", [RTN, GPTQ, [*GPTQ, "--fp-targets"]], ids=["rtn", "gptq", "gptq-fp-targets"])
def test_killed_at_layer_k_resumes_there_with_identical_bytes(deep_ckpt, tmp_path, args):
    whole = tmp_path / "whole"
    assert _quantize(deep_ckpt, whole, args)["resumed_from_layer"] == 0
    out, k = tmp_path / "out", 3
    cmd = [sys.executable, "-c", _KILL_AFTER, str(k), *_cmd(deep_ckpt, out, args)[3:]]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    partial = tmp_path / ".out.partial"
    assert not out.exists() and _layers_done(partial) == k  # nothing finished-looking, the state says k
    report = _quantize(deep_ckpt, out, args)
    assert report["resumed_from_layer"] == k
    assert [r["layer"] for r in report["layers"]] == list(range(N_LAYERS))
    assert not partial.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]
    assert _files(out) == _files(whole)


def test_external_sigkill_then_rerun(deep_ckpt, tmp_path):
    """The CLI as a user runs it, killed from outside once the partial directory records layer 2."""
    whole, out = tmp_path / "whole", tmp_path / "out"
    _quantize(deep_ckpt, whole, GPTQ)
    partial = tmp_path / ".out.partial"
    proc = subprocess.Popen(_cmd(deep_ckpt, out, GPTQ), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _layers_done(partial) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    k = _layers_done(partial)
    assert 2 <= k < N_LAYERS and not out.exists(), k
    report = _quantize(deep_ckpt, out, GPTQ)
    assert report["resumed_from_layer"] == k
    assert _files(out) == _files(whole)


def test_other_command_does_not_resume(deep_ckpt, tmp_path):
    """A partial directory left by one command is started afresh by a different command (other seed)."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", _KILL_AFTER, "2", *_cmd(deep_ckpt, out, GPTQ)[3:]]
    assert subprocess.run(cmd, env=ENV, capture_output=True, check=False).returncode == -signal.SIGKILL
    other = [*GPTQ[:-1], "4"]
    assert _quantize(deep_ckpt, out, other)["resumed_from_layer"] == 0


def test_foreign_partial_directory_is_refused(tiny_gemma2, tmp_path):
    (tmp_path / ".out.partial").mkdir()
    (tmp_path / ".out.partial" / "mine.txt").write_text("not quantkit's")
    proc = subprocess.run(_cmd(tiny_gemma2, tmp_path / "out", RTN), env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not quantkit's work in progress" in proc.stderr
    assert (tmp_path / ".out.partial" / "mine.txt").read_text() == "not quantkit's"
