"""A seeded, deterministic fuzzer for every file quantkit reads, run through the command that reads it.

Each *target* is one reader: it makes a valid input once (tiny checkpoint, packed artifact, GGUF, imatrix),
and each case copies it, mutates one file (bytes, length fields, truncation, JSON values and types, GGUF
counts and type tags), runs the command, and checks what a user must see:

- exit 0 (the mutation left a valid file), or exit 2 with exactly one ``quantkit: error:`` line;
- never a traceback, a crash (a signal), a hang (``--timeout`` seconds), or peak RSS over ``--max-rss-gib``;
- nothing outside the named output changed (every input file hashed before and after).

Cases run in worker processes (``python tests/fuzzing.py worker ...``) so that a crash of native code
(sentencepiece, numpy) is seen as a crash of one case, not of the test run: the parent restarts a worker
after the case that killed it. Case k of a target is always the same mutation (seed + k).

    python tests/fuzzing.py run [--cases 10000] [--targets safetensors,gguf] [--seed 0] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "wiki.test.excerpt.raw"
sys.path.insert(0, str(ROOT / "scripts"))

INTERESTING = [0, 1, 2, 7, 8, 255, 256, 4096, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]


# ------------------------------------------------------------------------------------------- mutations


class Mutator:
    """Deterministic mutations of bytes and JSON, drawn from one ``random.Random``."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def number(self, size: int) -> int:
        v = self.r.choice([*INTERESTING, self.r.getrandbits(8 * size)])
        return v % (1 << (8 * size))

    def bytes_(self, data: bytes, region: int) -> bytes:
        """Flip bits, overwrite bytes, rewrite a little-endian integer, truncate or extend, mostly in
        the first ``region`` bytes (the header)."""
        b = bytearray(data)
        region = max(1, min(region, len(b)))
        kind = self.r.choice(["flip", "byte", "int", "int", "truncate", "extend", "splice"])
        if kind == "flip":
            for _ in range(self.r.randint(1, 4)):
                i = self.r.randrange(region)
                b[i] ^= 1 << self.r.randrange(8)
        elif kind == "byte":
            for _ in range(self.r.randint(1, 4)):
                b[self.r.randrange(region)] = self.r.randrange(256)
        elif kind == "int":
            size = self.r.choice([1, 2, 4, 8])
            at = self.r.randrange(max(1, region - size)) & ~(self.r.choice([0, size - 1]))
            b[at : at + size] = self.number(size).to_bytes(size, "little")
        elif kind == "truncate":
            del b[self.r.randrange(len(b)) :]
        elif kind == "extend":
            b += bytes(self.r.randrange(256) for _ in range(self.r.randint(1, 64)))
        else:  # copy a slice of the header over another place
            i, j = self.r.randrange(region), self.r.randrange(region)
            n = self.r.randint(1, 16)
            b[j : j + n] = b[i : i + n]
        return bytes(b)

    def value(self, v: object) -> object:
        """A value of another type or an edge of its own type."""
        choices: list[object] = [None, True, -1, 0, 2**63, 1e308, "", "x", [], {}, [v], {"k": v}]
        if isinstance(v, bool):
            choices.append(not v)
        elif isinstance(v, int):
            choices += [v + 1, v - 1, -v, v * 1024, str(v), float(v)]
        elif isinstance(v, float):
            choices += [float("nan"), float("inf"), -v, 0.0, int(v)]
        elif isinstance(v, str):
            choices += [v + "x", v[:-1], v.upper(), "../" + v, v * 3, 7]
        elif isinstance(v, list):
            choices += [v[:-1], v + v[:1], list(reversed(v))]
        return self.r.choice(choices)

    def json_(self, obj: object) -> object:
        """One change somewhere in a JSON document: a value replaced, a key dropped, added or renamed."""
        paths: list[tuple[object, object]] = []

        def walk(node: object) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    paths.append((node, k))
                    walk(v)
            elif isinstance(node, list):
                for i, v in enumerate(node[:64]):
                    paths.append((node, i))
                    walk(v)

        walk(obj)
        if not paths:
            return self.value(obj)
        parent, key = self.r.choice(paths)
        kind = self.r.choice(["value", "value", "value", "drop", "add", "rename"])
        if kind == "value" or isinstance(parent, list):
            parent[key] = self.value(parent[key])
        elif kind == "drop":
            del parent[key]
        elif kind == "add":
            parent[key + "_x" if isinstance(key, str) else "x"] = self.value(parent[key])
        else:
            parent[str(key)[::-1] or "y"] = parent.pop(key)
        return obj


