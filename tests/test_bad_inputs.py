"""The bad-input corpus: every case is a hostile input or situation for one of the five commands.

Each case builds its input from the tiny checkpoint (or a quantized artifact / GGUF made from it) inside a
fresh directory, runs the command in-process, and asserts: exit status 2, exactly one stderr line, starting
``quantkit: error:`` and naming the problem, no traceback, and every file under the directory (inputs and
the output location) byte-for-byte and mode-for-mode unchanged. Signals and the disk-full situation run a
real ``quantkit`` process where the process behaviour is what is tested.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, TEST_TEXT
from safetensors import safe_open
from safetensors.torch import save_file

from quantkit.cli import cli

DELETE = object()


# ------------------------------------------------------------------------------------------ the inputs


@pytest.fixture(scope="module")
def sources(tiny_gemma2, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint, an RTN artifact of it and an f32 GGUF of it (made once, copied per case)."""
    from quantkit.formats.gguf.export import export_gguf
    from quantkit.quant.quantize import QuantizeOptions, quantize_checkpoint

    d = tmp_path_factory.mktemp("bad-inputs-src")
    quantize_checkpoint(tiny_gemma2, d / "art", QuantizeOptions(method="rtn", group_size=32), progress=False)
    export_gguf(tiny_gemma2, d / "m.gguf", "f32", progress=False)
    return {"model": tiny_gemma2, "art": d / "art", "gguf": d / "m.gguf"}


class Workspace:
    """A case's directory: copies of the inputs it asks for, a cwd, and where the output goes."""

    def __init__(self, root: Path, sources: dict[str, Path]):
        self.root, self.sources = root, sources
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.out = root / "out"
        self.gguf_out = root / "out.gguf"

    @cached_property
    def model(self) -> Path:
        return Path(shutil.copytree(self.sources["model"], self.root / "M"))

    @cached_property
    def art(self) -> Path:
        return Path(shutil.copytree(self.sources["art"], self.root / "A"))

    @cached_property
    def gguf(self) -> Path:
        return Path(shutil.copy(self.sources["gguf"], self.root / "m.gguf"))

    def shards(self, d: Path) -> list[Path]:
        return sorted(d.glob("*.safetensors"))


