"""Bad input: a one-line error naming the file and the problem, exit status 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from quantkit.cli import cli


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _break_missing_shard(d: Path) -> str:
    _shards(d)[1].unlink()
    return "shard named in model.safetensors.index.json is missing"


def _break_truncated(d: Path) -> str:
    p = _shards(d)[0]
    p.write_bytes(p.read_bytes()[:-1000])
    return "truncated safetensors file"


def _break_header(d: Path) -> str:
    p = _shards(d)[0]
    data = bytearray(p.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    p.write_bytes(bytes(data))
    return "corrupt safetensors header"


def _break_shape(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (d / "config.json").write_text(json.dumps(cfg))
    return "has shape [512, 256], config.json implies [384, 256]"


def _break_arch(d: Path) -> str:
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return "unsupported architecture (model_type='llama'"


def _break_tokenizer(d: Path) -> str:
    (d / "tokenizer.model").unlink()
    return "tokenizer.model not found"


def _break_pickle(d: Path) -> str:
    for p in _shards(d):
        p.unlink()
    (d / "model.safetensors.index.json").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    return "never unpickles"


def _break_nan(d: Path) -> str:
    from safetensors import safe_open

    p = _shards(d)[0]
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(p))
    return "contains NaN or inf values"


BREAKERS = [
    _break_missing_shard,
    _break_truncated,
    _break_header,
    _break_shape,
    _break_arch,
    _break_tokenizer,
    _break_pickle,
    _break_nan,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_bad_checkpoint_gives_one_line_error(tiny_gemma2, tmp_path, breaker):
    model = _copy(tiny_gemma2, tmp_path)
    expected = breaker(model)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["quantize", str(model), "--method", "rtn", "-o", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("quantkit: error:")]
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "Traceback" not in res.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_console_script_exit_status(tiny_gemma2, tmp_path):
    model = _copy(tiny_gemma2, tmp_path)
    _break_missing_shard(model)
    proc = subprocess.run([sys.executable, "-m", "quantkit.cli", "inspect", str(model)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_inspect_reports_config_and_estimates(tiny_gemma2):
    res = CliRunner().invoke(cli, ["inspect", str(tiny_gemma2), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["architecture"] == "Gemma2ForCausalLM"
    assert d["head_dim"] == 128 and d["num_key_value_heads"] == 2 and d["sliding_layers"] == [0, 2]
    assert d["attn_logit_softcapping"] == 4.0 and d["final_logit_softcapping"] == 6.0
    n = sum(t.numel() for t in _all_tensors(tiny_gemma2).values())
    assert d["parameters"] == n
    est = d["estimated_bytes"]
    assert est["int4_g128"] < est["gguf_q4_0"] < est["int8_g128"] < d["size_on_disk_bytes"]


def _all_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for p in _shards(d):
        out.update(load_file(p))
    return out


def test_config_styles_agree(tiny_gemma3, tmp_path):
    """transformers 5.x style (rope_parameters per layer type, layer_types) reads as the 4.x style does."""
    from quantkit.io.config import config_from_dict

    raw = json.loads((tiny_gemma3 / "config.json").read_text())
    v5 = {
        k: v
        for k, v in raw.items()
        if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern")
    }
    v5["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    v5["layer_types"] = ["sliding_attention"] * 5 + ["full_attention"]
    assert config_from_dict(v5) == config_from_dict(raw)