def mutate_json_text(m: Mutator, raw: bytes) -> bytes:
    if m.r.random() < 0.2:
        return m.bytes_(raw, len(raw))
    try:
        obj = json.loads(raw)
    except ValueError:
        return m.bytes_(raw, len(raw))
    return json.dumps(m.json_(obj), allow_nan=True).encode()


def mutate_safetensors(m: Mutator, raw: bytes) -> bytes:
    """The header's JSON (length prefix kept consistent), the length prefix itself, or raw bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n], raw[8 + n :]
    kind = m.r.choice(["json", "json", "json", "prefix", "bytes"])
    if kind == "json":
        new = mutate_json_text(m, header)
        return struct.pack("<Q", len(new)) + new + data
    if kind == "prefix":
        return struct.pack("<Q", m.number(8)) + raw[8:]
    return m.bytes_(raw, 8 + n)


def gguf_fields(path: Path) -> tuple[list[tuple[int, int]], int]:
    """(offset, size) of every scalar part of every key-value and tensor info - counts, lengths, type tags,
    dimensions, offsets: the places a structure-aware mutation rewrites - and where tensor data begins."""
    import gguf

    reader = gguf.GGUFReader(path)
    spots = []
    fields = list(reader.fields.values()) + [t.field for t in reader.tensors]
    for f in fields:
        off = f.offset
        for part in f.parts:
            size = part.nbytes
            if size in (1, 2, 4, 8) and part.size == 1:
                spots.append((off, size))
            off += size
    return spots, int(reader.data_offset)


def _reference_mutation(m: Mutator, raw: bytes, path: Path) -> bytes:
    """Rewrite a count of the header, a token or a row's scale / offset (the file is valid before the case),
    or mutate the header's and tokens' bytes."""
    n_ctx, n_chunk = struct.unpack_from("<I", raw, 8)[0], struct.unpack_from("<i", raw, 16)[0]
    data = 20 + 4 * n_ctx * n_chunk
    if m.r.random() < 0.6:
        b = bytearray(raw)
        at = m.r.choice([8, 12, 16, 20 + 4 * m.r.randrange(n_ctx * n_chunk), data, data + 4])
        b[at : at + 4] = m.number(4).to_bytes(4, "little")
        return bytes(b)
    return m.bytes_(raw, data)


# --------------------------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One reader: which file of the valid input a case mutates, how, and the command that reads it."""

    name: str
    source: str  # key of the valid input made by make_sources
    file: Callable[[Path], Path]  # the file to mutate, inside a copy of the source
    mutate: Callable[[Mutator, bytes, Path], bytes]
    command: Callable[[Path, Path, Path], list[str]]  # (copy of the source, model dir, output) -> argv


def _shard(d: Path) -> Path:
    return sorted(d.glob("*.safetensors"))[0]


def _gguf_mutation(m: Mutator, raw: bytes, path: Path) -> bytes:
    """Rewrite one count / length / type tag / dimension / offset (the file is valid before the case), or
    mutate the header's bytes."""
    spots, data_offset = gguf_fields(path)
    if m.r.random() < 0.6:
        b = bytearray(raw)
        off, size = m.r.choice(spots)
        b[off : off + size] = m.number(size).to_bytes(size, "little")
        return bytes(b)
    return m.bytes_(raw, data_offset)


