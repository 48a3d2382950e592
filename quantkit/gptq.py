"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", 2022), Algorithm 1 with lazy batch updates, on quantkit's min-max grid.

Names follow the paper and IST-DASLab's gptq.py: H (input Hessian 2XXᵀ), Hinv (upper Cholesky factor of
H⁻¹), W1/Err1 (the current block and its scaled errors), percdamp, blocksize, actorder. Rounding is done
by ``primitives.quantize`` only, so with H = I (no act-order) GPTQ is exactly RTN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import QuantkitError
from .primitives import QuantizedWeight, QuantSpec, dequantize, quantize
from .scale_search import ScaleSearch, choose_group_params


class Hessian:
    """Accumulates H = (2/n) Σ x xᵀ over the rows x [.., I] of a linear's inputs, in fp32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # [rows, I]
        m = x.shape[0]
        # H <- H * n/(n+m) + (2/(n+m)) xᵀx, in one fused call
        self.H.addmm_(x.T, x, beta=self.n / (self.n + m), alpha=2.0 / (self.n + m))
        self.n += m


@dataclass(frozen=True)
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # Σ (w - q)² / (2 d²), the paper's objective
    damp: float  # the damping fraction that made H positive definite


def _inverse_factor(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = percdamp · mean(diag H); retries with more damping."""
    mean_diag = torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    damp = percdamp
    while damp < 1.0:
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Linv = torch.linalg.solve_triangular(L, torch.eye(len(L), device=L.device), upper=False)
            Hinv = Linv.T @ Linv  # (L Lᵀ)⁻¹; faster than cholesky_inverse on CPU
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U, damp
        damp = damp * 2 if damp >= 0.01 else damp + 0.01
    raise QuantkitError("GPTQ: the Hessian is not positive definite even with damping 1.0 (are the inputs NaN?)")


def _group_params(W: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype, search=None, h=None):
    """Static per-group (scale, zero) of W [O, I] computed before any update: [O, G] each."""
    return choose_group_params(W, spec, scale_dtype, search, h)


def _importance(search: ScaleSearch | None, H: torch.Tensor, c1: int, c2: int, g: int) -> torch.Tensor | None:
    """The scale search's weights for columns c1:c2 (None without a search)."""
    return None if search is None else search.importance(H, slice(c1, c2), g)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    search: ScaleSearch | None = None,
    grid: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> GPTQResult:
    """Quantize W [O, I] against the input Hessian H [I, I]. With ``actorder`` columns are processed in
    order of decreasing diag(H) and group parameters are static (computed from the unmodified W), so the
    result stays a plain per-group grid (g_idx = i // g)."""
    W = W.detach().to(H.device, torch.float32).clone()
    H = H.clone()
    o, n = W.shape
    g = n if spec.group_size == -1 else spec.group_size
    blocksize = max(blocksize, g) if g < n else blocksize  # a group never straddles two blocks

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = actorder or spec.group_size == -1 or grid is not None  # grid: fixed (scale, zero) [O, G]
    if static:
        h = _importance(search, H, 0, n, g)
        scale_all, zero_all = grid if grid is not None else _group_params(W, spec, scale_dtype, search, h)
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = _inverse_factor(H, percdamp)

    codes = torch.zeros(o, n, dtype=torch.int8, device=W.device)
    scales, zeros = [], []
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for t in range(i2 - i1):
            c = i1 + t
            if static:
                grp = int(perm[c]) // g
                scale, zero = (
                    scale_all[:, grp : grp + 1],
                    None if zero_all is None else zero_all[:, grp : grp + 1],
                )
            elif c % g == 0:  # parameters from the error-updated columns of this group
                h = _importance(search, H, c, c + g, g)  # H is permuted like W; identity order here
                scale, zero = choose_group_params(W1[:, t : t + g], spec, scale_dtype, search, h)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, t : t + 1]  # [O, 1]
            q = quantize(w, scale, zero, spec)
            codes[:, c : c + 1] = q
            dq = dequantize(q, scale, zero)
            d = Hinv1[t, t]
            err = (w - dq) / d
            loss += ((w - dq) ** 2).sum() / (2 * d * d)
            W1[:, t:] -= err @ Hinv1[t : t + 1, t:]
            Err1[:, t : t + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes = codes[:, invperm]
    if static:
        scale, zero = scale_all, zero_all
    else:
        scale = torch.cat(scales, dim=1)
        zero = None if spec.sym else torch.cat(zeros, dim=1)
    return GPTQResult(
        QuantizedWeight(codes.cpu(), scale.cpu(), None if zero is None else zero.cpu(), spec),
        float(loss),
        damp,
    )


def output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Relative output error ‖XWᵀ − XŴᵀ‖² / ‖XWᵀ‖² computed from H ∝ XᵀX (both [O, I] weights)."""
    W = W.to(H.device, torch.float32)
    D = W - Wq.to(H.device, torch.float32)
    num = ((D @ H) * D).sum()  # tr(D H Dᵀ)
    den = ((W @ H) * W).sum()
    return float(num / den) if den > 0 else 0.0
