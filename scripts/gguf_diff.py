"""Compare two GGUF files tensor by tensor (by name: ggml type and bytes) and key by key, and print a digest of
each file's tensors that does not depend on their order: llama-quantize writes a layer's tensors sorted by
name and copies its input's metadata, so its files and quantkit's differ in sha256 where every tensor agrees.

    python scripts/gguf_diff.py llama-quantize.gguf quantkit.gguf    # exit 1 when a tensor differs
"""

from __future__ import annotations

import argparse
import hashlib
import sys

import gguf

import quantkit.formats.gguf.ggml_types  # noqa: F401  (Q2_0, which gguf-py does not name yet)


def tensors(path: str) -> dict[str, tuple[str, bytes]]:
    """name -> (ggml type name, data bytes)."""
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def metadata(path: str) -> dict[str, object]:
    """key -> value, the GGUF header's own fields left out."""
    return {f.name: f.contents() for f in gguf.GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


def digest(ts: dict[str, tuple[str, bytes]]) -> str:
    """sha256 over (name, type, bytes) of every tensor in name order."""
    h = hashlib.sha256()
    for name in sorted(ts):
        kind, data = ts[name]
        h.update(f"{name}\0{kind}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args(argv)
    ta, tb = tensors(args.a), tensors(args.b)
    differ = sorted(n for n in set(ta) | set(tb) if ta.get(n) != tb.get(n))
    print(f"tensors: {len(ta)} / {len(tb)}, {len(differ)} differ {differ[:4]}")
    print(f"tensor digest: {digest(ta)} / {digest(tb)}")
    ma, mb = metadata(args.a), metadata(args.b)
    for key in sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)):
        print(f"metadata {key}: {str(ma.get(key))[:60]} / {str(mb.get(key))[:60]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
