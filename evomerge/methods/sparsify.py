"""Sparsification of one task vector δ over the whole tensor, as mergekit 0.1.5 defines it: the reference
implementations (the fused kernels in `fused` compute the same keep rules in one pass) and the shared
arithmetic (how many entries to keep, the rescale factor).

Top-k uses an exact k-th-value threshold (O(n) selection, `fast.top_k_mask`) instead of argsort
(O(n log n)); ties at the threshold are broken by position so exactly k entries survive.
"""

from __future__ import annotations

import torch

from .fast import top_k_mask


def rescale_factor(
    kept: torch.Tensor | None,
    l1_before: float,
    mode: str | None,
    density: float,
    eps: float = 1e-7,
    after: float | None = None,
) -> float:
    """How much to scale the kept part back up: mergekit's ‖δ‖₁/‖kept‖₁ ('l1') or the DARE paper's 1/density.
    ‖kept‖₁ is summed from `kept` unless given as `after`."""
    if mode is None:
        return 1.0
    if mode == "inverse_density":
        return 1.0 / density
    if after is None:
        after = float(kept.abs().sum(dtype=torch.float64))
    if l1_before < eps or after < eps:
        return 1.0
    return l1_before / after


def rescale(delta: torch.Tensor, kept: torch.Tensor, mode: str | None, density: float) -> torch.Tensor:
    if mode is None:
        return kept
    return kept.mul_(rescale_factor(kept, float(delta.abs().sum(dtype=torch.float64)), mode, density))


def magnitude_k(n: int, density: float) -> int:
    """TIES keeps int(density·n) entries, and at least one when density > 0 (mergekit 0.1.5)."""
    return max(1, int(density * n)) if density > 0 and n > 0 else 0


def breadcrumbs_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(keep the top this many, then drop the top this many outliers) so `density` of n remains."""
    target, n_top = int(density * n), int(gamma * n)
    n_bottom = n - target - n_top
    if n_bottom < 0:
        n_top, n_bottom = n - target, 0
    return n - n_bottom, n_top


def magnitude(delta: torch.Tensor, density: float, rescale_mode: str | None = None, **_: object) -> torch.Tensor:
    """TIES trim: keep the top int(density·numel) entries by |δ|."""
    if density >= 1:
        return delta
    kept = delta * top_k_mask(delta.abs(), magnitude_k(delta.numel(), density))
    return rescale(delta, kept, rescale_mode, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, rescale_mode: str | None = None, gamma: float = 0.01, **_: object
) -> torch.Tensor:
    """Model breadcrumbs: drop the top int(gamma·n) outliers and the smallest entries so `density` remains."""
    if density >= 1:
        return delta
    keep_top, drop_top = breadcrumbs_window(delta.numel(), density, gamma)
    absval = delta.abs()
    keep = top_k_mask(absval, keep_top) & ~top_k_mask(absval, drop_top)
    kept = delta * keep
    return rescale(delta, kept, rescale_mode, density)
