"""The GPTQ algorithm (Frantar et al. 2022) for one linear layer, as AutoGPTQ runs it.

`HessianAccumulator` collects H = 2/n * sum_s X_s X_s^T from a layer's inputs (AutoGPTQ `add_batch`, n counting
sequences); `gptq_quantize` quantizes the weight column by column, spreading each column's rounding error
over the columns not yet quantized through the Cholesky factor of H^-1 (AutoGPTQ `fasterquant`, blocksize
128, damp = damp_percent * mean(diag H), optional act-order, groups found as they are reached). Written here
because AutoGPTQ/gptqmodel need CUDA extensions; the math follows their code line by line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class HessianAccumulator:
    def __init__(self, columns: int, device):
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.nsamples = 0

    def add(self, inp: torch.Tensor) -> None:
        """inp [B, T, K] (or [T, K]): one batch of a layer's inputs."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().float()  # [K, B*T]
        self.H *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        x = math.sqrt(2 / self.nsamples) * x
        self.H += x @ x.t()


def _find_params(w: torch.Tensor, bits: int, sym: bool):
    """Per-row scale and zero for w [N, cols] (AutoGPTQ Quantizer.find_params, weight=True)."""
    maxq = 2 ** bits - 1
    xmin = torch.minimum(w.min(dim=1).values, torch.zeros(1, device=w.device))
    xmax = torch.maximum(w.max(dim=1).values, torch.zeros(1, device=w.device))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def _quantize(w, scale, zero, maxq):
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # int32 [N, K] integers in [0, 2^bits)
    scales: torch.Tensor  # fp32 [G, N]
    zeros: torch.Tensor  # int32 [G, N] (true zero points, not zero-1)
    g_idx: torch.Tensor  # int32 [K]

    def dequantize(self) -> torch.Tensor:
        """W [N, K] as the quantized layer computes it."""
        g = self.g_idx.long()
        return (self.scales[g].t() * (self.q - self.zeros[g].t()).float())


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid as GPTQ: the baseline GPTQ must beat."""
    W = weight.float()
    N, K = W.shape
    g = group_size if group_size > 0 else K
    Q = torch.zeros_like(W, dtype=torch.int32)
    scales, zeros = [], []
    for start in range(0, K, g):
        scale, zero = _find_params(W[:, start:start + g], bits, sym)
        Q[:, start:start + g] = _quantize(W[:, start:start + g], scale[:, None], zero[:, None], 2 ** bits - 1).int()
        scales.append(scale)
        zeros.append(zero)
    g_idx = (torch.arange(K, device=W.device) // g).int()
    return QuantizedWeight(Q, torch.stack(scales), torch.stack(zeros).int(), g_idx)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                  act_order: bool = False, sym: bool = True, blocksize: int = 128) -> QuantizedWeight:
    """Quantize weight [N, K] given the Hessian H [K, K] of its inputs. H is modified."""
    W = weight.float().clone()
    N, K = W.shape
    maxq = 2 ** bits - 1
    g = group_size if group_size > 0 else K
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H[range(K), range(K)] += damp * torch.mean(torch.diag(H))
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise RuntimeError("GPTQ: the Hessian is not positive definite even after damping; "
                           "use more calibration data or a larger damp") from None
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    scale = zero = None
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # as AutoGPTQ: from W, which holds the updates of all earlier blocks
                scale, zero = _find_params(W[:, col:col + g], bits, sym)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = _quantize(w, scale, zero, maxq)
            Q1[:, i] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(K, device=W.device) // g
    if perm is not None:
        invperm = torch.argsort(perm)
        Q, g_idx = Q[:, invperm], g_idx[invperm]
    return QuantizedWeight(Q.int(), torch.stack(scales), torch.stack(zeros).int(), g_idx.int())