def tree_state(root: Path) -> dict[str, tuple]:
    """Path -> (kind, mode, sha256) for everything under ``root``."""
    state = {}
    for p in sorted(root.rglob("*")):
        mode = stat.S_IMODE(p.lstat().st_mode)
        rel = str(p.relative_to(root))
        if p.is_symlink():
            state[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            state[rel] = ("dir", mode)
        else:
            state[rel] = ("file", mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return state


# ------------------------------------------------------------------------------------- input mutations


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is DELETE:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def edit_config(d: Path, **changes) -> None:
    edit_json(d / "config.json", **changes)


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_header_text(path: Path, text: str, data: bytes) -> None:
    blob = text.encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = read_safetensors(path)
    fn(header)
    write_header_text(path, json.dumps(header), data)


def first_tensor(header: dict, suffix: str = "") -> str:
    return next(k for k in header if k != "__metadata__" and k.endswith(suffix))


def set_tensor(d: Path, name: str, fn: Callable[[torch.Tensor], torch.Tensor], dtype_keep: bool = True) -> None:
    """Rewrite the shard of ``d`` holding ``name`` with ``fn`` applied to that tensor."""
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            if name not in f.keys():
                continue
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[name] = fn(tensors[name].clone())
        save_file(tensors, str(p), metadata={"format": "pt"})
        return
    raise KeyError(name)


def put_nan(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[t.numel() // 2] = float("nan")
    return t


def edit_quant_weights(art: Path, **changes) -> None:
    cfg = json.loads((art / "config.json").read_text())
    w = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    for k, v in changes.items():
        if v is DELETE:
            w.pop(k)
        else:
            w[k] = v
    (art / "config.json").write_text(json.dumps(cfg))


def rewrite_gguf(
    src: Path, dst: Path, kv: dict | None = None, tensor_fn: Callable | None = None, extra: dict | None = None
) -> None:
    """Copy an all-F32 GGUF, replacing key/values (key -> (value, GGUFValueType)) and tensors, adding
    ``extra`` tensors."""
    kv = kv or {}
    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    w = gguf.GGUFWriter(dst, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in kv:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for key, (value, vtype) in kv.items():
        w.add_key_value(key, value, vtype)
    for t in reader.tensors:
        data = t.data.copy()
        if tensor_fn is not None:
            data = tensor_fn(t.name, data)
        w.add_tensor(t.name, data)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_kv(ws: Workspace, key: str, value, vtype) -> Path:
    bad = ws.root / "bad.gguf"
    rewrite_gguf(ws.gguf, bad, kv={key.format(arch="gemma2"): (value, vtype)})
    return bad


U32, I32, STR = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.STRING


# ---------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    command: str
    build: Callable[[Workspace], list]  # prepares the inputs, returns the command line
    expect: str  # text the error line must contain
    patch: Callable[[pytest.MonkeyPatch], None] | None = None


CASES: list[Case] = []


def case(command: str, expect: str, patch=None):
    def register(fn):
        CASES.append(Case(fn.__name__, command, fn, expect, patch))
        return fn

    return register


def inspect(ws: Workspace, d: Path | None = None) -> list:
    return ["inspect", d or ws.model]


def rtn(ws: Workspace, *extra) -> list:
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.out, *extra]


def gptq(ws: Workspace, *extra) -> list:
    return ["quantize", ws.model, "--fast", "--nsamples", "4", "--seqlen", "32", "-o", ws.out, *extra]


def ppl(ws: Workspace, *extra, model: Path | None = None) -> list:
    return ["eval-ppl", model or ws.model, "--dataset", TEST_TEXT, "--ctx", "32", "--chunks", "2", *extra]


def export(ws: Workspace, src: Path | None = None, *extra, out: Path | None = None) -> list:
    return ["export", src or ws.art, "-o", out or ws.gguf_out, "--type", "q8_0", *extra]


def imp(ws: Workspace, src: Path | None = None, out: Path | None = None) -> list:
    return ["import-gguf", src or ws.gguf, out or ws.out]


# --- inspect: config.json


@case("inspect", "not a directory")
def missing_model_dir(ws):
    return inspect(ws, ws.root / "nope")


@case("inspect", "config.json: not found")
def no_config(ws):
    (ws.model / "config.json").unlink()
    return inspect(ws)


@case("inspect", "not valid JSON")
def config_not_json(ws):
    (ws.model / "config.json").write_text("{ nope")
    return inspect(ws)


@case("inspect", "expected a JSON object")
def config_is_a_list(ws):
    (ws.model / "config.json").write_text("[1, 2]")
    return inspect(ws)


@case("inspect", "unsupported architecture")
def config_llama(ws):
    edit_config(ws.model, model_type="llama")
    return inspect(ws)


@case("inspect", "hidden_size is 64.9")
def config_hidden_float(ws):
    edit_config(ws.model, hidden_size=64.9)
    return inspect(ws)


@case("inspect", "num_hidden_layers is 0")
def config_zero_layers(ws):
    edit_config(ws.model, num_hidden_layers=0)
    return inspect(ws)


@case("inspect", "num_hidden_layers is 'four'")
def config_layers_string(ws):
    edit_config(ws.model, num_hidden_layers="four")
    return inspect(ws)


@case("inspect", "missing required key 'intermediate_size'")
def config_missing_key(ws):
    edit_config(ws.model, intermediate_size=DELETE)
    return inspect(ws)


@case("inspect", "sliding_window is -5")
def config_negative_window(ws):
    edit_config(ws.model, sliding_window=-5)
    return inspect(ws)


@case("inspect", "sliding_window is 0")
def config_zero_window(ws):
    edit_config(ws.model, sliding_window=0)
    return inspect(ws)


@case("inspect", "attn_logit_softcapping is 'big'")
def config_softcap_string(ws):
    edit_config(ws.model, attn_logit_softcapping="big")
    return inspect(ws)


@case("inspect", "rope_scaling is [")
def config_rope_scaling_list(ws):
    edit_config(ws.model, rope_scaling=[8.0])
    return inspect(ws)


@case("inspect", "rope_parameters is 'fast'")
def config_rope_parameters_string(ws):
    edit_config(ws.model, rope_parameters="fast")
    return inspect(ws)


@case("inspect", "unexpected tensor 'model.layers.3.")
def config_fewer_layers_than_tensors(ws):
    edit_config(ws.model, num_hidden_layers=3)
    return inspect(ws)


@case("inspect", "'model.layers.4.input_layernorm.weight' missing")
def config_more_layers_than_tensors(ws):
    edit_config(ws.model, num_hidden_layers=5)
    return inspect(ws)


@case("inspect", "config.json implies [600, 256]")
def config_vocab_larger_than_embedding(ws):
    edit_config(ws.model, vocab_size=600)
    return inspect(ws)


@case("inspect", "bos_token_id is -7")
def config_negative_bos(ws):
    edit_config(ws.model, bos_token_id=-7)
    return inspect(ws)


@case("inspect", "num_hidden_layers is 9223372036854775808; it must be an integer in 1..4096")
def config_layers_huge(ws):  # found by the fuzzer: per-layer tables were built before any bound (a hang)
    edit_config(ws.model, num_hidden_layers=2**63)
    return inspect(ws)


@case("inspect", "hidden_size is 4294967296; it must be an integer in 1..2147483647")
def config_size_over_int32(ws):
    edit_config(ws.model, hidden_size=2**32)
    return inspect(ws)


@case("inspect", "not a multiple of num_key_value_heads 3")
def config_kv_heads_not_dividing(ws):
    edit_config(ws.model, num_key_value_heads=3)
    return inspect(ws)


# --- inspect: index and safetensors headers


@case("inspect", "weight_map must map tensor names")
def index_weight_map_list(ws):
    edit_json(ws.model / "model.safetensors.index.json", weight_map=["a", "b"])
    return inspect(ws)


@case("inspect", "weight_map must map tensor names")
def index_weight_map_int_values(ws):
    idx = ws.model / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())["weight_map"]
    edit_json(idx, weight_map=dict.fromkeys(wm, 1))
    return inspect(ws)


@case("inspect", "not a valid shard index")
def index_not_json(ws):
    (ws.model / "model.safetensors.index.json").write_text("{")
    return inspect(ws)


@case("inspect", "is not a .safetensors file name in")
def index_shard_outside(ws):
    idx = ws.model / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())["weight_map"]
    edit_json(idx, weight_map=dict.fromkeys(wm, "../elsewhere.safetensors"))
    return inspect(ws)


@case("inspect", "shard named in model.safetensors.index.json is missing")
def shard_missing(ws):
    ws.shards(ws.model)[1].unlink()
    return inspect(ws)


@case("inspect", "truncated safetensors file")
def shard_truncated(ws):
    p = ws.shards(ws.model)[0]
    p.write_bytes(p.read_bytes()[:-1000])
    return inspect(ws)


@case("inspect", "corrupt safetensors header (not valid JSON)")
def header_not_json(ws):
    p = ws.shards(ws.model)[0]
    _, data = read_safetensors(p)
    write_header_text(p, "{ not json", data)
    return inspect(ws)


@case("inspect", "unknown dtype 'Q4'")
def header_unknown_dtype(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h[first_tensor(h)].update(dtype="Q4"))
    return inspect(ws)


@case("inspect", "unknown dtype ['BF16']")
def header_dtype_not_a_string(ws):  # found by the fuzzer: a list or object as dtype was a TypeError
    edit_header(ws.shards(ws.model)[0], lambda h: h[first_tensor(h)].update(dtype=["BF16"]))
    return inspect(ws)


@case("inspect", "is not a list of non-negative integers")
def header_negative_shape(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h[first_tensor(h)].update(shape=[-1, 256]))
    return inspect(ws)


@case("inspect", "is not a list of non-negative integers")
def header_string_shape(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h[first_tensor(h)].update(shape=["a"]))
    return inspect(ws)


@case("inspect", "needs 2 bytes, has")
def header_length_mismatch(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h[first_tensor(h)].update(shape=[1]))
    return inspect(ws)


@case("inspect", "or offsets outside it")
def header_offsets_out_of_range(ws):
    def far(h):
        name = first_tensor(h)
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [begin + 10**9, end + 10**9]

    edit_header(ws.shards(ws.model)[0], far)
    return inspect(ws)


@case("inspect", "overlap")
def header_overlapping(ws):
    def overlap(h):
        norms = [k for k in h if k.endswith("layernorm.weight")]
        h[norms[1]]["data_offsets"] = list(h[norms[0]]["data_offsets"])

    edit_header(ws.shards(ws.model)[0], overlap)
    return inspect(ws)


@case("inspect", "is listed twice")
def header_duplicate_name(ws):
    p = ws.shards(ws.model)[0]
    header, data = read_safetensors(p)
    name = first_tensor(header, "layernorm.weight")
    text = json.dumps(header)
    entry = json.dumps({name: header[name]})[1:-1]
    write_header_text(p, text[:-1] + ", " + entry + "}", data)
    return inspect(ws)


@case("inspect", "__metadata__ value 'format' is 1; safetensors metadata values must be strings")
def header_metadata_not_a_string(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h.update({"__metadata__": {"format": 1}}))
    return inspect(ws)


@case("inspect", "__metadata__ is list, not an object of strings")
def header_metadata_not_an_object(ws):
    edit_header(ws.shards(ws.model)[0], lambda h: h.update({"__metadata__": ["pt"]}))
    return inspect(ws)


@case("inspect", "unexpected tensor 'model.extra.weight'")
def extra_tensor(ws):
    p = ws.shards(ws.model)[1]
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.extra.weight"] = torch.zeros(4)
    save_file(tensors, str(p), metadata={"format": "pt"})
    idx = ws.model / "model.safetensors.index.json"
    wm = json.loads(idx.read_text())["weight_map"]
    edit_json(idx, weight_map={**wm, "model.extra.weight": p.name})
    return inspect(ws)


@case("inspect", "never unpickles")
def pickle_only(ws):
    for p in ws.shards(ws.model):
        p.unlink()
    (ws.model / "model.safetensors.index.json").unlink()
    (ws.model / "pytorch_model.bin").write_bytes(b"not unpickled")
    return inspect(ws)


@case("inspect", "pieces but config.json vocab_size is 256")
def tokenizer_larger_than_vocab(ws):
    edit_config(ws.model, vocab_size=256)
    return inspect(ws)


# --- quantize: output locations (the destruction cases)


@case("quantize", "is also an input")
def out_is_model(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.model]


@case("quantize", "is the current directory or contains it")
def out_is_cwd(ws):
    (ws.cwd / "notes.txt").write_text("the user's files")
    return ["quantize", ws.model, "--method", "rtn", "-o", "."]


@case("quantize", "an existing non-empty directory is in the way")
def out_unrelated_dir(ws):
    ws.out.mkdir()
    (ws.out / "thesis.tex").write_text("years of work")
    return rtn(ws)


@case("quantize", "is not a quantkit output")
def out_unrelated_dir_overwrite(ws):
    ws.out.mkdir()
    (ws.out / "thesis.tex").write_text("years of work")
    return rtn(ws, "--overwrite")


@case("quantize", "contains the input")
def out_parent_of_model(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.root]


@case("quantize", "lies inside the input")
def out_inside_model(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.model / "q"]


@case("quantize", "an existing file is in the way")
def out_existing_file(ws):
    ws.out.write_text("keep me")
    return rtn(ws)


@case("quantize", "contains the input")
def out_contains_calib(ws):
    calib = ws.out / "calib.txt"
    calib.parent.mkdir()
    calib.write_text(TEST_TEXT.read_text())
    return ["quantize", ws.model, "--calib", calib, "-o", ws.out, "--overwrite"]


@case("quantize", "cannot write in /proc")
def out_in_proc(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", "/proc/quantkit-out"]


@case("quantize", "is not a directory")
def out_under_a_file(ws):
    (ws.root / "f").write_text("a file")
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.root / "f" / "out"]


@case("quantize", "empty path")
def out_empty(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", ""]


@case("quantize", "file name too long")
def out_name_too_long(ws):
    return ["quantize", ws.model, "--method", "rtn", "-o", ws.root / ("x" * 300)]


@case("quantize", "is a directory")
def gguf_out_is_dir(ws):
    ws.out.mkdir()
    return rtn(ws, "--format", "gguf")


@case("quantize", "needs about", patch=lambda mp: mp.setattr(os, "statvfs", _tiny_statvfs))
def out_no_free_space(ws):
    return rtn(ws)


# --- quantize: options and recipes


@case("quantize", "--bits: 9 is not in the range")
def bits_out_of_range(ws):
    return rtn(ws, "--bits", "9")


@case("quantize", "bits")
def bits_unsupported(ws):
    return rtn(ws, "--bits", "5")


@case("quantize", "group")
def group_not_dividing(ws):
    return rtn(ws, "--group", "100")


@case("quantize", "group")
def group_zero(ws):
    return rtn(ws, "--group", "0")


@case("quantize", "--nsamples: 0 is not in the range")
def nsamples_zero(ws):
    return gptq(ws, "--nsamples", "0")


@case("quantize", "--seqlen: 1 is not in the range")
def seqlen_one(ws):
    return gptq(ws, "--seqlen", "1")


@case("quantize", "--damp: 1.5 is not in the range")
def damp_too_big(ws):
    return gptq(ws, "--damp", "1.5")


@case("quantize", "--device: 'tpu' is not a device")
def device_tpu(ws):
    return rtn(ws, "--device", "tpu")


@case("quantize", "--seed: -1 is not in the range")
def seed_negative(ws):
    return rtn(ws, "--seed", "-1")


@case("quantize", "recipe 'int3-g7' not found")
def recipe_unknown(ws):
    return rtn(ws, "--recipe", "int3-g7")


@case("quantize", "invalid TOML")
def recipe_bad_toml(ws):
    (ws.root / "r.toml").write_text("bits = = 4")
    return rtn(ws, "--recipe", ws.root / "r.toml")


@case("quantize", "bits = 'four' is not of type int")
def recipe_bits_string(ws):
    (ws.root / "r.toml").write_text('bits = "four"\n')
    return rtn(ws, "--recipe", ws.root / "r.toml")


@case("quantize", "unknown key(s) colour")
def recipe_unknown_key(ws):
    (ws.root / "r.toml").write_text('colour = "red"\n')
    return rtn(ws, "--recipe", ws.root / "r.toml")


@case("quantize", "calibration file not found")
def calib_missing(ws):
    return gptq(ws, "--calib", ws.root / "nope.txt")


@case("quantize", "calibration file is empty")
def calib_empty(ws):
    (ws.root / "c.txt").write_text("  \n")
    return gptq(ws, "--calib", ws.root / "c.txt")


@case("quantize", "calibration file is not UTF-8")
def calib_binary(ws):
    (ws.root / "c.txt").write_bytes(bytes(range(128, 256)) * 10)
    return gptq(ws, "--calib", ws.root / "c.txt")


@case("quantize", "of memory")
def calib_absurd_size(ws):
    return gptq(ws, "--nsamples", "1000000000", "--seqlen", "4096")


# --- quantize: tensors and tokenizer


@case("quantize", "'model.embed_tokens.weight' contains NaN or inf")
def nan_in_embedding(ws):
    set_tensor(ws.model, "model.embed_tokens.weight", put_nan)
    return rtn(ws)


@case("quantize", "'model.layers.1.mlp.up_proj.weight' contains NaN or inf")
def inf_in_linear(ws):
    set_tensor(ws.model, "model.layers.1.mlp.up_proj.weight", lambda t: t.fill_(float("inf")))
    return gptq(ws)


@case("quantize", "already quantized")
def quantize_an_artifact(ws):
    return ["quantize", ws.art, "--method", "rtn", "-o", ws.out]


@case("quantize", "not a SentencePiece model")
def tokenizer_garbage(ws):
    (ws.model / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    return rtn(ws)


@case("quantize", "is not UTF-8 text (a damaged tokenizer.model)")
def tokenizer_piece_not_utf8(ws):  # found by the fuzzer: sentencepiece loads it, IdToPiece then raised
    raw = bytearray((ws.model / "tokenizer.model").read_bytes())
    raw[raw.index("\u2581the".encode())] = 0xFF  # the first byte of a piece's UTF-8
    (ws.model / "tokenizer.model").write_bytes(bytes(raw))
    return rtn(ws)


@case("quantize", "tokenizer_config.json: not valid JSON")
def tokenizer_config_not_json(ws):
    (ws.model / "tokenizer_config.json").write_text("{ bad")
    return rtn(ws)


@case("quantize", "bos_token is 7")
def tokenizer_config_bad_bos(ws):
    edit_json(ws.model / "tokenizer_config.json", bos_token=7)
    return rtn(ws)


@case("quantize", "maps to 'one', not a token id")
def added_tokens_bad(ws):
    (ws.model / "added_tokens.json").write_text(json.dumps({"<x>": "one"}))
    return rtn(ws)


@case("quantize", "out: no space left on device", patch=lambda mp: _fail_writes(mp, "quantkit.io.tensorio"))
def disk_full_while_writing(ws):
    return rtn(ws)


# --- eval-ppl


@case("eval-ppl", "--ctx: 0 is not in the range")
def ctx_zero(ws):
    return ppl(ws, "--ctx", "0")


@case("eval-ppl", "--ctx: 2 is not in the range")
def ctx_two(ws):
    return ppl(ws, "--ctx", "2")


@case("eval-ppl", "--ctx: -5 is not in the range")
def ctx_negative(ws):
    return ppl(ws, "--ctx", "-5")


@case("eval-ppl", "--chunks: 0 is not in the range")
def chunks_zero(ws):
    return ppl(ws, "--chunks", "0")


@case("eval-ppl", "--chunks: -1 is not in the range")
def chunks_negative(ws):
    return ppl(ws, "--chunks", "-1")


@case("eval-ppl", "--batch-size: 0 is not in the range")
def batch_zero(ws):
    return ppl(ws, "--batch-size", "0")


@case("eval-ppl", "--device: 'tpu' is not a device")
def eval_device_tpu(ws):
    return ppl(ws, "--device", "tpu")


@case("eval-ppl", "--ctx: 'big' is not a valid integer")
def ctx_not_a_number(ws):
    return ppl(ws, "--ctx", "big")


@case("eval-ppl", "evaluation file not found")
def dataset_missing(ws):
    return ["eval-ppl", ws.model, "--dataset", ws.root / "nope.txt"]


@case("eval-ppl", "evaluation file is empty")
def dataset_empty(ws):
    (ws.root / "t.txt").write_text("")
    return ["eval-ppl", ws.model, "--dataset", ws.root / "t.txt"]


@case("eval-ppl", "need at least 2*ctx")
def ctx_longer_than_text(ws):
    return ppl(ws, "--ctx", "10000000")


@case("eval-ppl", "of memory")
def eval_absurd_batch(ws):
    return ["eval-ppl", ws.model, "--dataset", _long_text(ws), "--ctx", "16384", "--batch-size", "100000"]


@case("eval-ppl", "--reference and --save-reference: give one")
def reference_and_save_reference(ws):
    return ppl(ws, "--reference", ws.root / "a.kld", "--save-reference", ws.root / "b.kld")


@case("eval-ppl", "--dataset: the label 'wiki' is given twice")
def dataset_label_twice(ws):
    return ["eval-ppl", ws.model, "--dataset", "wiki", "--dataset", f"wiki={TEST_TEXT}"]


@case("eval-ppl", "--save-reference: a reference file holds one text's tokens")
def save_reference_two_texts(ws):
    return ["eval-ppl", ws.model, "--dataset", "wiki", "--dataset", "code", "--save-reference", ws.root / "b.kld"]


@case("eval-ppl", "not a llama-perplexity log-probability file")
def reference_not_a_reference(ws):
    return ppl(ws, "--reference", TEST_TEXT)


@case("eval-ppl", "describes a different model")
def quantized_of_other_model(ws):
    edit_config(ws.art, rms_norm_eps=1e-5)
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "'model.embed_tokens.weight' contains NaN or inf")
def eval_nan_embedding(ws):
    set_tensor(ws.model, "model.embed_tokens.weight", put_nan)
    return ppl(ws)


@case("eval-ppl", "weight_scale' contains NaN or inf")
def eval_nan_scale(ws):
    set_tensor(ws.art, "model.layers.0.self_attn.q_proj.weight_scale", put_nan)
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "weights.group_size is None (missing or mistyped)")
def artifact_missing_group_size(ws):
    edit_quant_weights(ws.art, group_size=DELETE)
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "weights.symmetric is None (missing or mistyped)")
def artifact_missing_symmetric(ws):
    edit_quant_weights(ws.art, symmetric=DELETE)
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "weights.num_bits is '4'")
def artifact_bits_string(ws):
    edit_quant_weights(ws.art, num_bits="4")
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "weight_packed' is F32; expected I32")
def artifact_packed_f32(ws):
    set_tensor(ws.art, "model.layers.0.mlp.up_proj.weight_packed", lambda t: t.float())
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "weight_scale' has shape")
def artifact_scale_shape(ws):
    set_tensor(ws.art, "model.layers.2.mlp.down_proj.weight_scale", lambda t: t[:, :1].contiguous())
    return ppl(ws, "--quantized", ws.art)


