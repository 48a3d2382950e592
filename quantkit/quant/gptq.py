"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022), Algorithm 1 with lazy batch updates.

Names follow the paper and IST-DASLab's gptq.py where they can: H (input Hessian 2XXᵀ), percdamp, blocksize,
actorder. The paper feeds each column's error forward with U, the upper Cholesky factor of H⁻¹; this module
computes the same codes from R = U⁻¹, the upper triangular factor of H = R Rᵀ, which one Cholesky
factorisation gives without inverting anything (the "LDLQ" form of QuIP, which proves the two equal):

    column k's target  w̃_k = w_k + A_k / R_kk,    A_k = Σ_{j<k} (w_j − q_j) R_jk,
    its scaled error   E_k = (w̃_k − q_k) R_kk = A_k + (w_k − q_k) R_kk,

where w are the original columns and q the chosen ones. GPTQ's push form, w̃_k = w_k − Σ_{j<k} E_j U_jk,
is the same number. With lazy batches, A of a block of columns is one GEMM against the finished
columns' differences w − q, and inside the block each difference is pushed to the later columns' A.

Each column is rounded onto one of three kinds of grid:
    quantkit's per-group integer grid, min-max scales  ``primitives.quantize`` (with H = I and no act-order,
                                                       GPTQ is then exactly RTN)
    the same grid with searched or given scales        ``scale_search`` chooses them (``fixed``: given, as
                                                       the scale refit passes them), ``primitives.quantize``
    a ggml block type's fixed grid                     ``BlockGrid.column_rounder`` (``grid``: GPTQ into GGUF blocks)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.gguf.grids import BlockGrid, GridWeight
from quantkit.quant.hessian import BLOCK, Hessian
from quantkit.quant.primitives import QuantizedWeight, QuantSpec, dequantize, quantize
from quantkit.quant.scale_search import ScaleSearch, choose_group_params


