"""Two commands raced on one output, as real concurrent processes: one wins, the other ends with one
``quantkit: error:`` line, and what is left is the winner's complete artifact (the bytes of an unraced run),
with no hidden work files. Also a rerun raced against another rerun of a killed (resumable) quantize.

``RACE_PAIRS`` sets how many raced pairs each test runs (3 here; ``RACE_PAIRS=50`` for the long check)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_resume import _KILL_AFTER, ENV, GPTQ, _cmd, _files, _layers_done

PAIRS = int(os.environ.get("RACE_PAIRS", "3"))


def _export_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "quantkit.cli", "export", str(model), "--type", "q8_0", "-o", str(out)]


def _race(cmd_a: list[str], cmd_b: list[str]) -> list[subprocess.CompletedProcess]:
    """Start both commands at once; (returncode, stderr) of each."""
    procs = [subprocess.Popen(c, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in (cmd_a, cmd_b)]  # fmt: skip
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), "", p.stderr.read()) for p in procs]


def _one_wins(results: list[subprocess.CompletedProcess]) -> str:
    """Exactly one exit 0; the other exit 2 with one error line. Returns that line."""
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 2], [(r.returncode, r.stderr[-800:]) for r in results]
    err = next(r.stderr for r in results if r.returncode == 2).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("quantkit: error:") and "Traceback" not in err[0], err
    return err[0]


def _pair_dirs(tmp_path: Path) -> list[Path]:
    """A fresh directory for each raced pair."""
    dirs = [tmp_path / f"pair{k}" for k in range(PAIRS)]
    for d in dirs:
        d.mkdir()
    return dirs


def _only(parent: Path, names: set[str]) -> None:
    left = {p.name for p in parent.iterdir()}
    assert left == names, f"left behind: {sorted(left - names)}"


def test_raced_exports_leave_one_complete_file(tiny_gemma2, tmp_path):
    ref = tmp_path / "ref.gguf"
    assert subprocess.run(_export_cmd(tiny_gemma2, ref), env=ENV, capture_output=True).returncode == 0
    for d in _pair_dirs(tmp_path):
        out = d / "m.gguf"
        _one_wins(_race(_export_cmd(tiny_gemma2, out), _export_cmd(tiny_gemma2, out)))
        assert out.read_bytes() == ref.read_bytes()
        _only(d, {"m.gguf"})


def test_raced_quantizes_leave_one_complete_artifact(tiny_gemma2, tmp_path):
    args = ["--method", "rtn", "--group", "64"]
    ref = tmp_path / "ref"
    assert subprocess.run(_cmd(tiny_gemma2, ref, args), env=ENV, capture_output=True).returncode == 0
    for d in _pair_dirs(tmp_path):
        out = d / "q"
        _one_wins(_race(_cmd(tiny_gemma2, out, args), _cmd(tiny_gemma2, out, args)))
        assert _files(out) == _files(ref)
        _only(d, {"q"})


def test_raced_reruns_of_a_killed_run_resume_once(tiny_gemma2, tmp_path):
    """A GPTQ run killed after layer 2 leaves its resumable state; two reruns started at once: one resumes
    it to the end with the bytes of an uninterrupted run, the other is refused while the first holds it."""
    ref = tmp_path / "ref"
    assert subprocess.run(_cmd(tiny_gemma2, ref, GPTQ), env=ENV, capture_output=True).returncode == 0
    for d in _pair_dirs(tmp_path):
        out = d / "q"
        kill = [sys.executable, "-c", _KILL_AFTER, "2", *_cmd(tiny_gemma2, out, GPTQ)[3:]]
        proc = subprocess.run(kill, env=ENV, capture_output=True, text=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert _layers_done(d / ".q.partial") == 2
        _one_wins(_race(_cmd(tiny_gemma2, out, GPTQ), _cmd(tiny_gemma2, out, GPTQ)))
        assert _files(out) == _files(ref)
        _only(d, {"q"})


@pytest.mark.parametrize("second", ["export", "quantize"])
def test_a_command_on_a_busy_output_names_the_other_run(tiny_gemma2, tmp_path, second):
    """While one command holds an output, another on it is refused at once, saying why."""
    from quantkit.io.atomic import check_output
    from quantkit.io.locks import release_outputs

    out = tmp_path / ("m.gguf" if second == "export" else "q")
    check_output(out, [tiny_gemma2], kind="file" if second == "export" else "dir")  # this process holds it
    try:
        cmd = _export_cmd(tiny_gemma2, out) if second == "export" else _cmd(tiny_gemma2, out, ["--method", "rtn"])
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    finally:
        release_outputs()
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "another quantkit command is writing it" in line[0], line
    _only(tmp_path, set())