@case("eval-ppl", "a quantized artifact; eval-ppl expects the unquantized model as MODEL_DIR and the artifact as")
def eval_artifact_as_model(ws):
    return ppl(ws, model=ws.art)


@case("eval-ppl", "num_hidden_layers is 0")
def eval_zero_layers(ws):
    edit_config(ws.model, num_hidden_layers=0)
    return ppl(ws)


# --- export


@case("export", "lies inside the input")
def export_onto_shard(ws):
    return export(ws, ws.model, out=ws.shards(ws.model)[0])


@case("export", "attn_logit_softcapping is 1e+308; it must be a positive number within float32's range")
def export_softcap_beyond_f32(ws):  # found by the fuzzer: GGUF stores it as f32, struct.pack overflowed
    edit_config(ws.art, attn_logit_softcapping=1e308)
    return export(ws, ws.art)


@case("export", "is also an input")
def export_onto_src(ws):
    return export(ws, ws.art, out=ws.art)


@case("export", "an existing file is in the way")
def export_existing_file(ws):
    ws.gguf_out.write_bytes(b"an older gguf")
    return export(ws)


@case("export", "is a directory")
def export_onto_dir(ws):
    ws.gguf_out.mkdir()
    return export(ws)


@case("export", "is not a directory")
def export_under_a_file(ws):
    (ws.root / "f").write_text("a file")
    return export(ws, out=ws.root / "f" / "x.gguf")


