"""What GPTQ learns of a linear's inputs: the Hessian H = (2/n) Σ x xᵀ and, for ``fp_targets``, the drift D.

Both are sums of products over every calibration row, so they are the calibration's largest cost after the
forwards (the 9B's down_proj: I = 14336, 2·n·I² FLOPs each). Two ways to do less than one GEMM each:

- H is symmetric: only its upper triangle is multiplied, a column block of ``BLOCK`` rows at a time
  (H[a:a+B, a:] += x[:, a:a+B]ᵀ x[:, a:]), and the lower triangle is copied from it when H is first read.
  Measured on 2 Zen 3 cores (4096 rows, fp32): I = 14336 in 6.4 s instead of 10.6 s, I = 3584 in 0.39 s
  instead of 0.60 s. (A single block, I ≤ BLOCK, is exactly the one GEMM.)
- fp_target needs D only as W D. Where a subset's weights have few rows (2 ΣO < I, e.g. down_proj's
  3584 x 14336), W D = (2/n) Σ ((x_fp − x) Wᵀ)ᵀ x is accumulated directly: 4·n·ΣO·I FLOPs instead of
  2·n·I², and O x I memory instead of I x I.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

BLOCK = 1024  # rows of H per product; 1024 and 2048 were fastest for I = 3584 .. 14336 (2 threads)


def mirror_upper_(H: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Copy H's upper triangle onto its lower one, in place, a block at a time (no I x I temporary)."""
    n = H.shape[0]
    for a in range(0, n, block):
        d = H[a : a + block, a : a + block]
        d.copy_(d.triu() + d.triu(1).T)
        H[a + block :, a : a + block].copy_(H[a : a + block, a + block :].T)
    return H


class Hessian:
    """Accumulates H = (2/n) Σ x xᵀ over the rows x [.., I] of a linear's inputs, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self._H: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._upper_only = False  # the lower triangle is stale until mirrored
        self.n = 0

    @property
    def H(self) -> torch.Tensor | None:
        """H [I, I], whole (mirrored from the upper triangle when rows were added since)."""
        if self._upper_only:
            mirror_upper_(self._H)
            self._upper_only = False
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self._upper_only = value, False

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self._H.device, torch.float32)  # [rows, I]
        m, i = x.shape
        beta, alpha = self.n / (self.n + m), 2.0 / (self.n + m)  # H <- H n/(n+m) + (2/(n+m)) xᵀx
        for a in range(0, i, BLOCK):
            self._H[a : a + BLOCK, a:].addmm_(x[:, a : a + BLOCK].T, x[:, a:], beta=beta, alpha=alpha)
        self._upper_only = i > BLOCK
        self.n += m


class Drift:
    """Accumulates D = (2/n) Σ (x_fp − x)ᵀ x [I, I] (scaled like ``Hessian``): how the unquantized model's
    inputs x_fp of a linear differ from the quantized model's inputs x on the same calibration rows. Exactly
    zero while the two models still agree (e.g. the first layer's q/k/v).

    ``weights`` (name -> W [O, I], the subset's linears that read these inputs): when they have few rows
    (2 ΣO < I) only each W D is kept, accumulated directly (see the module's note); ``products`` gives
    the same W D either way."""

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", weights: Mapping[str, torch.Tensor] | None = None
    ):
        direct = weights is not None and self.direct([w.shape[0] for w in weights.values()], in_features)
        self.device = torch.device(device)
        self._w = {k: w.to(device, torch.float32) for k, w in weights.items()} if direct else {}
        self._wd = {k: torch.zeros_like(w) for k, w in self._w.items()}  # name -> W D [O, I]
        self.D = None if direct else torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    @staticmethod
    def direct(rows: list[int], in_features: int) -> bool:
        """Whether weights of these row counts reading ``in_features`` inputs get W D directly (2 ΣO < I)."""
        return 2 * sum(rows) < in_features

    def add(self, x_fp: torch.Tensor, x: torch.Tensor, consume: bool = False) -> None:
        """``consume``: x_fp is not needed afterwards, so x_fp − x may be formed in its storage."""
        x = x.reshape(-1, x.shape[-1]).to(self.device, torch.float32)  # [rows, I]
        x_fp = x_fp.reshape(x.shape).to(self.device, torch.float32)
        d = x_fp.sub_(x) if consume else x_fp - x
        m = x.shape[0]
        beta, alpha = self.n / (self.n + m), 2.0 / (self.n + m)
        if self.D is not None:
            self.D.addmm_(d.T, x, beta=beta, alpha=alpha)
        for k, w in self._w.items():
            self._wd[k].addmm_((d @ w.T).T, x, beta=beta, alpha=alpha)  # [O, rows] @ [rows, I]
        self.n += m

    def times(self, W: torch.Tensor) -> torch.Tensor:
        """W D [O, I] in fp32 on D's device, for ``fp_target`` (D itself must be kept)."""
        return W.to(self.device, torch.float32) @ self.D

    def products(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """name -> W D [O, I] for the subset's ``weights``; D's storage is released (it is not needed again)."""
        if self.D is None:
            out, self._wd, self._w = self._wd, {}, {}
            return out
        out = {k: self.times(w) for k, w in weights.items()}
        self.D = None  # [I, I]: gone before the factor needs its two I x I buffers
        return out


def shrink_offdiagonal(H: torch.Tensor, s: float) -> None:
    """H [I, I] := (1 - s) H + s diag(H), in place (s = 0 leaves it as it is)."""
    if s == 0.0:
        return
    diag = H.diagonal().clone()
    H.mul_(1.0 - s)
    H.diagonal().copy_(diag)


def unshrunk_row_errors(rows: torch.Tensor, e: torch.Tensor, diag: torch.Tensor, s: float) -> torch.Tensor:
    """Row errors e Hs eᵀ in the shrunk Hs = (1 − s) H + s diag(H) (``shrink_offdiagonal``) -> e H eᵀ =
    (e Hs eᵀ − s Σ_j H_jj e_j²) / (1 − s), float64; rows [r], e [r, I], diag [I] = diag(H), s < 1."""
    return (rows.double() - s * (e.double().square() @ diag.double())) / (1.0 - s)
