"""GPTQ onto the codebook i-quants (IQ3_*, IQ2_*, IQ1_*): block LDLQ (Chee, Cai, Kuleshov, De Sa, "QuIP: 2-Bit
Quantization of Large Language Models With Guarantees", 2023; Tseng et al., "QuIP#", 2024), on ggml's grids.

A codebook type stores ``dim`` consecutive weights of a row as one point (``CodebookGrid``), so GPTQ's
column-by-column rounding becomes slab-by-slab: the ``k = dim`` columns of a slab are chosen jointly, then
their error is fed forward to the columns not yet chosen, as GPTQ feeds one column's. With H = R Rᵀ
(``HessianFactor``, R upper triangular) and R_ss its k x k diagonal block at the slab, the slab's target is
w̃ = w + A R_ss⁻¹ with A = Σ_{j before s} (w_j − q_j) R_js (``gptq``'s form, a slab at a time), its scaled
errors are E = (w̃ − q) R_ss, and the objective ‖E‖² = (w̃ − q) M (w̃ − q)ᵀ with M = R_ss R_ssᵀ (the inverse
of the remaining columns' H⁻¹ block): each row's point is the one of least error in that metric, not the
nearest.

For the sign types, with σ the signs of the (error-updated) w, q = s σ ⊙ p (s the run's scale, p a point):

    err(p) = s² pᵀ (σσᵀ ⊙ M) p − 2 s pᵀ (σ ⊙ M w)      (+ wᵀ M w)

— the quadratic term is one GEMM of the rows' σσᵀ ⊙ M against the points' p pᵀ (their upper triangles). Where the
7-bit types need an even count of negatives and σ has an odd one, every single flip j of the slab is scored
too (err changes by 4 s p_j (v_j − s u_j), v = σ ⊙ M w, u = (σσᵀ ⊙ M, diagonal 0) p), and the best is kept;
IQ3_XXS's 4-weight slabs settle the parity of their 8-weight sign byte in its second half. IQ1's points have
no signs: err(p) = s² (p+δ)ᵀ M (p+δ) − 2 s (p+δ)ᵀ M w, with IQ1_M's shift δ = ±1/8 chosen per slab and
IQ1_S's fixed per run with the scales. Act-order moves runs of 8 columns together (``factor_hessian``'s
``group``), so a slab is always k consecutive columns.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.codebook_grid import DELTA, CodebookGrid, CodebookWeight
from quantkit.quant.gptq import GPTQResult, HessianFactor, gptq_result, pulled

ROWS = 2048  # rows scored together: the flip scores are [ROWS, k G] float32


def ldlq_quantize(W: torch.Tensor, fac: HessianFactor, grid: CodebookGrid, blocksize: int = 128) -> GPTQResult:
    """Quantize W [O, I] onto ``grid`` against the Hessian whose ``HessianFactor`` is ``fac``."""
    sp = grid.spec
    k, n = sp.dim, W.shape[1]
    perm, R = fac.perm, fac.R
    if fac.actorder and not bool((perm.reshape(-1, 8) == perm.reshape(-1, 8)[:, :1] + torch.arange(8)).all()):
        raise QuantkitError(f"{sp.qtype.name}: act-order must keep runs of 8 columns (factor_hessian group=8)")
    dev = R.device
    W = W.detach().to(dev, torch.float32, copy=True)
    W[:, fac.dead] = 0.0
    # Wt [I, O] in perm order; each slab's rows become its differences w − q once chosen (as in gptq)
    Wt = (W[:, perm] if fac.actorder else W).T.contiguous()
    del W
    o = Wt.shape[1]
    table = grid.table(dev)  # [G, k]
    pick = _Picker(grid, table, dev)
    points = torch.zeros(o, n // k, dtype=torch.int64, device=dev)
    bits = torch.zeros(o, n // 8, dtype=torch.int64, device=dev)
    starts = perm[::k].tolist()  # the natural column each slab starts at, in processing order
    blocksize = max(8, blocksize // 8 * 8)
    R_ss = R.unfold(0, k, k).unfold(1, k, k).diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # [I/k, k, k]
    eye = torch.eye(k, dtype=torch.float32, device=dev).expand_as(R_ss)
    R_inv = torch.linalg.solve_triangular(R_ss, eye, upper=True)  # [I/k, k, k]
    sq_err = torch.zeros(o, dtype=torch.float64, device=dev)  # ‖E‖² per row
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        A = pulled(R, Wt, i1, i2)  # [b, O]
        R1 = R[i1:i2, i1:i2]
        for t in range(0, i2 - i1, k):
            s = (i1 + t) // k  # the slab, in processing order
            c = starts[s]
            Ds = Wt[i1 + t : i1 + t + k]  # [k, O]: w, then w − q
            w = (Ds + R_inv[s].T @ A[t : t + k]).T  # the targets w̃ [O, k]
            q, pt, b = pick(w, R_ss[s] @ R_ss[s].T, c, bits[:, c // 8])
            points[:, c // k] = pt
            bits[:, c // 8] = b
            sq_err += ((w - q) @ R_ss[s]).double().square_().sum(1)  # E = (w̃ − q) R_ss
            A[t + k :].addmm_(R1[t : t + k, t + k :].T, Ds.sub_(q.T))
    return gptq_result(CodebookWeight(grid, points.cpu(), bits.cpu()), Wt, sq_err, fac)


class _Picker:
    """Each row's best point (and signs or shift) for one slab: ``(w [O, k], M [k, k], c, the slab's 8-weight
    bits so far [O]) -> values q [O, k], points [O], the new bits [O]``.

    The error divided by the row's scale s > 0 (the argmin is the same) is linear in the point's monomials:
    e(p) = s pᵀ A p − 2 vᵀ p = [s c_ij A_ij, −2 v] · [p_i p_j, p] over i <= j (A is symmetric: c_ij = 2 off
    the diagonal, 1 on it), so every row's candidates are scored by one GEMM of [rows, T + k] against the
    points' [T + k, G], T = k (k + 1) / 2, with no pass over [rows, G] but the argmin.
    A flip of sign j negates row and column j of A = σσᵀ ⊙ M off its diagonal, and v_j: one more left row per
    option (rows with an odd count only)."""

    def __init__(self, grid: CodebookGrid, table: torch.Tensor, dev: torch.device) -> None:
        self.sp, self.P = grid.spec, table
        self.scale = grid.scale.to(dev)  # [O, I / run]
        G, k = table.shape
        if self.sp.signs == "shift":
            self.C = torch.cat([table + DELTA, table - DELTA])  # [2G, k]: shift +1/8, then -1/8
            self.minus = grid.run_minus().to(dev) if self.sp.qtype.name == "IQ1_S" else None
        else:
            self.iu = torch.triu_indices(k, k, device=dev)  # [2, T]: the pairs i <= j
            self.c = torch.where(self.iu[0] == self.iu[1], 1.0, 2.0)  # [T]
            P2 = table[:, self.iu[0]] * table[:, self.iu[1]]  # [G, T]
            self.rhs = torch.cat([P2, table], 1).T.contiguous()  # [T + k, G]
            self.f = 1.0 - 2.0 * torch.eye(k, device=dev)  # [k (option j), k]: sign j flipped
            self.ff = self.f[:, self.iu[0]] * self.f[:, self.iu[1]]  # [k, T]

    def __call__(self, w, M, c, prior):
        s = self.scale[:, c // self.sp.run]  # [O]
        shift = self.sp.signs == "shift"
        out = [self._shift(w[r], M, s[r], c, r) if shift else self._signed(w[r], M, s[r], c, prior[r])
               for r in _row_blocks(w.shape[0])]  # fmt: skip
        return tuple(torch.cat(parts) for parts in zip(*out, strict=True))

    def _shift(self, w, M, s, c, rows):
        """IQ1: candidates p ± 1/8 (IQ1_S: the run's shift only)."""
        G = self.P.shape[0]
        rhs = torch.cat([((self.C @ M) * self.C).sum(1)[None], self.C.T])  # [1 + k, 2G]
        lhs = torch.cat([s[:, None], -2 * (w @ M)], 1)  # [O, 1 + k]
        if self.minus is None:
            idx = (lhs @ rhs).argmin(1)
        else:
            minus = self.minus[rows, c // 32]  # [O]
            idx = torch.empty_like(minus, dtype=torch.int64)
            for m in (False, True):
                sel = minus == m
                idx[sel] = (lhs[sel] @ rhs[:, m * G : (m + 1) * G]).argmin(1) + m * G
        return s[:, None] * self.C[idx], idx % G, (idx >= G).long()

    def _signed(self, w, M, s, c, prior):
        """IQ3 / IQ2: signs from w, the point by the M-metric; with parity, the best single flip where odd."""
        G, k = self.P.shape
        sigma = torch.where(w < 0, -1.0, 1.0)  # [O, k]
        i, j = self.iu
        A = (sigma[:, i] * sigma[:, j]) * (M[i, j] * self.c)  # [O, T]: c_ij (σσᵀ ⊙ M)_ij, i <= j
        v = sigma * (w @ M)  # [O, k]
        shift = c % 8  # where the slab's signs go in its 8-weight byte
        odd = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
        if self.sp.signs == "parity" and shift + k == 8:  # the slab closes a sign byte: its parity must be even
            before = ((prior[:, None] >> torch.arange(shift, device=w.device)) & 1).sum(1)
            odd = ((sigma < 0).long().sum(1) + before) % 2 == 1
        pt = torch.empty(w.shape[0], dtype=torch.int64, device=w.device)
        even = ~odd
        pt[even] = (torch.cat([s[even, None] * A[even], -2 * v[even]], 1) @ self.rhs).argmin(1)
        if bool(odd.any()):
            n = int(odd.sum())
            lhs = torch.cat([(s[odd, None] * A[odd])[:, None] * self.ff, -2 * v[odd][:, None] * self.f], 2)
            idx = (lhs.reshape(n * k, -1) @ self.rhs).reshape(n, k * G).argmin(1)  # [n]: option j, point
            pt[odd] = idx % G
            sigma[odd] = sigma[odd] * self.f[idx // G]
        q = (s[:, None] * self.P[pt]) * sigma
        negs = ((sigma < 0).long() << (shift + torch.arange(k, device=w.device))).sum(1)
        return q, pt, (prior if shift else torch.zeros_like(prior)) | negs


def _row_blocks(o: int) -> list[slice]:
    return [slice(r, min(r + ROWS, o)) for r in range(0, o, ROWS)]