@case("export", "--type: 'q9_9' is not one of")
def export_bad_type(ws):
    return ["export", ws.art, "-o", ws.gguf_out, "--type", "q9_9"]


@case("export", "weight_scale' contains NaN or inf")
def export_nan_scale(ws):
    set_tensor(ws.art, "model.layers.1.self_attn.o_proj.weight_scale", put_nan)
    return export(ws)


@case("export", "'model.embed_tokens.weight' contains NaN or inf")
def export_nan_embedding(ws):
    set_tensor(ws.model, "model.embed_tokens.weight", put_nan)
    return export(ws, ws.model)


@case("export", "weight_packed' is F32; expected I32")
def export_packed_f32(ws):
    set_tensor(ws.art, "model.layers.0.mlp.up_proj.weight_packed", lambda t: t.float())
    return export(ws)


@case("export", "not a directory")
def export_src_missing(ws):
    return export(ws, ws.root / "nope")


def write_test_imatrix(ws: Workspace, sizes: dict[str, int]) -> Path:
    """An imatrix (quantkit's --imatrix-out writer) with entries of the given lengths, in the workspace."""
    from quantkit.formats.gguf.imatrix import ImportanceStats, write_imatrix

    stats = ImportanceStats({n: np.ones(k, dtype=np.float32) for n, k in sizes.items()}, dict.fromkeys(sizes, 8))
    return write_imatrix(ws.root / "m.imatrix.gguf", stats, "t", 8)


