"""Merges that choose, entry by entry, how much of a fine-tune to take, as mergekit 0.1.5 defines them: SCE
(select the entries where the task vectors vary most, weight each task vector by its mean square, erase
minority signs), NearSwap (take the fine-tune where it is within `t` of the base), Arcee Fusion (take it where
its change, times the row's KL divergence from the base, is an outlier) and RAM (entries only one task vector
changes are taken whole, shared ones averaged; RAM+ scales each model's own entries up by how much it shares).

Inputs are task vectors δᵢ = θᵢ − base; each returns the merged change, which the caller adds to the base. Not a
search hot path: plain torch, computed in float32 at least.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import fast


def sce(deltas: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """Keep the `select_topk` fraction of entries with the largest variance across task vectors, elect a sign
    per entry (of the sum), and average the agreeing task vectors weighted by their mean squares."""
    tvs = torch.stack([d.to(fast.work_dtype(d)) for d in deltas])
    if select_topk < 1:
        tvs = tvs * _variance_mask(tvs, select_topk).unsqueeze(0)
    elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    agree = (tvs.sign() == elected).to(tvs.dtype)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = weights.sum().item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights.view(-1, *([1] * (tvs.dim() - 1))) * agree
    return (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


def _variance_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the int(density · nonzero-variance entries) entries of largest variance across task vectors."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def nearswap(t: float, delta: torch.Tensor) -> torch.Tensor:
    """Move from the base to the fine-tune by min(1, t/|δ|) per entry: entries that differ by less than `t` are
    swapped in whole, larger differences only by `t`."""
    d = delta.to(fast.work_dtype(delta))
    return (t / d.abs().clamp(min=1e-6)).clamp(min=0, max=1) * d


def arcee_fusion(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Keep δ where its importance |δ| · KL(softmax(θ) ‖ softmax(base)) (per row) reaches median + 1.5·IQR of
    all importances (quantiles from at most 10⁶ entries, sampled as mergekit samples them)."""
    b, d = base.to(fast.work_dtype(base)), delta.to(fast.work_dtype(delta))
    params = b + d
    p = torch.softmax(params, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    importance = d.abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 1_000_000:
        flat = flat[torch.randint(flat.numel(), (1_000_000,), device=flat.device)]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    return d * (importance >= median + 1.5 * (q3 - q1)).to(d.dtype)


def ram(
    deltas: Sequence[torch.Tensor], epsilon: float = 1e-5, r: float | None = None, alpha: float = 0.2
) -> torch.Tensor:
    """Reinforced Agent Merging: an entry that only one task vector changes (|δ| > epsilon) takes that change
    whole, one that several change takes their mean. With `r` (RAM+, tensor-local), each task vector's unique
    entries are scaled by 1 + r·min(alpha, shared/unique), its counts of shared and unique entries."""
    tv = torch.stack([d.to(fast.work_dtype(d)).reshape(-1) for d in deltas])
    changed = tv.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    kept = tv * changed
    own = kept * unique
    if r is not None:
        rho = (changed & overlap).sum(dim=1) / (changed & unique).sum(dim=1).to(tv.dtype).clamp(min=epsilon)
        own = own * (1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1)
    return (own + kept * overlap / counts.clamp(min=1)).sum(dim=0).reshape(deltas[0].shape)
