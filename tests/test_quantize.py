"""quantize end to end: artifacts transformers loads through compressed-tensors, recipes, errors, atomicity."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from conftest import CALIB_TEXT
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from quantkit.cli import cli
from quantkit.formats.packed.linear import linears_from_checkpoint
from quantkit.io.checkpoint import open_checkpoint
from quantkit.model import build_model
from quantkit.quant.recipes import RECIPES_DIR

FAST_GPTQ = ["--nsamples", "8", "--seqlen", "64", "--calib", str(CALIB_TEXT)]


def _quantize(model: Path, out: Path, *args: str) -> dict:
    res = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(out), "--json", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _ids(vocab: int) -> torch.Tensor:
    ids = torch.randint(4, vocab, (2, 48), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 2
    return ids


@torch.no_grad()
@pytest.mark.parametrize(
    "args",
    [
        ["--method", "rtn", "--bits", "4", "--group", "32"],
        ["--method", "gptq", "--bits", "4", "--group", "128", *FAST_GPTQ],
        ["--method", "rtn", "--bits", "8", "--group", "-1"],
    ],
    ids=["rtn4", "gptq4", "rtn8ch"],
)
def test_transformers_loads_artifact_and_matches(tiny_ckpt, tmp_path, args):
    out = tmp_path / "q"
    report = _quantize(tiny_ckpt, out, *args, "--scale-dtype", "float32")
    assert set(report["linears"]) and report["bits_per_weight"] > 4
    q = open_checkpoint(out)
    ours = build_model(q, linears_for=lambda i: linears_from_checkpoint(q, i))(_ids(q.config.vocab_size))
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
    ref = hf(_ids(q.config.vocab_size)).logits
    assert (ours - ref).abs().max().item() <= 1e-4
    # and the quantized model really differs from the original one
    dense = build_model(open_checkpoint(tiny_ckpt))(_ids(q.config.vocab_size))
    assert (dense - ours).abs().max().item() > 1e-3


def test_asymmetric_tensors_decode_with_compressed_tensors(tiny_gemma2, tmp_path):
    """transformers 5.23 + CT 0.20 cannot load asymmetric pack-quantized models (its meta-device shape check
    expects an unpacked zero point), so check our asymmetric tensors with CT's own unpacker instead."""
    out = tmp_path / "q"
    _quantize(tiny_gemma2, out, "--method", "rtn", "--asym", "--group", "64")
    q = open_checkpoint(out)
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        tensors.update(load_file(shard))
    p = "model.layers.1.mlp.down_proj"
    o, i = tensors[f"{p}.weight_shape"].tolist()
    codes = unpack_from_int32(tensors[f"{p}.weight_packed"], 4, torch.Size((o, i)))
    zp = unpack_from_int32(tensors[f"{p}.weight_zero_point"], 4, torch.Size((o, i // 64)), packed_dim=0)
    scale = tensors[f"{p}.weight_scale"].float()
    ct_weight = (codes.float() - zp.float().repeat_interleave(64, 1)) * scale.repeat_interleave(64, 1)
    assert torch.equal(ct_weight, q.quantized_weight(p).dequantize())


def test_same_input_same_bytes(tiny_gemma2, tmp_path):
    digests = []
    for k in range(2):
        out = tmp_path / f"q{k}"
        _quantize(tiny_gemma2, out, "--method", "gptq", *FAST_GPTQ, "--seed", "7")
        files = sorted(p for p in out.iterdir() if p.name != "quantkit.json")  # it records time and memory
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.toml")))
def test_every_recipe_runs(tiny_gemma3, tmp_path, recipe):
    report = _quantize(tiny_gemma3, tmp_path / "q", "--recipe", recipe, "--nsamples", "4", "--seqlen", "32")
    opts = report["options"]
    assert opts["method"] in recipe and f"int{opts['bits']}" in recipe and f"g{opts['group_size']}" in recipe
    if report["options"]["method"] == "gptq":  # layer outputs: GPTQ beats RTN on average
        assert report["mean_output_rel_err"] < report["mean_rtn_output_rel_err"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "5"], "--bits 5 is not supported"),
        (["--group", "100"], "--group 100 is not supported"),
        (["--calib", "/nonexistent/calib.txt"], "calibration file not found"),
        (["--recipe", "nope"], "recipe 'nope' not found"),
    ],
)
def test_bad_options(tiny_gemma2, tmp_path, args, message):
    out = tmp_path / "q"
    res = CliRunner().invoke(cli, ["quantize", str(tiny_gemma2), "-o", str(out), *args])
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_group_that_does_not_divide(tmp_path):
    from conftest import make_tiny_checkpoint

    model = make_tiny_checkpoint(tmp_path / "narrow", "gemma2", hidden=64)
    out = tmp_path / "q"
    res = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(out), "--group", "128"])
    assert res.exit_code == 2 and "input dimension 64 is not a multiple of group size 128" in res.stderr
    assert not out.exists()


