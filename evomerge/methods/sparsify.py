"""Sparsification of one task vector δ over the whole tensor, as mergekit 0.1.5 defines it.

Top-k uses an exact k-th-value threshold (O(n) selection, `fast.top_k_mask`) instead of argsort
(O(n log n)); ties at the threshold are broken by position so exactly k entries survive.
"""
from __future__ import annotations

import torch

from .fast import top_k_mask


def rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str | None, density: float, eps: float = 1e-7) -> torch.Tensor:
    """Scale the kept part back up: mergekit's ‖δ‖₁/‖kept‖₁ ('l1') or the DARE paper's 1/density."""
    if mode is None:
        return kept
    if mode == "inverse_density":
        return kept.mul_(1.0 / density)
    before = delta.abs().sum(dtype=torch.float32)
    after = kept.abs().sum(dtype=torch.float32)
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


def magnitude(delta: torch.Tensor, density: float, rescale_mode: str | None = None, **_: object) -> torch.Tensor:
    """TIES trim: keep the top int(density·numel) entries by |δ|."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor with {delta.numel()} elements")
    kept = delta * top_k_mask(delta.abs(), k)
    return rescale(delta, kept, rescale_mode, density)


def magnitude_outliers(delta: torch.Tensor, density: float, rescale_mode: str | None = None, gamma: float = 0.01, **_: object) -> torch.Tensor:
    """Model breadcrumbs: drop the top int(gamma·n) outliers and the smallest entries so `density` remains."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = n - target - n_top
    if n_bottom < 0:
        n_top, n_bottom = n - target, 0
    absval = delta.abs()
    # keep ranks [n_bottom, n - n_top) in ascending |δ|: the top (n - n_bottom) minus the top n_top
    keep = top_k_mask(absval, n - n_bottom) & ~top_k_mask(absval, n_top)
    kept = delta * keep
    return rescale(delta, kept, rescale_mode, density)


def rank_magnitude(delta: torch.Tensor, density: float, rescale_mode: str | None = None, epsilon: float = 0.15, generator: torch.Generator | None = None, **_: object) -> torch.Tensor:
    """DELLA: per row, keep probability rises linearly with |δ| rank from density−ε to density+ε."""
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(torch.float32)  # 0 = smallest
    span = max(width - 1, 1)
    prob = (density - epsilon) + ranks * (2 * epsilon / span)
    keep = torch.rand(prob.shape, generator=generator, device=delta.device) < prob
    kept = (rows * keep).view(delta.shape)
    return rescale(delta, kept, rescale_mode, density)


SPARSIFIERS = {
    "magnitude": magnitude,
    "magnitude_outliers": magnitude_outliers,
    "rank_magnitude": rank_magnitude,
}
