"""After GPTQ: descend the same quadratic, coordinate by coordinate, on the same fixed grid.

GPTQ rounds each column once, in order, against a target that only the earlier columns have moved. Its result
is not a minimum of the layer's error (W − Q) H (W − Q)ᵀ over the grid: a column rounded early would now
round elsewhere, given where the later ones went. Two exact steps lower that error further and keep every
value on the grid:

- **Codes** (``coordinate_descent``): each column in turn re-rounded to the value that minimises the error
  with every other column held, w_j + (P_j − H_jj e_j) / H_jj with E = W − Q and P = H Eᵀ, rounded onto the
  column's own group (s, b). One sweep costs one GPTQ pass (O·I²).
- **Block scales** (``refit_affine``): with the codes fixed, a row's values are linear in its blocks' stored
  floats, value_j = d u_j (+ m), so the best fp16 d (and m, for Q4_1 / Q5_1) per block are a least-squares
  solve in H, u the code's level. Types with 256-weight super-blocks (K types, IQ4_XS) keep theirs: refitting
  their d (times the fixed sub-block scales) was measured on the 270M and moved KLD from WikiText to French
  (q3_k_m 0.0671 / 0.0831 -> 0.0695 / 0.0804, iq4_xs 0.0613 / 0.0645 -> 0.0628 / 0.0611), no gain in the
  worst domain.

Both only ever lower the error in the metric they are given (a row keeps its scales when the fp16-rounded
fit would not), so the grid, the bytes' form and the dequantizers stay exactly as GPTQ's; only better
points on them are taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from quantkit.formats.gguf.grid_search import level_of
from quantkit.formats.gguf.grids import GridWeight

CHUNK_BYTES = 256 << 20  # a chunk of rows' [r, K, G, I] float64 product in ``refit_affine``


def coordinate_descent(
    W: torch.Tensor, gw: GridWeight, H: torch.Tensor, sweeps: int = 1, blocksize: int = 128
) -> tuple[GridWeight, torch.Tensor]:
    """``gw``'s codes (on its fixed grid, for W [O, I]) improved by ``sweeps`` passes of coordinate descent
    in H [I, I]'s metric, columns by decreasing diag(H), and each row's error e H eᵀ then, float64 [O]. The
    error never rises.

    P [I, O] gives every column's best value; a changed column updates the rows of P inside its block of
    ``blocksize`` columns at once (a rank-1 product) and the rest with one GEMM per block."""
    g = gw.grid.layout.g
    dev = H.device
    round_column = gw.grid.to(dev).column_rounder()
    perm = torch.argsort(H.diagonal(), descending=True)
    Hp = H.to(torch.float32)[perm][:, perm]  # [I, I], in perm order as all below
    Wt = W.to(dev, torch.float32).T[perm].contiguous()  # [I, O]
    Et = Wt - gw.dequantize().to(dev).T[perm]  # E ᵀ [I, O]
    Pt = Hp @ Et  # [I, O]
    codes_t = gw.codes.to(dev).T[perm].contiguous()  # [I, O]
    hd = Hp.diagonal().tolist()
    group_of = (perm // g).tolist()
    n = Hp.shape[0]
    for _ in range(sweeps):
        for b1 in range(0, n, blocksize):
            b2 = min(b1 + blocksize, n)
            D = torch.zeros(b2 - b1, Et.shape[1], device=dev)  # the block's changes of E
            for j in range(b1, b2):
                if hd[j] <= 0:
                    continue  # a dead input: its weights do not matter
                t = Wt[j] + (Pt[j] - Et[j] * hd[j]) / hd[j]  # column j's best value, the others held
                c, v = round_column(t, group_of[j])
                delta = Wt[j].sub(v).sub_(Et[j])
                if not delta.any():  # its codes stayed
                    continue
                Pt[b1:b2].addr_(Hp[b1:b2, j], delta)
                Et[j] += delta
                D[j - b1] = delta
                codes_t[j] = c
            if b1 > 0:
                Pt[:b1].addmm_(Hp[:b1, b1:b2], D)
            if b2 < n:
                Pt[b2:].addmm_(Hp[b2:, b1:b2], D)
    row_err = (Pt * Et).sum(0, dtype=torch.float64).cpu()
    inv = torch.argsort(perm)
    return GridWeight(gw.grid, codes_t[inv].T.contiguous().cpu()), row_err


def refit_affine(
    W: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor | None,
    H: torch.Tensor,
    d0: torch.Tensor,
    m0: torch.Tensor | None,
    stored: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    budget: int = CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Least-squares block floats for fixed codes: W, U (and V) [O, I], H [I, I], the current d0 (and m0)
    [O, G] with value_j = d u_j (+ m v_j) in each of a row's G blocks -> d (and m) [O, G], float64, as
    ``stored`` rounds them (e.g. to fp16), and each row's error (w − value)ᵀ H (w − value) with them [O]. A
    row keeps d0, m0 unless the stored fit lowers that error; a row whose system is singular keeps them too."""
    o, i = W.shape
    G = d0.shape[1]
    g, K = i // G, 1 if V is None else 2
    dev = H.device
    Hd = H.to(torch.float64)
    Hb = Hd.view(G, g, i)  # block b's rows of H
    p0 = (d0[:, None] if V is None else torch.stack([d0, m0], 1)).to(torch.float64).reshape(o, K * G)
    out, row_err = p0.clone(), torch.empty(o, dtype=torch.float64)
    r = max(1, min(o, budget // max(1, K * G * i * 8)))
    for a in range(0, o, r):
        parts = [U[a : a + r]] if V is None else [U[a : a + r], V[a : a + r]]
        basis = torch.stack([t.to(dev, torch.float64).view(-1, G, g) for t in parts], 1)  # [r, K, G, g]
        n = basis.shape[0]
        Z = torch.einsum("rkgj,gji->rkgi", basis, Hb).view(n, K, G, G, g)  # Σ_{j in g} a_j H_j·, by (h, j')
        M = torch.einsum("rkghj,rlhj->rkglh", Z, basis).reshape(n, K * G, K * G)  # AᵀHA
        del Z
        w = W[a : a + n].to(dev, torch.float64)
        wh = w @ Hd  # [r, I]
        rhs = torch.einsum("rkgj,rgj->rkg", basis, wh.view(n, G, g)).reshape(n, K * G)  # AᵀHw
        whw = (wh * w).sum(-1)
        p, old = stored(_solve(M, rhs)), p0[a : a + n].to(dev)
        e_new, e_old = _quadratic(p.nan_to_num(), M, rhs, whw), _quadratic(old, M, rhs, whw)
        better = torch.isfinite(p).all(-1) & (e_new < e_old)
        out[a : a + n] = torch.where(better[:, None], p, old).cpu()
        row_err[a : a + n] = torch.where(better, e_new, e_old).cpu()
    out = out.view(o, K, G)
    return out[:, 0], (None if V is None else out[:, 1]), row_err.clamp_min(0.0)


def _quadratic(p: torch.Tensor, M: torch.Tensor, rhs: torch.Tensor, whw: torch.Tensor) -> torch.Tensor:
    """(w − A p)ᵀ H (w − A p) = wᵀHw − 2 pᵀAᵀHw + pᵀAᵀHAp per row: p, rhs [n, k], M [n, k, k], whw [n]."""
    return whw - 2 * (p * rhs).sum(-1) + (p[:, None, :] @ M @ p[:, :, None]).view(-1)


def _solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched M p = rhs [n, k] with a tiny ridge (a block of zero codes has an empty column); NaN rows where
    the solve fails."""
    ridge = 1e-9 * M.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)  # [n]
    M = M + ridge[:, None, None] * torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    p, info = torch.linalg.solve_ex(M, rhs)
    return p.masked_fill((info != 0)[:, None], float("nan"))


def refit_block_scales(W: torch.Tensor, gw: GridWeight, H: torch.Tensor) -> tuple[GridWeight, torch.Tensor]:
    """``gw`` (a type of single-scale blocks: Q8_0, Q4_0 ... IQ4_NL, Q1_0, Q2_0) with every block's fp16 d (and
    m) refitted to its codes by least squares in H [I, I], and each row's error in H, float64 [O]."""
    grid = gw.grid
    lay = grid.layout
    if lay.super_block:
        raise ValueError(f"{grid.qtype.name}: super-block scales are not refitted")
    U = level_of(gw.codes, lay.levels)  # [O, I] float32
    d0 = torch.from_numpy(grid.fields["d"]).float()
    V, m0 = (None, None) if lay.sym else (torch.ones_like(U), torch.from_numpy(grid.fields["m"]).float())
    d, m, row_err = refit_affine(W, U, V, H, d0, m0, _fp16)
    fields = {"d": d.to(torch.float16).numpy()} | ({} if m is None else {"m": m.to(torch.float16).numpy()})
    s, b = d.float(), torch.zeros(d.shape) if m is None else m.float()
    return GridWeight(replace(grid, s=s, b=b, fields=fields), gw.codes), row_err


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)
