"""Shared fixtures: tiny random Gemma 2 / Gemma 3 checkpoints (exactness only, never quality claims)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from make_tiny_checkpoint import make_tiny_checkpoint  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
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
