"""Hugging Face ids as MODEL, without network: a hub cache built in tmp in huggingface_hub's on-disk layout
(checked by huggingface_hub's own cache scanner), resolved with HF_HUB_OFFLINE=1 and HF_HUB_CACHE; the errors
for gated, unknown and pickle-only repositories from huggingface_hub's own exception types."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import errors as hf_errors
from huggingface_hub import scan_cache_dir

from quantkit.cli import cli
from quantkit.io.hub import HubId, hub_source, parse_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT, ref: str = "main") -> Path:
    """``models--org--name/{blobs,refs/<ref>,snapshots/<commit>/...}``: each file a blob named by its hash, linked
    from the snapshot by a relative symlink, as huggingface_hub writes them. Returns the snapshot directory."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(Path("../..") / "blobs" / blob.name)
    return snap


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_gemma2) -> Path:
    """A cache holding org/tiny-gemma2 (the tiny checkpoint plus a card naming a license) and org/pickles
    (config and a pytorch_model.bin only)."""
    cache = tmp_path_factory.mktemp("hub") / "cache"
    files = {p.name: p.read_bytes() for p in Path(tiny_gemma2).iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: gemma\nlibrary_name: transformers\n---\n# tiny\n"
    make_hub_cache(cache, "org/tiny-gemma2", files)
    make_hub_cache(cache, "org/pickles", {"config.json": files["config.json"], "pytorch_model.bin": b"\x80\x04."})
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub_cache


def _run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_the_cache_has_the_hub_layout(hub_cache):
    repos = {r.repo_id: r for r in scan_cache_dir(hub_cache).repos}
    assert set(repos) == {"org/tiny-gemma2", "org/pickles"}
    (rev,) = repos["org/tiny-gemma2"].revisions
    assert rev.commit_hash == COMMIT and rev.refs == frozenset({"main"})


def test_ids_and_paths():
    assert parse_hub_id("google/gemma-3-270m") == HubId("google/gemma-3-270m")
    assert parse_hub_id("google/gemma-3-270m@refs/pr/3") == HubId("google/gemma-3-270m", "refs/pr/3")
    for not_an_id in ("/abs/path", "./rel", "one", "a/b/c", "../x", "a/b@"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    snap = Path("/c/models--org--name/snapshots") / COMMIT
    assert hub_source(snap).repo == "org/name" and hub_source(snap).commit == COMMIT
    assert hub_source(snap.parent) is None and hub_source("/some/where") is None


def test_inspect_and_quantize_an_id_offline(offline, tiny_gemma2, tmp_path):
    res = _run("inspect", "org/tiny-gemma2", "--json")
    assert res.exit_code == 0, res.output
    got, want = json.loads(res.stdout), json.loads(_run("inspect", tiny_gemma2, "--json").stdout)
    assert got.pop("path") == str(offline / "models--org--tiny-gemma2" / "snapshots" / COMMIT)
    assert got == {k: v for k, v in want.items() if k != "path"}
    out = tmp_path / "q"
    res = _run("quantize", f"org/tiny-gemma2@{COMMIT}", "--method", "rtn", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    prov = json.loads((out / "quantkit.json").read_text())["provenance"]
    assert prov == {"name": "tiny-gemma2", "base_model": "org/tiny-gemma2", "revision": COMMIT, "license": "gemma"}
    card = huggingface_hub.ModelCard.load(out / "README.md").data  # as the Hub reads it
    assert (card.base_model, card.base_model_relation, card.license) == ("org/tiny-gemma2", "quantized", "gemma")
    assert not list(offline.rglob("*.lock")) and not list(tmp_path.glob(".*"))


def test_local_path_wins_over_an_id(offline, tiny_gemma2, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_gemma2, tmp_path / "org" / "tiny-gemma2")
    assert resolve_model("org/tiny-gemma2") == Path("org/tiny-gemma2")
    assert resolve_model("org/tiny-gemma2").resolve() == (tmp_path / "org" / "tiny-gemma2").resolve()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("org/absent", "HF_HUB_OFFLINE is set and"),
        ("org/tiny-gemma2@v9", "HF_HUB_OFFLINE is set and"),  # a ref the cache does not have
        ("org/pickles", "only pickle-based weights (pytorch_model.bin)"),
    ],
)
def test_offline_failures_are_one_line(offline, tmp_path, spec, message):
    out = tmp_path / "q"
    res = _run("quantize", spec, "--method", "rtn", "-o", out)
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert res.stderr.startswith("quantkit: error: ") and res.stderr.count("\n") == 1
    assert not list(tmp_path.iterdir())


def _http_error(cls: type, status: int) -> Exception:
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/m"))
    return cls("the Hub's message", response=response)


@pytest.mark.parametrize(
    ("error", "token", "message"),
    [
        (_http_error(hf_errors.GatedRepoError, 401), None, "gated repository (accept its terms at"),
        (_http_error(hf_errors.GatedRepoError, 403), "hf_x", "gated repository and HF_TOKEN has no access"),
        (_http_error(hf_errors.RepositoryNotFoundError, 404), None, "no such model on the Hugging Face Hub"),
        (_http_error(hf_errors.RevisionNotFoundError, 404), None, "has no revision 'nope'"),
        (_http_error(hf_errors.HfHubHTTPError, 503), None, "refused the download: the Hub's message"),
        (hf_errors.LocalEntryNotFoundError("no connection"), None, "the Hugging Face Hub cannot be reached"),
    ],
    ids=["gated", "gated-token", "unknown", "revision", "http", "network"],
)
def test_hub_errors_map_to_one_line(monkeypatch, tmp_path, error, token, message):
    """The download call raises huggingface_hub's exception; quantkit names what to do, and passes the
    environment's token and cache to the call."""
    seen = {}

    def download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    res = _run("inspect", "org/m@nope")
    assert res.exit_code == 2 and message in res.stderr, res.output
    assert res.stderr.count("\n") == 1
    assert seen["repo_id"] == "org/m" and seen["revision"] == "nope" and seen["token"] == token
    assert seen["cache_dir"] == tmp_path / "cache" and seen["local_files_only"] is False
    assert (
        not any(p.endswith((".bin", ".pt")) for p in seen["allow_patterns"])
        and "*.safetensors" in seen["allow_patterns"]
    )