TARGETS = {
    t.name: t
    for t in [
        Target("safetensors", "model", _shard, lambda m, raw, p: mutate_safetensors(m, raw),
               lambda src, model, out: ["inspect", str(src)]),
        Target("config", "model", lambda d: d / "config.json", lambda m, raw, p: mutate_json_text(m, raw),
               lambda src, model, out: ["inspect", str(src)]),
        Target("index", "model", lambda d: d / "model.safetensors.index.json",
               lambda m, raw, p: mutate_json_text(m, raw), lambda src, model, out: ["inspect", str(src)]),
        Target("tokenizer", "model", lambda d: d / "tokenizer.model",
               lambda m, raw, p: m.bytes_(raw, len(raw)),
               lambda src, model, out: ["export", str(src), "--type", "f32", "-o", str(out / "m.gguf")]),
        Target("packed", "art", lambda d: d / "config.json", lambda m, raw, p: mutate_json_text(m, raw),
               lambda src, model, out: ["export", str(src), "--type", "q8_0", "-o", str(out / "m.gguf")]),
        Target("packed-shard", "art", _shard, lambda m, raw, p: mutate_safetensors(m, raw),
               lambda src, model, out: ["export", str(src), "--type", "q8_0", "-o", str(out / "m.gguf")]),
        Target("gguf", "gguf", lambda d: d / "m.gguf", _gguf_mutation,
               lambda src, model, out: ["import-gguf", str(src / "m.gguf"), str(out / "hf")]),
        Target("gguf-eval", "gguf", lambda d: d / "m.gguf", _gguf_mutation,
               lambda src, model, out: ["eval-ppl", str(model), "--quantized", str(src / "m.gguf"),
                                        "--ctx", "32", "--chunks", "1", "--dataset", str(TEXT)]),
        Target("reference", "ref", lambda d: d / "base.kld", _reference_mutation,
               lambda src, model, out: ["eval-ppl", str(model), "--reference", str(src / "base.kld"), "--quantized",
                                        str(model.parent / "art"), "--dataset", str(TEXT)]),
        Target("imatrix", "imatrix", lambda d: d / "m.imatrix.gguf", _gguf_mutation,
               lambda src, model, out: ["@read_imatrix", str(src / "m.imatrix.gguf")]),
        Target("imatrix-export", "imatrix", lambda d: d / "m.imatrix.gguf", _gguf_mutation,
               lambda src, model, out: ["export", str(model), "--type", "q4_0", "--imatrix",
                                        str(src / "m.imatrix.gguf"), "-o", str(out / "m.gguf")]),
    ]
}  # fmt: skip


def make_sources(work: Path) -> dict[str, Path]:
    """The valid inputs: a tiny Gemma 2 checkpoint, an RTN artifact, an F32 GGUF, an imatrix file, a saved
    reference (32 tokens of the shipped WikiText-2 excerpt)."""
    from make_tiny_checkpoint import make_tiny_checkpoint

    from quantkit.formats.gguf.export import export_gguf
    from quantkit.formats.gguf.imatrix import ImportanceStats, write_imatrix
    from quantkit.quant.quantize import QuantizeOptions, quantize_checkpoint

    model = make_tiny_checkpoint(work / "model", "gemma2")
    quantize_checkpoint(model, work / "art", QuantizeOptions(method="rtn", group_size=32), progress=False)
    (work / "gguf").mkdir()
    export_gguf(model, work / "gguf" / "m.gguf", "f32", progress=False)
    (work / "imatrix").mkdir()
    import torch

    stats = ImportanceStats.empty()
    for i in range(2):
        stats.add_from_hessian(i, "self_attn.q_proj", torch.eye(256) * 2.0, 16)
    write_imatrix(work / "imatrix" / "m.imatrix.gguf", stats, "wiki.valid", 16)
    (work / "ref").mkdir()
    from quantkit.eval.session import EvalOptions, run_eval

    opts = EvalOptions(ctx=32, chunks=1, progress=False)
    run_eval(model, [], [("wiki", TEXT)], opts, save_reference=work / "ref" / "base.kld")
    return {"model": model, "art": work / "art", "gguf": work / "gguf", "imatrix": work / "imatrix",
            "ref": work / "ref"}  # fmt: skip