@case("export", "nope.gguf: not found")
def export_imatrix_missing(ws):
    return export(ws, ws.model, "--imatrix", ws.root / "nope.gguf")


@case("export", "not an importance-matrix GGUF")
def export_imatrix_not_an_imatrix(ws):
    return export(ws, ws.model, "--imatrix", ws.gguf)


@case("export", "data offset 18446744073709551615 lies past the end of the file")
def export_imatrix_offset_wraps(ws):  # found by the fuzzer: gguf-py's uint64 overflow warning made two lines
    imatrix = write_test_imatrix(ws, {"blk.0.attn_q.weight": 256})
    t = gguf.GGUFReader(imatrix).tensors[0]
    offset = t.field.offset + sum(part.nbytes for part in t.field.parts[:-1])  # the last part: its data offset
    with open(imatrix, "r+b") as f:
        f.seek(offset)
        f.write((2**64 - 1).to_bytes(8, "little"))
    return export(ws, ws.model, "--type", "q4_0", "--imatrix", imatrix)


@case("export", "imatrix size 7 is different from tensor size 256 for blk.0.attn_q.weight")
def export_imatrix_wrong_length(ws):
    return export(ws, ws.model, "--type", "q4_k", "--imatrix", write_test_imatrix(ws, {"blk.0.attn_q.weight": 7}))


