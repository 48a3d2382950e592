"""Model cards and GGUF provenance: the card as the Hub and llama.cpp's converter read it (huggingface_hub,
gguf-py), its recipe re-run as a recipe, its size against the files, eval-ppl --card tables replaced per
dataset, and the quantize.imatrix.* keys against llama-quantize's own."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import gguf
import huggingface_hub
import pytest
from click.testing import CliRunner
from conftest import CALIB_TEXT, TEST_TEXT
from safetensors import safe_open

from quantkit.cli import cli
from quantkit.formats.card import CARD_NAME, read_front_matter, set_section
from quantkit.formats.gguf.export import export_gguf
from quantkit.quant.recipes import resolve_options

ROOT = Path(__file__).resolve().parents[1]
LLAMA_QUANTIZE = ROOT / "build" / "llama.cpp" / "bin" / "llama-quantize"
FAST_GPTQ = ["--method", "gptq", "--nsamples", "8", "--seqlen", "64", "--calib", str(CALIB_TEXT)]


def _run(*args) -> dict | None:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout) if "--json" in args else None


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_gemma2) -> Path:
    """The tiny checkpoint with a card of its own that names a license."""
    src = tmp_path_factory.mktemp("src") / "tiny-src"
    shutil.copytree(tiny_gemma2, src)
    (src / CARD_NAME).write_text("---\nlicense: apache-2.0\ntags: [text-generation]\n---\n# a source\n")
    return src


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, source) -> Path:
    out = tmp_path_factory.mktemp("art") / "tiny-w4g64"
    _run("quantize", source, "-o", out, "--group", "64", "--scale-dtype", "float16", *FAST_GPTQ, "--json")
    return out


def _stored_linear_bits(out: Path) -> float:
    """Bits per weight from the shards themselves: packed codes, scales and zero points over the linears'
    parameter count (the shape tensors hold it)."""
    bits = params = 0
    for shard in out.glob("model-*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")):
                    t = f.get_tensor(name)
                    bits += 8 * t.numel() * t.element_size()
                elif name.endswith(".weight_shape"):
                    o, i = f.get_tensor(name).tolist()
                    params += o * i
    return bits / params


def test_card_as_the_hub_reads_it(artifact):
    card = huggingface_hub.ModelCard.load(artifact / CARD_NAME)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["tags"] == ["quantkit", "gptq", "int4", "compressed-tensors", "gemma2"]
    assert "base_model" not in data  # a local source: the Hub accepts only an id there
    assert "# base_model: set the Hub id" in (artifact / CARD_NAME).read_text()
    text = card.text
    bpw = float(re.search(r"\| bits per weight \| ([\d.]+)", text)[1])
    assert bpw == pytest.approx(_stored_linear_bits(artifact), abs=5e-4)
    mb = float(re.search(r"\| size \| ([\d.]+) MB", text)[1])
    shards = sum(p.stat().st_size for p in artifact.glob("model-*.safetensors")) / 1e6
    assert abs(mb - shards) < 0.06
    assert f'from_pretrained("./{artifact.name}")' in text and f"quantkit export ./{artifact.name}" in text


def test_card_recipe_reruns_as_a_recipe(artifact, tmp_path):
    recipe = re.search(r"```toml\n(.*?)```", (artifact / CARD_NAME).read_text(), re.S)[1]
    (tmp_path / "r.toml").write_text(recipe)
    report = json.loads((artifact / "quantkit.json").read_text())
    assert dataclasses.asdict(resolve_options(str(tmp_path / "r.toml"))) == report["options"]


def test_set_section_replaces_only_its_own():
    card = "---\nlicense: mit\n---\n# x\n"
    one = set_section(card, "a", "table A1")
    two = set_section(one, "b", "table B")
    assert set_section(two, "a", "table A2") == two.replace("table A1", "table A2")


def test_eval_ppl_card_one_table_per_dataset(artifact, source, tmp_path):
    other = tmp_path / "other.raw"
    other.write_text(TEST_TEXT.read_text()[:20000])
    gguf_file = tmp_path / "q.gguf"
    export_gguf(artifact, gguf_file, "q4_0", progress=False)
    args = ["eval-ppl", source, "--quantized", artifact, "--quantized", gguf_file, "--ctx", "64", "--card", "--json"]
    _run(*args, "--chunks", "2")
    _run(*args, "--chunks", "2", "--dataset", other)
    last = _run(*args, "--chunks", "3")  # the same dataset again: its table is replaced
    assert last["cards"] == [str(artifact / CARD_NAME)]
    text = (artifact / CARD_NAME).read_text()
    assert text.count("## Evaluation: ") == 2 and text.count("## Evaluation: other.raw") == 1
    own = text[text.index("## Evaluation: wiki.test.excerpt.raw") :]
    row = last["models"][0]
    assert f"3 chunks x 64 tokens ({last['tokens_scored']} tokens" in own
    assert f"| `{artifact.name}` | {row['ppl']:.4f} ± {row['ppl_se']:.4f} | {row['delta_ppl']:+.4f}" in own
    assert f"| {row['kld_mean']:.5f} | {row['kld_p99']:.5f} | {100 * row['top1_agreement']:.2f}% |" in own
    assert read_front_matter(artifact / CARD_NAME)["license"] == "apache-2.0"
    assert not list(artifact.glob(".*"))  # no temporary or lock file left in the artifact


def test_eval_ppl_card_refuses_a_directory_it_did_not_write(source, tmp_path):
    before = (source / CARD_NAME).read_bytes()
    res = CliRunner().invoke(cli, ["eval-ppl", str(source), "--quantized", str(source), "--card", "--chunks", "1"])
    assert res.exit_code == 2 and "is not a quantkit artifact" in res.stderr, res.output
    assert (source / CARD_NAME).read_bytes() == before


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_gguf_provenance_as_the_converter_reads_the_card(artifact, source, tmp_path):
    """The card's base_model (as a user sets it before uploading) becomes general.base_model.* exactly as
    llama.cpp's converter (gguf-py's Metadata) derives them from that card; license, recipe and tags too."""
    art = tmp_path / artifact.name
    shutil.copytree(artifact, art)
    card = (art / CARD_NAME).read_text().replace("library_name:", "base_model: google/gemma-2-2b-it\nlibrary_name:")
    (art / CARD_NAME).write_text(card)
    f = _fields(export_gguf(art, tmp_path / "q.gguf", "q4_0", progress=False)["path"])
    want = gguf.Metadata.load(None, art, None, 0)
    assert f["general.base_model.count"] == len(want.base_models) == 1
    assert want.base_models[0]  # the converter found the id
    for key, value in want.base_models[0].items():
        assert f[f"general.base_model.0.{key}"] == value, key
    assert f["general.license"] == want.license == "apache-2.0"
    assert f["general.quantized_by"] == "quantkit" and f["general.tags"] == ["quantkit", "gptq", "q4_0", "gemma2"]
    opts = json.loads((art / "quantkit.json").read_text())["options"]
    assert json.loads(f["quantkit.recipe"]) == dict(opts, calib=Path(opts["calib"]).name)  # no local paths
    assert not any(k.startswith("quantize.imatrix") for k in f)  # packed codes: no importance matrix used
    dense = _fields(export_gguf(source, tmp_path / "d.gguf", "q8_0", progress=False)["path"])
    assert "general.base_model.count" not in dense and "quantkit.recipe" not in dense
    assert dense["general.license"] == "apache-2.0" and dense["general.tags"] == ["quantkit", "q8_0", "gemma2"]


@pytest.mark.skipif(not LLAMA_QUANTIZE.is_file(), reason="llama-quantize not built (make llama-tools)")
def test_imatrix_keys_as_llama_quantize_writes_them(tiny_gemma3, tmp_path, monkeypatch):
    """GPTQ into ggml blocks is importance-weighted: its GGUF carries the quantize.imatrix.* keys that
    llama-quantize writes when given the same calibration's imatrix (same values, same types)."""
    monkeypatch.chdir(tmp_path)
    ours = tmp_path / "ours.gguf"
    args = ["--format", "gguf", "--type", "q4_0", "--imatrix-out", "cal.imatrix", *FAST_GPTQ]
    _run("quantize", tiny_gemma3, "-o", ours, *args)
    f32, theirs = tmp_path / "f32.gguf", tmp_path / "theirs.gguf"
    export_gguf(tiny_gemma3, f32, "f32", progress=False)
    cmd = [str(LLAMA_QUANTIZE), "--imatrix", "cal.imatrix", str(f32), str(theirs), "Q4_0", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = gguf.GGUFReader(ours).fields, gguf.GGUFReader(theirs).fields
    keys = [k for k in b if k.startswith("quantize.imatrix.")]
    assert len(keys) == 4
    for k in keys:
        assert (a[k].contents(), a[k].types) == (b[k].contents(), b[k].types), k