# ---------------------------------------------------------------------------------------------- a case


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so the command's own handlers do not swallow it."""


def _state(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _invoke(argv: list[str]) -> tuple[int, str]:
    """Run one command in this process: (exit status, stderr)."""
    if argv[0] == "@read_imatrix":  # the reader's own contract (export --imatrix is its own target)
        from quantkit.errors import QuantkitError
        from quantkit.formats.gguf.imatrix import read_imatrix

        try:
            read_imatrix(argv[1])
            return 0, ""
        except QuantkitError as e:
            return 2, f"quantkit: error: {e}\n"
        except Exception:
            return 1, traceback.format_exc()
    from quantkit.cli import cli

    err, out = io.StringIO(), io.StringIO()
    code = 0
    with redirect_stderr(err), redirect_stdout(out):
        try:
            cli.main(args=["-q", *argv], prog_name="quantkit")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return code, err.getvalue()


def run_case(target: Target, sources: dict[str, Path], work: Path, k: int, seed: int, timeout: int) -> dict:
    """Case ``k``: copy, mutate, run, check. Returns {"i", "verdict", "detail"}; verdict "ok" or a failure."""
    case_dir = work / f"case{k}"
    src = case_dir / "in"
    shutil.copytree(sources[target.source], src)
    out = case_dir / "out"
    out.mkdir()
    victim = target.file(src)
    m = Mutator(seed * 1_000_003 + k)
    if victim.exists():
        victim.write_bytes(target.mutate(m, victim.read_bytes(), victim))
    before = _state(src)
    signal.alarm(timeout)
    try:
        code, err = _invoke(target.command(src, sources["model"], out))
    except Hang:
        return {"i": k, "verdict": "hang", "detail": f"over {timeout} s"}
    finally:
        signal.alarm(0)
    verdict, detail = "ok", ""
    lines = err.strip().splitlines()
    if "Traceback" in err or code not in (0, 2):
        verdict, detail = "traceback" if "Traceback" in err else f"exit {code}", err[-1500:]
    elif code == 2 and (len(lines) != 1 or not lines[0].startswith("quantkit: error:")):
        verdict, detail = "not one line", err[-1500:]
    elif _state(src) != before:
        verdict, detail = "input changed", ""
    shutil.rmtree(case_dir, ignore_errors=True)
    return {"i": k, "verdict": verdict, "detail": detail, "exit": code, "error": lines[-1] if lines else ""}


def peak_rss_gib() -> float:
    """This process's peak RSS. VmHWM belongs to the address space exec made, whereas Linux carries
    ru_maxrss over from the parent across fork and exec (a worker of a large pytest process would report
    the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _warm_up(target: Target, sources: dict[str, Path], work: Path) -> None:
    """Run the command once on the unmutated input, untimed: the imports a command makes lazily (torch,
    sentencepiece, gguf) then do not count against the first case's time limit."""
    src = work / "warm" / "in"
    shutil.copytree(sources[target.source], src)
    (work / "warm" / "out").mkdir()
    _invoke(target.command(src, sources["model"], work / "warm" / "out"))
    shutil.rmtree(work / "warm", ignore_errors=True)


def worker(target: str, start: int, stop: int, seed: int, timeout: int, source_dir: Path, max_rss_gib: float) -> None:
    """Run cases [start, stop) of ``target``, one JSON line each (flushed before the next case starts).

    Peak RSS only grows within a process, and a hang may leave state behind: after a case that failed or went
    over ``max_rss_gib`` the worker stops, so that the parent starts the next case in a fresh process and no
    later case is charged for it."""
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
    sources = json.loads((source_dir / "sources.json").read_text())
    sources = {k: Path(v) for k, v in sources.items()}
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        _warm_up(TARGETS[target], sources, Path(tmp))
        for k in range(start, stop):
            print(json.dumps({"start": k}), flush=True)
            res = run_case(TARGETS[target], sources, Path(tmp), k, seed, timeout)
            res["rss_gib"] = peak_rss_gib()
            print(json.dumps(res), flush=True)
            if res["verdict"] != "ok" or res["rss_gib"] > max_rss_gib:
                return


# ---------------------------------------------------------------------------------------------- driver


def fuzz(
    target: str,
    cases: int,
    seed: int,
    source_dir: Path,
    timeout: int = 60,
    max_rss_gib: float = 2.0,
    per_worker: int = 500,
) -> dict:
    """Run ``cases`` cases of ``target`` in worker processes; returns counts and the failures."""
    counts: dict[str, int] = {}
    failures: list[dict] = []
    k, t0 = 0, time.perf_counter()
    while k < cases:
        stop = min(cases, k + per_worker)
        cmd = [sys.executable, __file__, "worker", target, str(k), str(stop), str(seed), str(timeout),
               str(source_dir), str(max_rss_gib)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        started, done = None, set()
        for line in proc.stdout.splitlines():
            rec = json.loads(line)
            if "start" in rec:
                started = rec["start"]
                continue
            done.add(rec["i"])
            verdict = rec["verdict"]
            if verdict == "ok" and rec["rss_gib"] > max_rss_gib:
                verdict, rec["detail"] = "memory", f"peak RSS {rec['rss_gib']:.2f} GiB"
            if verdict == "ok":
                verdict = "accepted" if rec["exit"] == 0 else "refused"
            counts[verdict] = counts.get(verdict, 0) + 1
            if verdict not in ("accepted", "refused"):
                failures.append({**rec, "verdict": verdict})
        if started is not None and started not in done:  # the worker died inside this case
            sig = -proc.returncode if proc.returncode < 0 else None
            failures.append({"i": started, "verdict": "crash", "detail": f"signal {sig}: {proc.stderr[-800:]}"})
            counts["crash"] = counts.get("crash", 0) + 1
            k = started + 1
        elif proc.returncode != 0:
            raise RuntimeError(f"fuzz worker failed outside a case: {proc.stderr[-2000:]}")
        else:  # the worker ran to ``stop``, or stopped early after a failed or oversized case
            k = max(done) + 1 if done else stop
    return {"target": target, "cases": cases, "seconds": round(time.perf_counter() - t0, 1), "counts": counts,
            "failures": failures}  # fmt: skip


def prepare(work: Path) -> Path:
    sources = make_sources(work)
    (work / "sources.json").write_text(json.dumps({k: str(v) for k, v in sources.items()}))
    return work


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    run = sub.add_parser("run")
    run.add_argument("--cases", type=int, default=10000, help="cases per target")
    run.add_argument("--targets", default=",".join(TARGETS))
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--timeout", type=int, default=60)
    run.add_argument("--json", type=Path, help="also write the summary (and every failure) here")
    w = sub.add_parser("worker")
    for name in ("target", "start", "stop", "seed", "timeout", "source_dir", "max_rss_gib"):
        w.add_argument(name)
    args = ap.parse_args(argv)
    if args.verb == "worker":
        worker(args.target, int(args.start), int(args.stop), int(args.seed), int(args.timeout), Path(args.source_dir),
               float(args.max_rss_gib))  # fmt: skip
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="fuzz-src-") as tmp:
        src = prepare(Path(tmp))
        print("| reader | cases | exit 0 (still valid) | exit 2 (one line) | failures | seconds |")
        print("|---|---|---|---|---|---|")
        for name in args.targets.split(","):
            r = fuzz(name, args.cases, args.seed, src, args.timeout)
            results.append(r)
            c = r["counts"]
            bad = r["cases"] - c.get("accepted", 0) - c.get("refused", 0)
            row = [name, r["cases"], c.get("accepted", 0), c.get("refused", 0), bad, r["seconds"]]
            print("| " + " | ".join(map(str, row)) + " |", flush=True)
            for f in r["failures"][:5]:
                print(f"    case {f['i']}: {f['verdict']}: {f.get('detail', '')[-300:]!r}")
            if args.json:  # after every reader, so that a long run stopped midway keeps what it measured
                args.json.write_text(json.dumps(results, indent=1))
    return 1 if any(r["failures"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