@case("export", "the importance matrix has no entry for blk.0.attn_q.weight (Q2_K)")
def export_imatrix_missing_q2_k_s_entry(ws):
    return export(ws, ws.model, "--type", "q2_k_s", "--imatrix", write_test_imatrix(ws, {"blk.0.ffn_up.weight": 256}))


@case("export", "is also an input")
def export_onto_imatrix(ws):
    imatrix = write_test_imatrix(ws, {"blk.0.ffn_up.weight": 256})
    return export(ws, ws.model, "--imatrix", imatrix, out=imatrix)


@case("export", "out.gguf: no space left on device", patch=lambda mp: _fail_writes(mp, "gguf"))
def export_disk_full(ws):
    return export(ws)


# --- import-gguf


def _set_array_count(path: Path, key: str, count: int) -> None:
    """Overwrite the item count of the GGUF array ``key`` in place."""
    field = gguf.GGUFReader(path).fields[key]
    at = field.offset + sum(part.nbytes for part in field.parts[:4])  # key length, key, type, item type
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<Q", count))


@case("import-gguf", "an array of 4611686018427387904 items runs past the end of the file")
def import_array_count_huge(ws):  # found by the fuzzer: gguf-py's reader looped over the declared count
    _set_array_count(ws.gguf, "tokenizer.ggml.tokens", 2**62)
    return imp(ws)


@case("import-gguf", "tensor 'blk.0.attn_norm.weight' is not valid Q4_0 data")
def import_norm_retagged_q4_0(ws):  # found by the fuzzer: gguf-py's ValueError reached the user as a traceback
    t = next(t for t in gguf.GGUFReader(ws.gguf).tensors if t.name == "blk.0.attn_norm.weight")
    at = t.field.offset + sum(part.nbytes for part in t.field.parts[:-2])  # ... dims, then type, offset
    with open(ws.gguf, "r+b") as f:
        f.seek(at)
        f.write(struct.pack("<I", int(gguf.GGMLQuantizationType.Q4_0)))
    return imp(ws)


@case("import-gguf", "gemma2.block_count is 4294967295; at most 4096 layers")
def import_block_count_huge(ws):  # found by the fuzzer: per-layer lists were built from it (a hang)
    field = gguf.GGUFReader(ws.gguf).fields["gemma2.block_count"]
    with open(ws.gguf, "r+b") as f:
        f.seek(field.offset + sum(part.nbytes for part in field.parts[:3]))  # key length, key, type
        f.write(struct.pack("<I", 2**32 - 1))
    return imp(ws)


@case("import-gguf", "metadata 'general.name' holds a string that is not UTF-8")
def import_string_not_utf8(ws):  # found by the fuzzer: gguf-py's UnicodeDecodeError was a traceback
    field = gguf.GGUFReader(ws.gguf).fields["general.name"]
    with open(ws.gguf, "r+b") as f:
        f.seek(field.offset + sum(part.nbytes for part in field.parts[:4]))  # key length, key, type, length
        f.write(b"\xbc")
    return imp(ws)


@case("import-gguf", "is also an input")
def import_onto_itself(ws):
    return imp(ws, ws.gguf, ws.gguf)


@case("import-gguf", "contains the input")
def import_into_parent(ws):
    return imp(ws, ws.gguf, ws.root)


@case("import-gguf", "an existing non-empty directory is in the way")
def import_onto_unrelated_dir(ws):
    ws.out.mkdir()
    (ws.out / "notes.txt").write_text("mine")
    return imp(ws)


@case("import-gguf", "not a readable GGUF file")
def import_not_gguf(ws):
    (ws.root / "x.gguf").write_bytes(b"GGML" + b"\x00" * 100)
    return imp(ws, ws.root / "x.gguf")


@case("import-gguf", "nope.gguf: not found")
def import_missing_file(ws):
    return imp(ws, ws.root / "nope.gguf")


