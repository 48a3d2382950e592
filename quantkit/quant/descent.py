"""After GPTQ: descend the same quadratic, coordinate by coordinate, on the same fixed grid.

GPTQ rounds each column once, in order, against a target that only the earlier columns have moved. Its result
is not a minimum of the layer's error (W − Q) H (W − Q)ᵀ over the grid: a column rounded early would now
round elsewhere, given where the later ones went. Two steps lower that error further and keep every value
on the grid (on the 270M each alone moved WikiText's KLD by 3 % at most, the two together by 5-8 %):

- **Codes** (``coordinate_descent``): each column in turn re-rounded to the value that minimises the error
  with every other column held, w_j + (P_j − H_jj e_j) / H_jj with E = W − Q and P = H Eᵀ, rounded onto the
  column's own group (s, b). One sweep costs one to one and a half GPTQ passes (O·I²).
- **Block scales** (``refit_affine``): with the codes fixed, a row's values are linear in its blocks' stored
  floats, value_j = d u_j (+ m), so the best fp16 d (and m, for Q4_1 / Q5_1) per block solve a least-squares
  problem in H, u the code's level (conjugate gradients, all rows at once). Types with 256-weight super-blocks
  (K types, IQ4_XS) keep theirs: refitting their d (times the fixed sub-block scales) was measured on the
  270M and moved KLD from WikiText to French (q3_k_m 0.0671 / 0.0831 -> 0.0695 / 0.0804, iq4_xs 0.0613 /
  0.0645 -> 0.0628 / 0.0611), no gain in the worst domain.

Both only ever lower the error in the metric they are given (a row keeps its scales when the fp16-rounded
fit would not), so the grid, the bytes' form and the dequantizers stay exactly as GPTQ's; only better
points on them are taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from quantkit.formats.gguf.codebook_grid import CodebookGrid
from quantkit.formats.gguf.grid_search import level_of
from quantkit.formats.gguf.grids import BlockGrid, GridWeight
from quantkit.quant.gptq import GPTQResult
from quantkit.quant.hessian import shrink_offdiagonal
from quantkit.quant.recipes import LEVEL_TABLE_TYPES

REFIT_ITERS = 2  # conjugate-gradient iterations of the block-scale refit, each one product with H: on 640- and
# 2048-wide Q4_0 weights two leave the error within 3e-5 of the exact solution's (four: 1e-8), less than the fp16
# rounding of d moves it


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
    iters: int = REFIT_ITERS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Least-squares block floats for fixed codes: W, U (and V) [O, I], H [I, I], the current d0 (and m0)
    [O, G] with value_j = d u_j (+ m v_j) in each of a row's G blocks -> d (and m) [O, G], float64, as
    ``stored`` rounds them (e.g. to fp16), and each row's error (w − value)ᵀ H (w − value) with them [O]. A
    row keeps d0, m0 unless the stored fit lowers that error.

    Every row's normal equations AᵀHA Δ = AᵀH e (e = w − A p0) are solved together by conjugate gradients,
    preconditioned by the diagonal blocks u_bᵀ H_bb u_b. An iteration is one product (A x) H of the whole
    weight, [O, I] @ [I, I]: forming AᵀHA itself costs as many multiplications at an inner dimension of
    one block (32), which ran 45x slower on a 9B down_proj. At most ``iters`` iterations (G of them give the
    exact solution in exact arithmetic); they stop once every row's residual is negligible."""
    o, i = W.shape
    G = d0.shape[1]
    g = i // G
    dev = H.device
    Hf = H.to(torch.float32)
    basis = [U.to(dev, torch.float32)] + ([] if V is None else [V.to(dev, torch.float32)])  # K x [O, I]

    def spread(x: torch.Tensor) -> torch.Tensor:  # [O, K·G] block floats -> A x [O, I]
        xs = x.to(torch.float32).view(o, len(basis), G, 1)
        return sum((b.view(o, G, g) * xs[:, k]).view(o, i) for k, b in enumerate(basis))

    def gather(y: torch.Tensor) -> torch.Tensor:  # [O, I] -> Aᵀ y [O, K·G], float64
        return torch.cat([(b * y).view(o, G, g).sum(-1, dtype=torch.float64) for b in basis], 1)

    p0 = (d0[:, None] if V is None else torch.stack([d0, m0], 1)).to(dev, torch.float64).reshape(o, -1)
    E = W.to(dev, torch.float32) - spread(p0)
    EH = E @ Hf
    rhs, e0 = gather(EH), (EH * E).sum(1, dtype=torch.float64)  # AᵀH e, e H eᵀ
    del EH
    Hbb = Hf.view(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g]: H's diagonal blocks
    pre = torch.cat([_block_quadratic(b.view(o, G, g), Hbb) for b in basis], 1).clamp_min(1e-30)  # [O, K·G]
    delta, r = torch.zeros_like(rhs), rhs.clone()
    z = r / pre
    q, rz = z.clone(), (r * z).sum(1)
    tol = 1e-24 * rz.abs().clamp_min(1e-300)
    for _ in range(iters):
        Mq = gather(spread(q) @ Hf)
        step = rz / (q * Mq).sum(1).clamp_min(1e-300)  # [O]
        delta += step[:, None] * q
        r -= step[:, None] * Mq
        z = r / pre
        rz_new = (r * z).sum(1)
        if bool((rz_new.abs() <= tol).all()):
            break
        q = z + (rz_new / rz.clamp_min(1e-300))[:, None] * q
        rz = rz_new
    p = stored(p0 + delta)
    dp = (p - p0).nan_to_num()
    e_new = e0 - 2 * (dp * rhs).sum(1) + (dp * gather(spread(dp) @ Hf)).sum(1)  # the stored floats' error
    better = torch.isfinite(p).all(1) & (e_new < e0)
    out = torch.where(better[:, None], p, p0).cpu().view(o, len(basis), G)
    row_err = torch.where(better, e_new, e0).clamp_min(0.0).cpu()
    return out[:, 0], (None if V is None else out[:, 1]), row_err