def fp_target(W: torch.Tensor, WD: torch.Tensor, fac: HessianFactor) -> torch.Tensor:
    """The dense weight W* = W + W D Hd⁻¹ [O, I] (fp32, on the factor's device), from WD = ``Drift.times(W)``.

    GPTQ against the unquantized model (GPTQ v2 / GPTAQ): minimise ‖W X_fp − Q X‖² rather than ‖W X − Q X‖²
    (X: the quantized model's inputs, the rows of H; X_fp: the unquantized model's). Its least-squares
    solution is W* = W X_fp Xᵀ (X Xᵀ)⁻¹ = W + W D H⁻¹, and ‖W X_fp − Q X‖² = ‖(W* − Q) X‖² + const, so GPTQ
    of W* against H minimises it. Hd = R Rᵀ in ``perm`` order, so M Hd⁻¹ is two triangular solves. W* = W
    exactly when D = 0. Taking W D rather than D lets the caller free D [I, I] before H is factored."""
    W = W.to(fac.R.device, torch.float32)
    M = WD.to(W.device)[:, fac.perm]  # [O, I] in perm order
    M = torch.linalg.solve_triangular(fac.R.T, M, upper=False, left=False)  # M R⁻ᵀ
    M = torch.linalg.solve_triangular(fac.R, M, upper=True, left=False)  # M R⁻ᵀ R⁻¹ = M Hd⁻¹
    return W + M[:, torch.argsort(fac.perm)]


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight | GridWeight  # or a CodebookWeight (quant.ldlq)
    loss: float  # Σ (w - q)² / (2 d²), the paper's objective
    damp: float  # the damping fraction that made H positive definite
    row_sq_output_err: torch.Tensor  # float64 [O]: (D H Dᵀ)_rr with D = W - Q and the undamped H, free from the solver

    @property
    def sq_output_err(self) -> float:
        """tr(D H Dᵀ): the output error."""
        return float(self.row_sq_output_err.sum())


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ needs from one Hessian, shared by every linear that reads the same input (q/k/v, gate/up).

    R [I, I] is upper triangular with Hd = R Rᵀ (Hd = H + λI, in ``perm`` order: columns by decreasing
    diag(H) with act-order, else the identity); R = U⁻¹ for U the paper's upper Cholesky factor of Hd⁻¹.
    ``dead`` marks inputs that were always zero (diag H = 0, set to 1)."""

    R: torch.Tensor
    perm: torch.Tensor
    dead: torch.Tensor
    damp: float  # the fraction of mean(diag H) that made H positive definite
    lam: float  # λ = damp · mean(diag H)
    actorder: bool


def factor_hessian(hess: Hessian, percdamp: float = 0.01, actorder: bool = False, group: int = 1) -> HessianFactor:
    """The ``HessianFactor`` of ``hess.H`` [I, I], which is taken from ``hess`` (set to None) and whose
    storage is reused: at most two I x I buffers are alive at any time. With act-order and ``group`` > 1,
    runs of ``group`` consecutive columns keep their order and move together, by decreasing sum of diag(H)
    (the codebook types choose ``group`` columns jointly: ``quantkit.quant.ldlq``).

    With J the reversal permutation and J Hd J = L Lᵀ (lower Cholesky), R = J L J is upper triangular and
    R Rᵀ = J L Lᵀ J = Hd. Damping grows until the factorisation succeeds."""
    H, hess.H = hess.H, None
    n = H.shape[0]
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    perm = _act_order(diag, group) if actorder else torch.arange(n, device=H.device)
    if actorder:
        H = H[perm]
        H = H[:, perm]
    base = H.diagonal().flip(0)  # a copy
    mean_diag = base.mean()
    F = torch.flip(H, (0, 1))  # J H J
    del H, diag
    damp = percdamp
    while damp < 1.0:
        F.diagonal().copy_(base + damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(F)
        if int(info) == 0:
            del F
            R = torch.flip(L, (0, 1))
            del L
            return HessianFactor(R, perm, dead, damp, float(damp * mean_diag), actorder)
        del L
        damp = damp * 2 if damp >= 0.01 else damp + 0.01
    raise QuantkitError("GPTQ: the Hessian is not positive definite even with damping 1.0 (are the inputs NaN?)")


def _act_order(diag: torch.Tensor, group: int) -> torch.Tensor:
    """Columns by decreasing diag(H), runs of ``group`` columns as one (their sum), in order inside."""
    if group == 1:
        return torch.argsort(diag, descending=True)
    runs = torch.argsort(diag.reshape(-1, group).sum(1), descending=True)  # [I / group]
    return (runs[:, None] * group + torch.arange(group, device=diag.device)).reshape(-1)


def pulled(R: torch.Tensor, Dt: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
    """A [i2 - i1, O] = Σ_{j<i1} (w_j − q_j) R_jk for the block's columns k: the finished columns' part of their
    targets, one GEMM (Dt [I, O]: rows below i1 hold the differences w − q)."""
    if i1 == 0:
        return torch.zeros(i2, Dt.shape[1], dtype=Dt.dtype, device=Dt.device)
    return R[:i1, i1:i2].T @ Dt[:i1]


def _group_importance(importance: torch.Tensor | None, c: int, g: int) -> torch.Tensor | None:
    """The search weights of the group starting at column c: diag [I] -> [g], H blocks [G, g, g] -> [1, g, g]."""
    if importance is None:
        return None
    return importance[c : c + g] if importance.dim() == 1 else importance[c // g : c // g + 1]


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor | HessianFactor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    *,
    grid: BlockGrid | None = None,
    search: ScaleSearch | None = None,
    importance: torch.Tensor | None = None,
    fixed: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> GPTQResult:
    """Quantize W [O, I] against the input Hessian H [I, I] (left unchanged), or against a precomputed
    ``HessianFactor`` of it (then ``percdamp`` and ``actorder`` were decided when it was made). With
    act-order columns are processed in order of decreasing diag(H) and group parameters are static
    (computed from the unmodified W), so the result stays a plain per-group grid (g_idx = i // g).
    With ``grid`` (a ggml type's fixed grid, chosen beforehand from the original W) every column is rounded
    onto its group's (s, b) instead and the result holds codes for that grid (``spec`` is not used).
    ``search``: group scales by an importance-weighted search instead of min-max, weighted by ``importance``
    (``search.importance`` of H over all columns in natural order; taken from H when H is given).
    ``fixed``: use these (scale, zero) [O, G] as a static grid."""
    n_in = W.shape[1]
    g_spec = n_in if spec.group_size == -1 else spec.group_size
    if isinstance(H, torch.Tensor) and search is not None and importance is None:
        importance = search.importance(H, slice(0, n_in), g_spec)
    if isinstance(H, torch.Tensor):
        hess = Hessian(H.shape[0], H.device)
        hess.H = H.to(torch.float32).clone()
        H = factor_hessian(hess, percdamp, actorder)
    fac = H
    actorder = fac.actorder
    dev = fac.R.device
    W = W.detach().to(dev, torch.float32, copy=True)
    W[:, fac.dead] = 0.0  # [O, I], the weight GPTQ approximates (dead inputs zeroed)
    o, n = W.shape
    if grid is not None:
        g = grid.layout.g
        grid_dev = grid.to(dev)  # the loop's copy; the result keeps ``grid`` itself
    else:
        g = n if spec.group_size == -1 else spec.group_size
    blocksize = max(blocksize, g) if g < n else blocksize  # a group never straddles two blocks

    static = actorder or grid is not None or fixed is not None or spec.group_size == -1
    if static and grid is None:
        # [O, G], from the unmodified W
        scale_all, zero_all = fixed or choose_group_params(W, spec, scale_dtype, search, importance)
    perm, R = fac.perm, fac.R
    group_of = (perm // g).tolist()  # column c's group, read once (no device sync per column)
    r_diag = R.diagonal().tolist()
    # Wt [I, O]: W transposed, in perm order, so that a column is a contiguous row (on CPU the per-column
    # steps read O consecutive floats, not O cache lines, and the updates are BLAS calls on contiguous rows).
    # Each column's row is overwritten by its difference w − q once chosen: Wt ends as (W − Q)ᵀ.
    Wt = (W[:, perm] if actorder else W).T.contiguous()
    del W
    codes_t = torch.zeros(n, o, dtype=torch.int8, device=dev)  # [I, O], perm order
    scales, zeros = [], []
    sq_err = torch.zeros(o, dtype=torch.float64, device=dev)  # ‖E‖² per row, E the scaled errors
    if static and grid is None:
        scale_t = scale_all.T.contiguous()  # [G, O]
        zero_t = None if zero_all is None else zero_all.T.contiguous()
    round_column = grid_dev.column_rounder() if grid is not None else None
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        A = pulled(R, Wt, i1, i2)
        Err1t = torch.empty_like(A)
        R1 = R[i1:i2, i1:i2]
        for t in range(i2 - i1):
            c = i1 + t
            w = torch.add(Wt[c], A[t], alpha=1.0 / r_diag[c])  # the target w̃_c [O]
            if round_column is not None:
                q, dq = round_column(w, group_of[c])
            else:
                if static:
                    grp = group_of[c]
                    scale = scale_t[grp].unsqueeze(1)
                    zero = None if zero_t is None else zero_t[grp].unsqueeze(1)
                elif c % g == 0:  # parameters from this group's targets (natural order)
                    h = _group_importance(importance, c, g)
                    cols = Wt[c : c + g] + A[t : t + g] / R.diagonal()[c : c + g, None]  # [g, O]
                    scale, zero = choose_group_params(cols.T, spec, scale_dtype, search, h)
                    scales.append(scale)
                    zeros.append(zero)
                q = quantize(w[:, None], scale, zero, spec)
                dq = dequantize(q, scale, zero).view(-1)
            codes_t[c] = q.view(-1)
            torch.mul(w.sub_(dq), r_diag[c], out=Err1t[t])  # E_c = (w̃_c − q_c) R_cc
            A[t + 1 :].addr_(R1[t, t + 1 :], Wt[c].sub_(dq))  # w_c − q_c, pushed to the block's later columns
        sq_err += Err1t.double().square_().sum(0)

    codes = codes_t[torch.argsort(perm)].T.contiguous()  # [O, I], natural order
    if grid is not None:
        qw = GridWeight(grid, codes.cpu())
    else:
        if static:
            scale, zero = scale_all, zero_all
        else:
            scale = torch.cat(scales, dim=1)
            zero = None if spec.sym else torch.cat(zeros, dim=1)
        qw = QuantizedWeight(codes.cpu(), scale.cpu(), None if zero is None else zero.cpu(), spec)
    return gptq_result(qw, Wt, sq_err, fac)


def gptq_result(qw, Dt: torch.Tensor, sq_err: torch.Tensor, fac: HessianFactor) -> GPTQResult:
    """The result of quantizing W to ``qw``, from the solver's differences Dt = (W − Q)ᵀ [I, O] in perm order
    and ‖E‖² per row (E the scaled errors, float64 [O]).

    E = D R exactly, and R⁻¹ Hd R⁻ᵀ = I, so tr(D Hd Dᵀ) = ‖E‖²; Hd = H + λI, plus 1 on dead inputs' diagonal:
    the output error against the undamped H is ‖E‖² less those, row by row."""
    sq = torch.zeros_like(sq_err)  # Σ_c D_rc², in fp64 a block of columns at a time
    for part in Dt.split(1024):
        sq += part.double().square_().sum(0)
    dead = Dt[fac.dead[fac.perm]].double().square_().sum(0)
    rows = (sq_err - fac.lam * sq - dead).clamp_min_(0.0)
    return GPTQResult(qw, float(sq_err.sum()) / 2, fac.damp, rows.cpu())


def weighted_norms(Ws: list[torch.Tensor], H: torch.Tensor, rows: int = 2048) -> list[float]:
    """tr(W H Wᵀ) for each W [O, I] against a symmetric H [I, I], row block by row block (bounded
    temporaries), from H's upper triangle: per column block a, W_a H_aa W_aᵀ once and W_a H_a,>a W_>aᵀ
    twice (half a full product's FLOPs)."""
    out, n = [], H.shape[0]
    for W in Ws:
        total = 0.0
        for r in range(0, W.shape[0], rows):
            Wb = W[r : r + rows].to(H.device, torch.float32)
            for a in range(0, n, BLOCK):
                P = Wb[:, a : a + BLOCK] @ H[a : a + BLOCK, a:]  # [rows, n − a]
                P[:, BLOCK:] *= 2.0
                total += float((P.mul_(Wb[:, a:])).sum(dtype=torch.float64))
        out.append(total)
    return out


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² computed from H ∝ XᵀX (both [O, I] weights)."""
    W = W.to(H.device, torch.float32)
    num, den = weighted_norms([W - Wq.to(H.device, torch.float32), W], H)
    return num / den if den > 0 else 0.0
