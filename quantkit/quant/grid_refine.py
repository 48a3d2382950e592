"""GPTQ with refitted group scales: solve the codes, refit each row's group scales to those codes by least
squares in the calibration metric, and solve the codes again on that fixed grid.

For one row w [I] with codes c (zero point removed) the dequantized row is A s, A [I, G] holding c_j in the
column of j's group, so the output error (w − A s)ᵀ H (w − A s) is minimised by s = (AᵀHA)⁻¹ AᵀHw: a G x G
system per row, solved for all rows at once. The grid keeps its form (one scale per group; zero points are
kept); the pass with the lowest output error is returned, so refitting never makes a linear worse.
"""

from __future__ import annotations

import torch

from quantkit.quant.descent import refit_affine
from quantkit.quant.gptq import GPTQResult, gptq_quantize, output_error
from quantkit.quant.primitives import QuantSpec
from quantkit.quant.scale_search import ScaleSearch


def refit_scales(
    W: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, H: torch.Tensor
) -> torch.Tensor:
    """Least-squares group scales for fixed codes. W, codes [O, I], scale/zero [O, G], H [I, I] -> scale [O, G]
    in scale's dtype (rows whose system is singular or whose fit is no better keep the old scales, and so does
    a non-positive scale): ``descent.refit_affine`` with the codes less their zero points as the levels."""
    g = W.shape[1] // scale.shape[1]
    c = codes.double()
    if zero is not None:
        c = c - zero.double().repeat_interleave(g, dim=1)
    G = scale.shape[1]  # conjugate gradients to convergence: the refit is the least-squares solution itself
    s, _, _ = refit_affine(W, c, None, H, scale, None, lambda t: t.to(scale.dtype).double(), iters=4 * G)
    s = s.to(scale.device)
    return torch.where(s > 0, s, scale.double()).to(scale.dtype)


def gptq_refined(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype = torch.float32,
    blocksize: int = 128,
    percdamp: float = 0.01,
    actorder: bool = False,
    search: ScaleSearch | None = None,
    iters: int = 0,
) -> GPTQResult:
    """``gptq_quantize``, then ``iters`` rounds of (refit scales, GPTQ on that grid); the best pass wins."""
    best = gptq_quantize(W, H, spec, scale_dtype, blocksize, percdamp, actorder, search=search)
    if iters == 0:
        return best
    Wf = W.to(H.device, torch.float32)
    best_err = output_error(Wf, best.weight.dequantize(), H)
    res = best
    for _ in range(iters):
        qw = res.weight
        scale = refit_scales(Wf, qw.codes, qw.scale, qw.zero, H.to(Wf.device))
        res = gptq_quantize(W, H, spec, scale_dtype, blocksize, percdamp, actorder, fixed=(scale, qw.zero))
        err = output_error(Wf, res.weight.dequantize(), H)
        if err < best_err:
            best, best_err = res, err
    return best
