"""Shared fixtures: tiny random Gemma 2 / Gemma 3 checkpoints (exactness only, never quality claims)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"  # the full WikiText-2 beside a checkout (CI has it)
WIKI_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"  # calibration only
WIKI_TEST = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"  # evaluation only
TEST_TEXT = ROOT / "data" / "wiki.test.excerpt.raw"
CALIB_TEXT = ROOT / "data" / "wiki.valid.excerpt.txt"


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "gemma2", "gemma2")


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "gemma3", "gemma3")


@pytest.fixture(params=["gemma2", "gemma3"])
def tiny_ckpt(request, tiny_gemma2, tiny_gemma3) -> Path:
    return {"gemma2": tiny_gemma2, "gemma3": tiny_gemma3}[request.param]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# In CI (CI is set) a skipped test is a failure: a missing oracle or missing ../shared must not pass silently.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and rep.skipped and not hasattr(rep, "wasxfail"):
        rep.outcome = "failed"
        rep.longrepr = f"skipped in CI, where every test must run: {rep.longrepr}"


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if os.environ.get("CI") and skipped and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def libggml() -> Path:
    """Path of libggml-base inside the installed llama-cpp-python: ggml's C reference, through ctypes."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python provides the libggml-base C reference")
    from quantkit.formats.gguf.reference import libggml_path

    path = libggml_path()
    if path is None:
        pytest.skip("llama_cpp is installed but its libggml-base was not found")
    return path


def llama_and_quantkit_logits(path: Path, ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [T, vocab] of llama.cpp (llama-cpp-python; the test is skipped without it) and of quantkit's
    forward on the same GGUF's weights, for ``ids`` (default: BOS then 24 plain tokens)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    from quantkit.formats.gguf.model import GGUFModel
    from quantkit.model import build_model

    ids = ids or [2, *range(100, 124)]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = build_model(GGUFModel(path))(torch.tensor([ids]))[0]
    return theirs, ours