@case("import-gguf", "not a readable GGUF file")
def import_truncated(ws):
    data = ws.gguf.read_bytes()
    (ws.root / "t.gguf").write_bytes(data[: len(data) // 2])
    return imp(ws, ws.root / "t.gguf")


@case("import-gguf", "attention.head_count' is 0, not a positive integer")
def import_zero_heads(ws):
    return imp(ws, gguf_kv(ws, "{arch}.attention.head_count", 0, U32))


@case("import-gguf", "block_count' is 'four', not a positive integer")
def import_block_count_string(ws):
    return imp(ws, gguf_kv(ws, "{arch}.block_count", "four", STR))


@case("import-gguf", "context_length' is -5, not a positive integer")
def import_negative_context(ws):
    return imp(ws, gguf_kv(ws, "{arch}.context_length", -5, I32))


@case("import-gguf", "tokenizer.ggml.bos_token_id -7 is outside")
def import_negative_bos(ws):
    return imp(ws, gguf_kv(ws, "tokenizer.ggml.bos_token_id", -7, I32))


@case("import-gguf", "architecture 'llama' is not supported")
def import_llama(ws):
    bad = ws.root / "bad.gguf"
    reader = gguf.GGUFReader(ws.gguf)
    w = gguf.GGUFWriter(bad, "llama")
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return imp(ws, bad)


@case("import-gguf", "contains NaN or inf values")
def import_nan_tensor(ws):
    bad = ws.root / "bad.gguf"

    def poison(name, data):
        if name == "blk.0.ffn_up.weight":
            data.reshape(-1)[7] = float("nan")
        return data

    rewrite_gguf(ws.gguf, bad, tensor_fn=poison)
    return imp(ws, bad)


@case("import-gguf", "unexpected tensor 'blk.0.extra.weight'")
def import_extra_tensor(ws):
    bad = ws.root / "bad.gguf"
    rewrite_gguf(ws.gguf, bad, extra={"blk.0.extra.weight": np.ones(256, np.float32)})
    return imp(ws, bad)


@case("import-gguf", "an existing file is in the way")
def import_onto_file(ws):
    ws.out.write_text("keep")
    return imp(ws)


# ------------------------------------------------------------------------------------------- patches


class _StatvfsResult:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    f_bavail = 16  # 16 blocks of 4 KiB: 64 KiB free
    f_frsize = 4096


_real_statvfs = os.statvfs


def _tiny_statvfs(path):
    return _StatvfsResult(_real_statvfs(path))


def _fail_writes(mp: pytest.MonkeyPatch, where: str) -> None:
    """Every tensor write fails as a full disk does."""

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "gguf":
        mp.setattr("quantkit.formats.gguf.export.write_tensor_data", enospc)
    else:
        mp.setattr(f"{where}.write_file", enospc)


def _long_text(ws: Workspace) -> Path:
    p = ws.root / "long.txt"
    p.write_text(TEST_TEXT.read_text() * 4)
    return p


# --------------------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c: Case, sources, tmp_path, monkeypatch):
    ws = Workspace(tmp_path, sources)
    args = [str(a) for a in c.build(ws)]
    assert args[0] == c.command
    before = tree_state(tmp_path)
    monkeypatch.chdir(ws.cwd)
    if c.patch is not None:
        c.patch(monkeypatch)
    res = CliRunner().invoke(cli, args)
    monkeypatch.undo()
    lines = res.stderr.splitlines()
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.exception)
    assert len(lines) == 1 and lines[0].startswith("quantkit: error:"), res.stderr
    assert c.expect in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert tree_state(tmp_path) == before


def test_corpus_covers_every_command():
    counts = {}
    for c in CASES:
        counts[c.command] = counts.get(c.command, 0) + 1
    assert set(counts) == {"inspect", "quantize", "eval-ppl", "export", "import-gguf"}
    assert len(CASES) >= 60 and min(counts.values()) >= 10, counts


# ------------------------------------------------------------------------------------- bugs and debug


def test_a_bug_keeps_its_traceback(tiny_gemma2, monkeypatch):
    import quantkit.eval.summary

    def broken(ckpt):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(quantkit.eval.summary, "describe", broken)
    res = CliRunner().invoke(cli, ["inspect", str(tiny_gemma2)])
    assert res.exit_code == 1
    assert "Traceback" in res.stderr and "ZeroDivisionError: a bug" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("quantkit: internal error") and "please report" in res.stderr


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_DEBUG", "1")
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "Traceback" in res.stderr and "QuantkitError" in res.stderr
    assert res.stderr.splitlines()[-1] == f"quantkit: error: {tmp_path / 'nope'}: not a directory"


def test_output_made_meanwhile_is_not_replaced(sources, tmp_path, monkeypatch):
    """A concurrent run finishes first: without --overwrite the later one leaves its artifact alone."""
    import quantkit.quant.quantize as qz

    out = tmp_path / "q"
    real = qz._report

    def other_run_finishes_first(*a, **k):
        out.mkdir()
        (out / "quantkit.json").write_text("{}")
        return real(*a, **k)

    monkeypatch.setattr(qz, "_report", other_run_finishes_first)
    res = CliRunner().invoke(cli, ["quantize", str(sources["model"]), "--method", "rtn", "-o", str(out)])
    assert res.exit_code == 2 and res.stderr.startswith(f"quantkit: error: {out}: an existing non-empty directory")
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and [p.name for p in out.iterdir()] == ["quantkit.json"]


# ------------------------------------------------------------------------------- what success leaves


def test_outputs_get_the_umask_and_replace_only_artifacts(sources, tmp_path, monkeypatch):
    """Files 0644 / directories 0755 under umask 022; --overwrite replaces a quantkit artifact."""
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        out = tmp_path / "new" / "dirs" / "q"  # parents that do not exist yet are made
        args = ["quantize", str(sources["model"]), "--method", "rtn", "-o", str(out)]
        assert CliRunner().invoke(cli, args).exit_code == 0
        assert {stat.S_IMODE(p.stat().st_mode) for p in (out, out.parent, out.parent.parent)} == {0o755}
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
        first = out.stat().st_ino
        res = CliRunner().invoke(cli, [*args, "--overwrite"])
        assert res.exit_code == 0, res.stderr
        assert out.stat().st_ino != first  # a new directory took the old artifact's place
        gg = tmp_path / "m.gguf"
        res = CliRunner().invoke(cli, ["export", str(out), "-o", str(gg), "--type", "q8_0"])
        assert res.exit_code == 0 and stat.S_IMODE(gg.stat().st_mode) == 0o644
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "new"]  # nothing hidden left behind
        assert [p.name for p in out.parent.iterdir()] == ["q"]
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------ disk full, for real