def test_unknown_recipe_key(tiny_gemma2, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("bits = 4\nbitz = 3\n")
    res = CliRunner().invoke(cli, ["quantize", str(tiny_gemma2), "-o", str(tmp_path / "q"), "--recipe", str(recipe)])
    assert res.exit_code == 2 and "unknown key(s) bitz" in res.stderr


def test_interrupted_run_leaves_nothing(tiny_gemma2, tmp_path, monkeypatch):
    import quantkit.quant.quantize as qz

    calls = {"n": 0}
    real = qz.rtn_searched

    def dying_rtn(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(qz, "rtn_searched", dying_rtn)
    out = tmp_path / "q"
    with pytest.raises(KeyboardInterrupt):
        qz.quantize_checkpoint(tiny_gemma2, out, qz.QuantizeOptions(method="rtn"), progress=False)
    assert list(tmp_path.iterdir()) == []


def _reference_gptq(model_dir: Path, opts) -> dict:
    """GPTQ in the straightforward order: each step's activations of every batch held at once, the dense
    layer loaded, one inverse factor per linear. quantize's memory-lean calibrator must give its bytes."""
    import torch.nn.functional as F

    from quantkit.formats.packed.linear import PackedLinear
    from quantkit.io.texts import calibration_windows
    from quantkit.io.tokenizer import Tokenizer
    from quantkit.model import Gemma
    from quantkit.quant.gptq import Hessian, gptq_quantize
    from quantkit.quant.quantize import SUBSETS

    ckpt = open_checkpoint(model_dir)
    ids = calibration_windows(Tokenizer(ckpt.tokenizer_path), opts.calib, opts.nsamples, opts.seqlen, opts.seed)
    model = Gemma(ckpt.config, {"float32": torch.float32, "bfloat16": torch.bfloat16}[opts.calib_dtype])
    model.load_globals(ckpt.get("model.embed_tokens.weight"), ckpt.get("model.norm.weight"))
    inps = [model.embed(b) for b in ids.split(opts.batch_size)]
    out = {}
    for i in range(ckpt.config.num_hidden_layers):
        tensors = ckpt.layer_tensors(i)
        model.load_layer(i, tensors)
        ly = model.layers[i]
        attn, mlp = ly.self_attn, ly.mlp

        def quant(names, xs, i=i, tensors=tensors):
            hess = Hessian(xs[0].shape[-1])
            for x in xs:
                hess.add(x)
            for n in names:
                w = tensors[f"{n}.weight"].float()
                res = gptq_quantize(w, hess.H, opts.spec, torch.float32, opts.blocksize, opts.damp, opts.act_order)
                out[f"model.layers.{i}.{n}"] = res.weight
                model.set_linear(i, n, PackedLinear(res.weight))

        extras = ly.attention_inputs(inps[0])
        x1 = [ly.input_layernorm(h) for h in inps]
        quant(SUBSETS[0], x1)
        a = [attn.core(x, *extras) for x in x1]
        quant(SUBSETS[1], a)
        hm = [h + ly.post_attention_layernorm(attn.o_proj(z)) for h, z in zip(inps, a, strict=True)]
        x2 = [ly.pre_feedforward_layernorm(h) for h in hm]
        quant(SUBSETS[2], x2)
        m = [F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x) for x in x2]
        quant(SUBSETS[3], m)
        inps = [h + ly.post_feedforward_layernorm(mlp.down_proj(z)) for h, z in zip(hm, m, strict=True)]
        model.unload_layer(i)
    return out


@torch.no_grad()
@pytest.mark.parametrize(
    "changes",
    [
        {"group_size": 128, "calib_dtype": "float32"},
        {"group_size": 32, "sym": False, "act_order": True, "calib_dtype": "bfloat16"},
    ],
    ids=["fp32", "bf16-asym-actorder"],
)
def test_memory_lean_calibration_gives_the_straightforward_bytes(tiny_ckpt, tmp_path, changes):
    """Batch-by-batch Hessians, recomputed activations, one shared inverse factor per subset and linears
    read only when quantized: the same codes, scales and zero points as the straightforward order."""
    from quantkit.quant.quantize import quantize_checkpoint
    from quantkit.quant.recipes import QuantizeOptions

    opts = QuantizeOptions(nsamples=8, seqlen=64, calib=str(CALIB_TEXT), batch_size=3, scale_dtype="float32")
    opts = opts.replace(**changes)
    quantize_checkpoint(tiny_ckpt, tmp_path / "q", opts, progress=False)
    ref = _reference_gptq(tiny_ckpt, opts)
    q = open_checkpoint(tmp_path / "q")
    assert len(ref) == 7 * q.config.num_hidden_layers
    for path, want in ref.items():
        got = q.quantized_weight(path)
        assert torch.equal(got.codes, want.codes), path
        assert torch.equal(got.scale, want.scale), path
        assert (got.zero is None) == (want.zero is None) and (got.zero is None or torch.equal(got.zero, want.zero))


def test_rtn_streamed_gives_rtn_of_each_tensor(tiny_gemma2, tmp_path):
    """RTN read tensor by tensor with plain file reads: each linear is rtn() of the source weight and every
    other tensor is copied bit for bit."""
    from quantkit.quant.primitives import QuantSpec, rtn

    _quantize(tiny_gemma2, tmp_path / "q", "--method", "rtn", "--group", "64", "--scale-dtype", "bfloat16")
    src, q = open_checkpoint(tiny_gemma2), open_checkpoint(tmp_path / "q")
    for name in src.names():
        module = name.removesuffix(".weight")
        if q.is_linear_quantized(module):
            want = rtn(src.get(name), QuantSpec(4, 64, True), torch.bfloat16)
            got = q.quantized_weight(module)
            assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale), name
        else:
            assert torch.equal(q.get(name), src.get(name)) and q.dtype_of(name) == src.dtype_of(name), name
