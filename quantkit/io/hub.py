"""Hugging Face model ids as model directories: ``org/name[@revision]`` resolved into the local hub cache.

A local path that exists always wins over an id. Only what quantkit reads is fetched (``ALLOW``): config,
SentencePiece model, small tokenizer / generation json, the model card and the safetensors weights, never
pickle-based ``.bin`` / ``.pt`` files. The environment is read at each call (not at import, as
huggingface_hub does): ``HF_HUB_OFFLINE`` (cache only), ``HF_TOKEN`` and ``HF_HUB_CACHE`` / ``HF_HOME``.
Every failure is one line that says what to do. ``hub_source`` maps a cache snapshot directory back to its
id and commit, which is how the model card and the GGUF metadata name their base model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError

ALLOW = [
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    "*.safetensors",
    "model.safetensors.index.json",
]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[A-Za-z0-9][\w./-]*))?")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})$")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubId:
    """``org/name`` and an optional revision (branch, tag or commit)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubSource:
    """Where a cache snapshot directory came from: ``org/name`` at ``commit``."""

    repo: str
    commit: str


def parse_hub_id(spec: str) -> HubId | None:
    """``org/name[@revision]`` -> HubId; anything else (an absolute or dotted path, one part) -> None."""
    m = _ID.fullmatch(spec)
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return HubId(m["repo"], m["rev"])


def hub_cache() -> Path:
    """The cache huggingface_hub uses: HF_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_source(path: str | Path) -> HubSource | None:
    """The id and commit of a hub cache snapshot directory (``.../models--org--name/snapshots/<sha>``)."""
    m = _SNAPSHOT.search(Path(path).absolute().as_posix())
    if m is None:
        return None
    return HubSource(f"{m['org']}/{m['name']}", m["commit"])


def resolve_model(spec: str | Path) -> Path:
    """A model directory for ``spec``: the local path when it exists (or is not an id), else the snapshot of
    the hub id ``org/name[@revision]`` in the cache, downloaded first unless HF_HUB_OFFLINE is set."""
    local = Path(spec)
    hub = None if local.exists() else parse_hub_id(str(spec))
    if hub is None:
        return local
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QuantkitError(
            f"{spec}: not a local path; to read it as a Hugging Face id install huggingface_hub "
            "(pip install huggingface_hub)"
        ) from None
    try:
        folder = snapshot_download(
            hub.repo,
            revision=hub.revision,
            cache_dir=hub_cache(),
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline(),
            allow_patterns=ALLOW,
        )
    except Exception as e:
        raise hub_error(e, hub) from None
    path = Path(folder)
    _refuse_without_safetensors(path, hub)
    return path


def hub_error(exc: Exception, hub: HubId) -> Exception:
    """huggingface_hub's exceptions as one-line errors naming what to do; anything else is returned as it is."""
    from huggingface_hub import errors as E

    url = f"https://huggingface.co/{hub.repo}"
    if isinstance(exc, E.GatedRepoError):
        if os.environ.get("HF_TOKEN"):
            return QuantkitError(f"{hub}: gated repository and HF_TOKEN has no access (request it at {url})")
        return QuantkitError(
            f"{hub}: gated repository (accept its terms at {url}, then set HF_TOKEN or run 'hf auth login')"
        )
    if isinstance(exc, E.RepositoryNotFoundError):
        return QuantkitError(
            f"{hub}: no such local path, and no such model on the Hugging Face Hub (check the path or the id; "
            "a private repository needs HF_TOKEN)"
        )
    if isinstance(exc, E.RevisionNotFoundError):
        return QuantkitError(f"{hub}: {hub.repo} has no revision {hub.revision!r} (check the branch, tag or commit)")
    if isinstance(exc, E.IncompleteSnapshotError):
        return QuantkitError(f"{hub}: the cached copy in {hub_cache()} is incomplete (run once online to complete it)")
    if isinstance(exc, E.LocalEntryNotFoundError):
        if offline():
            return QuantkitError(
                f"{hub}: HF_HUB_OFFLINE is set and {hub_cache()} has no copy (run once online, unset "
                "HF_HUB_OFFLINE, or point HF_HUB_CACHE at a cache that has it)"
            )
        return QuantkitError(
            f"{hub}: the Hugging Face Hub cannot be reached and {hub_cache()} has no copy (check the network)"
        )
    if isinstance(exc, E.HfHubHTTPError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return QuantkitError(f"{hub}: the Hugging Face Hub refused the download: {first} (try again later)")
    return exc


def _refuse_without_safetensors(path: Path, hub: HubId) -> None:
    """A snapshot must hold safetensors weights; a repo with pickles only gets an error saying so."""
    if any(path.glob("*.safetensors")):
        return
    names = {p.name for p in path.iterdir()}
    try:
        from huggingface_hub import get_cached_repo_tree

        names |= {f.path for f in get_cached_repo_tree(hub.repo, revision=path.name, cache_dir=hub_cache())}
    except Exception:  # no cached listing (offline copy made by another tool): the directory is all we know
        pass
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise QuantkitError(
            f"{hub}: the repository has only pickle-based weights ({pickles[0]}), which quantkit never loads "
            "(choose a revision with .safetensors weights, or convert them to safetensors first)"
        )
    raise QuantkitError(f"{hub}: the repository has no .safetensors weights (check the id or the revision)")
