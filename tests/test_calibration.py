"""Calibration sets: several texts with weights, the shipped set, and the wall between calibration and
evaluation texts."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import CALIB_TEXT

from quantkit.cli import cli
from quantkit.errors import QuantkitError
from quantkit.io.calibration import (
    SHIPPED_CALIB,
    calibration_label,
    calibration_set_windows,
    calibration_sources,
    split_samples,
)
from quantkit.io.texts import SHIPPED_TEXTS, calibration_windows, shipped
from quantkit.io.tokenizer import Tokenizer


@pytest.mark.parametrize("weights,n", [([1, 1, 1, 1], 10), ([3, 1], 7), ([0.2, 0.5, 0.3], 64), ([1], 5)])
def test_split_is_proportional(weights, n):
    counts = split_samples(weights, n)
    assert sum(counts) == n
    assert all(abs(c - n * w / sum(weights)) < 1 for c, w in zip(counts, weights, strict=True))


def test_one_text_gives_the_single_text_windows(tiny_gemma2):
    tok = Tokenizer(tiny_gemma2 / "tokenizer.model")
    old = calibration_windows(tok, CALIB_TEXT, 6, 32, 3)
    assert torch.equal(calibration_set_windows(tok, str(CALIB_TEXT), 6, 32, 3), old)
    default, mix = (calibration_set_windows(tok, spec, 6, 32, 3) for spec in (None, "mix"))
    assert torch.equal(default, mix) and not torch.equal(default, old)  # the default is the shipped mix


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def test_set_windows_come_from_each_text_by_weight(tiny_gemma2):
    tok = Tokenizer(tiny_gemma2 / "tokenizer.model")
    ids = calibration_set_windows(tok, "wiki:3,code", 8, 24, 0)  # 6 windows of wiki, then 2 of code
    texts = {n: tok.encode((shipped("texts") / SHIPPED_CALIB[n]).read_text(), bos=False) for n in ("wiki", "code")}
    assert ids.shape == (8, 24) and (ids[:, 0] == tok.bos_id).all()
    for row, name in zip(ids.tolist(), ["wiki"] * 6 + ["code"] * 2, strict=True):
        assert _contains(texts[name], row[1:]), name


def test_mix_names_four_texts_and_labels_without_paths(tmp_path):
    assert [s.label for s in calibration_sources("mix")] == ["wiki", "code", "chat", "multilingual"]
    mine = tmp_path / "mine.txt"
    mine.write_text("text\n")
    assert calibration_label(f"{mine}:0.5,chat") == "mine.txt:0.5,chat"
    for bad, why in [("wiki:-1", "positive"), ("wiki,wiki", "twice"), ("wiki,,code", "empty")]:
        with pytest.raises(QuantkitError, match=why):
            calibration_sources(bad)


def _windows(text: str, width: int = 160) -> set[str]:
    flat = " ".join(text.split())
    return {flat[i : i + width] for i in range(0, max(1, len(flat) - width), width)}


def test_no_evaluation_text_is_in_a_calibration_text():
    """Never calibrate on what is evaluated: no 160-character stretch of any shipped evaluation text (whitespace
    folded) occurs in any shipped calibration text."""
    calib = " ".join(" ".join((shipped("texts") / f).read_text().split()) for f in SHIPPED_CALIB.values())
    for name, f in SHIPPED_TEXTS.items():
        shared = [w for w in _windows((shipped("texts") / f).read_text()) if w in calib]
        assert not shared, (name, shared[:2])


def test_quantize_with_a_weighted_set_end_to_end(tiny_gemma2, tmp_path):
    """Two --calib options make one set; the report, the card and the imatrix name the set, never a path."""
    from quantkit.formats.gguf.imatrix import read_imatrix

    out, imat = tmp_path / "q", tmp_path / "q.imatrix.gguf"
    args = ["quantize", str(tiny_gemma2), "--calib", "wiki:3", "--calib", "chat", "--nsamples", "4",
            "--seqlen", "32", "--fast", "-o", str(out), "--imatrix-out", str(imat)]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "quantkit.json").read_text())["options"]["calib"] == "wiki:3,chat"
    assert "calibrated on wiki:3,chat: 4 windows" in (out / "README.md").read_text()
    from gguf import GGUFReader

    assert read_imatrix(imat) and bytes(GGUFReader(imat).fields["imatrix.datasets"].parts[-1]).decode() == "wiki:3,chat"
    bad = CliRunner().invoke(cli, [*args[:-4], "--calib", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "calibration file not found" in bad.output
    assert not (tmp_path / "b").exists()
