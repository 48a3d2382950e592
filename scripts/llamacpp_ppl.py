"""Perplexity of a GGUF computed by llama.cpp (through llama-cpp-python) exactly as llama-perplexity does.

llama-perplexity's method: the text loses one trailing newline, is tokenized once by llama.cpp's own tokenizer with BOS
(special-token text left literal); chunks of n_ctx tokens, each evaluated from an empty KV cache with its first
token replaced by BOS; the second half of every chunk is scored with an fp32 log-softmax whose exponentials are
summed in double; PPL = exp(mean NLL) +- PPL * sqrt((mean(NLL^2) - mean(NLL)^2) / (count - 1)).

llama-cpp-python is a test/benchmark dependency of quantkit, never a runtime one: import this file from scripts/
and tests only.

    python scripts/llamacpp_ppl.py MODEL.gguf TEXT_FILE [--ctx 512] [--chunks N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0  # llama.cpp's KV cache type ids (ggml_type); the default cache is F16 (1)


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    se: float  # the "+/-" llama-perplexity prints
    n_chunks: int
    n_scored: int  # scored positions: n_chunks * (n_ctx - 1 - n_ctx // 2)
    n_ctx: int
    eval_seconds: float
    tokens_per_s: float  # evaluated tokens (n_chunks * n_ctx) per second
    chunk_ppl: list[float]  # running PPL after each chunk, as llama-perplexity's "[k]value" lines


def read_text(path: str | Path) -> str:
    """The file's text with one trailing newline removed (llama.cpp's ``-f`` handling)."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def load_llama(model_path: str | Path, n_ctx: int, n_threads: int | None = None, kv_f32: bool = False):
    """A llama.cpp context that returns logits for every position. ``kv_f32`` stores K/V in fp32 instead of
    llama.cpp's default fp16 (use it for exactness checks; leave it off to reproduce llama-perplexity)."""
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
    return llama_cpp.Llama(
        model_path=str(model_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        n_threads=n_threads,
        logits_all=True,
        verbose=False,
        **kv,
    )


def tokenize(llm, text: str) -> list[int]:
    """llama.cpp's tokens for ``text``: BOS first (add_bos_token), special-token text not parsed."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def chunk_logits(llm, chunk: list[int]) -> np.ndarray:
    """Logits float32 [T, V] for one chunk evaluated at positions 0..T-1 from an empty KV cache."""
    llm.reset()  # n_tokens = 0: the next eval clears the cache from position 0
    llm.eval(chunk)
    return np.array(llm.scores[: len(chunk)], dtype=np.float32)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log_softmax(logits)[target] per row, as llama-perplexity: fp32 differences, exps summed in double.

    logits [N, V] float32, targets [N] int -> float64 [N].
    """
    mx = logits.max(axis=1, keepdims=True)
    sum_exp = np.exp(logits - mx).astype(np.float64).sum(axis=1)
    picked = (logits[np.arange(len(targets)), targets] - mx[:, 0]).astype(np.float64)
    return np.log(sum_exp) - picked


def perplexity(llm, tokens: list[int], n_ctx: int = 512, n_chunks: int | None = None) -> PPLResult:
    """llama-perplexity's default-mode estimate over ``tokens`` (which start with BOS)."""
    if len(tokens) < 2 * n_ctx:
        raise ValueError(f"need at least {2 * n_ctx} tokens for n_ctx={n_ctx}, got {len(tokens)}")
    total = len(tokens) // n_ctx
    n_chunks = total if n_chunks is None or n_chunks <= 0 else min(n_chunks, total)
    bos, first = llm.token_bos(), n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count, running = 0, []
    start = time.perf_counter()
    for k in range(n_chunks):
        chunk = list(tokens[k * n_ctx : (k + 1) * n_ctx])
        chunk[0] = bos  # replaced, not inserted
        logits = chunk_logits(llm, chunk)
        nll = token_nll(logits[first : n_ctx - 1], np.asarray(chunk[first + 1 :]))
        nll_sum, nll2_sum, count = nll_sum + nll.sum(), nll2_sum + (nll * nll).sum(), count + len(nll)
        running.append(math.exp(nll_sum / count))
    seconds = time.perf_counter() - start
    mean, mean2 = nll_sum / count, nll2_sum / count
    ppl = math.exp(mean)
    se = ppl * math.sqrt(max(mean2 - mean * mean, 0.0) / (count - 1))
    return PPLResult(ppl, se, n_chunks, count, n_ctx, seconds, n_chunks * n_ctx / seconds, running)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    llm = load_llama(args.model, args.ctx, args.threads)
    result = perplexity(llm, tokenize(llm, read_text(args.text)), args.ctx, args.chunks)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        print(f"PPL = {result.ppl:.4f} +/- {result.se:.5f}  ({result.n_chunks} chunks of {result.n_ctx})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