def _mount_tiny_fs(fs: Path) -> bool:
    """Mount a 1 MiB tmpfs on ``fs``; whether that worked (it needs root, as in CI)."""
    fs.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(fs)]
    try:
        return subprocess.run(mount, capture_output=True).returncode == 0
    except OSError:  # no mount(8) at all
        return False


def test_disk_full_refused_up_front(sources, tmp_path, monkeypatch):
    """A 1 MiB tmpfs when this process may mount one (real processes), else a file system that reports
    64 KiB free (in-process): every writing command refuses before writing, and leaves nothing there."""
    fs = tmp_path / "tiny-fs"
    mounted = _mount_tiny_fs(fs)
    try:
        for args in (
            ["quantize", str(sources["model"]), "--method", "rtn", "-o", str(fs / "q")],
            ["export", str(sources["art"]), "-o", str(fs / "m.gguf")],
            ["import-gguf", str(sources["gguf"]), str(fs / "hf")],
        ):
            if mounted:
                proc = _quantkit(args, cwd=tmp_path)
                code, err = proc.returncode, proc.stderr
            else:
                with monkeypatch.context() as mp:
                    mp.setattr(os, "statvfs", _tiny_statvfs)
                    res = CliRunner().invoke(cli, args)
                code, err = res.exit_code, res.stderr
            assert code == 2, err
            assert err.startswith("quantkit: error:") and err.count("\n") == 1 and "free" in err, err
            assert list(fs.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(fs)], check=True)


def test_disk_full_mid_write(sources, tmp_path):
    """The writers themselves (past the up-front check) on a really full disk: needs a tmpfs mount."""
    fs = tmp_path / "tiny-fs"
    if not _mount_tiny_fs(fs):
        pytest.skip("cannot mount a tmpfs here (needs root); the writers' disk-full handling is not exercised")
    try:
        _full_disk_mid_write(sources, fs)
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def _full_disk_mid_write(sources: dict[str, Path], fs: Path) -> None:
    """The writers themselves (past the up-front check) on a full disk: each failure names the output and
    says the disk is full; nothing is left behind."""
    from quantkit.errors import user_message
    from quantkit.formats.gguf.export import export_gguf
    from quantkit.formats.gguf.importer import import_gguf
    from quantkit.quant.quantize import QuantizeOptions, quantize_checkpoint

    opts = QuantizeOptions(method="rtn")
    for out, expect, write in (
        (fs / "q", "no space left on device", lambda o: quantize_checkpoint(sources["model"], o, opts, progress=False)),
        (fs / "m.gguf", "no space left on device", lambda o: export_gguf(sources["model"], o, "f32", progress=False)),
        (fs / "hf", "MiB free", lambda o: import_gguf(sources["gguf"], o, progress=False)),  # checks first
    ):
        with pytest.raises(Exception) as info:
            write(out)
        msg = user_message(info.value)
        assert msg is not None and msg.startswith(f"{out}: {expect}" if "space" in expect else str(out)), msg
        assert expect in msg, msg
        assert list(fs.iterdir()) == []


# ------------------------------------------------------------------------------------------ signals

# The command runs in a real process; the work is slowed down so that the signal lands mid-run.
_SLOW_RUNNER = """
import sys, time
import quantkit.{module} as m
real = m.{func}
def slow(*a, **k):
    time.sleep(0.15)
    return real(*a, **k)
m.{func} = slow
from quantkit.cli import main
sys.argv = ["quantkit", *sys.argv[1:]]
main()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _quantkit(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantkit.cli", *args], cwd=cwd, env=_env(), capture_output=True, text=True
    )


def _start_slow(module: str, func: str, args: list[str], cwd: Path) -> subprocess.Popen:
    code = _SLOW_RUNNER.format(module=module, func=func)
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=_env(),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may ignore it
    )


def _wait_for_partial(parent: Path, name: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not list(parent.glob(f".{name}.partial*")):  # .NAME.partial-XXXX, or a resumable .NAME.partial
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() - t0 < timeout
        time.sleep(0.05)
    time.sleep(0.3)


SIGNAL_JOBS = {
    "quantize": (
        "quant.quantize",
        "rtn_searched",
        lambda s, out: ["quantize", str(s["model"]), "--method", "rtn", "-o", str(out)],
    ),
    "export": ("formats.gguf.export", "encode_tensor", lambda s, out: ["export", str(s["art"]), "-o", str(out)]),
}


@pytest.mark.parametrize("job", sorted(SIGNAL_JOBS))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_mid_run_then_rerun(job, sig, sources, tmp_path):
    module, func, make_args = SIGNAL_JOBS[job]
    out = tmp_path / ("out.gguf" if job == "export" else "out")
    args = make_args(sources, out)
    proc = _start_slow(module, func, args, tmp_path)
    _wait_for_partial(tmp_path, out.name, proc)
    assert not out.exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()  # nothing finished-looking, whatever the signal
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert err.strip().splitlines()[-1] == "quantkit: interrupted" and "Traceback" not in err, err
        assert list(tmp_path.iterdir()) == []  # the hidden partial output is gone too
    rerun = _quantkit(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert out.is_file() if job == "export" else (out / "quantkit.json").is_file()