def _block_quadratic(u: torch.Tensor, Hbb: torch.Tensor) -> torch.Tensor:
    """u_bᵀ H_bb u_b for every row and block: u [O, G, g], Hbb [G, g, g] -> [O, G] float64."""
    ut = u.transpose(0, 1)  # [G, O, g]
    return ((ut @ Hbb) * ut).sum(-1, dtype=torch.float64).T


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


def descends(grid: BlockGrid | CodebookGrid | None) -> bool:
    """Whether GPTQ's codes on ``grid`` go on to the descent (``descent_sweeps``): uniform scalar grids. Level
    tables (IQ4_NL / IQ4_XS) keep GPTQ's: there it tied in the worst held-out domain (quant/recipes.py), and
    codebook slabs are LDLQ's."""
    return type(grid) is BlockGrid and grid.qtype not in LEVEL_TABLE_TYPES


@dataclass(frozen=True)
class GPTQMetric:
    """GPTQ's own metric Hm = (1 − s) H + s diag(H) + λ I (``hessian_shrink`` s, damping λ), in which the
    descent after GPTQ goes on."""

    Hm: torch.Tensor  # [I, I]
    lam: float

    @staticmethod
    def of(H: torch.Tensor, shrink: float, lam: float) -> GPTQMetric:
        """From a copy of H [I, I], made into Hm in place."""
        shrink_offdiagonal(H, shrink)
        H.diagonal().add_(lam)
        return GPTQMetric(H, lam)

    def descend(self, w: torch.Tensor, res: GPTQResult, sweeps: int) -> GPTQResult:
        """GPTQ's result for the target w [O, I], its codes descended and its block scales (single-scale types)
        refitted in Hm; the row errors, like GPTQ's, in Hm without the damping: e Hm eᵀ − λ ‖e‖²."""
        w = w.to(self.Hm.device, torch.float32)
        gw, in_m = coordinate_descent(w, res.weight, self.Hm, sweeps)  # in_m [O]: e Hm eᵀ
        if not gw.grid.layout.super_block:
            gw, in_m = refit_block_scales(w, gw, self.Hm)
        sq = (w.cpu() - gw.dequantize()).square_().sum(1, dtype=torch.float64)
        return replace(res, weight=gw, row_sq_output_err=(in_m - self.lam * sq).clamp_min(0.0))
