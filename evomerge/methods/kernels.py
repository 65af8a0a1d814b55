"""Pure tensor kernels. Each takes task vectors δᵢ = θᵢ − θ_base (the form the engine keeps resident)
and writes base + merged change into `out` when one is given, so a search can reuse one target tensor.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from . import fast, fused
from .registry import MethodError, MethodSpec
from .sparsify import rescale_factor


def _finish(base: torch.Tensor, change: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return (base.to(change.dtype) + change).to(base.dtype)
    return torch.add(base, change, out=out)


FUSED_KINDS = {"magnitude": "magnitude", "magnitude_outliers": "window", "random": "random", "rank_magnitude": "rank"}


def task_arithmetic(
    spec: MethodSpec,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    source_params: Sequence[dict[str, Any]],
    global_params: dict[str, Any],
    out: torch.Tensor | None = None,
    seeds: Sequence[int] | None = None,
    tie_order: str = "mergekit",
) -> torch.Tensor:
    """The generalized task-arithmetic family: sparsify each δ, weight, optional sign election, sum — as
    one fused pass (`fused`); plain task arithmetic is a weighted sum. `tie_order`: `Recipe.tie_order`."""
    work = fast.work_dtype(base)
    mode = global_params["rescale_mode"] if global_params["rescale"] else None
    weights = [float(p["weight"]) for p in source_params]
    lam = float(global_params["lambda"])
    normalize = bool(global_params["normalize"])
    out = torch.empty_like(base) if out is None else out
    divisor = sum(weights) if normalize else 1.0
    divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    if spec.sparsification is None:
        return fused.weighted_sum_into(out, base, deltas, [w * lam / divisor for w in weights])
    kind = FUSED_KINDS[spec.sparsification]
    densities = [float(p.get("density", 1.0)) for p in source_params]
    gammas = [float(p.get("gamma", 0.0)) for p in source_params]
    epsilons = [float(p.get("epsilon", 0.0)) for p in source_params]
    fp, ip = fused.source_params(kind, deltas, densities, gammas, seeds or [0] * len(deltas), work, epsilons)
    fixes = None  # (positions, masks) where mergekit's tie order keeps other entries than the rules
    if kind == "rank":
        kinds, ranks = fused.della_inputs(deltas, fp, ip)
    elif kind == "random":
        kinds, ranks = fused.dare_inputs(deltas, ip)
    else:
        kinds, ranks = (kind,) * len(deltas), []
        if tie_order == "mergekit":  # merged by the rules, then again where mergekit keeps other tied entries
            fixes = fused.where_mergekit_keeps_others(kind, deltas, densities, gammas, fp, ip)
    rescaled = [i for i, d in enumerate(densities) if mode is not None and d < 1.0]
    after: dict[int, float] = {}  # ‖δ ⊙ keep‖₁ and ‖δ‖₁: the l1 rescale's only inputs
    whole: dict[int, float] = {}
    if mode == "l1" and rescaled:
        after = {
            i: fused.tabled_kept_l1(kinds[i], deltas[i], fp[i : i + 1], ip[i : i + 1], ranks[i] if ranks else None)
            for i in rescaled
        }
        direct = [i for i in rescaled if after[i] is None]  # no table: one pass over these sources
        if direct:
            kept, norms = fused.kept_and_whole_l1(
                [kinds[i] for i in direct],
                [deltas[i] for i in direct],
                fp[direct],
                ip[direct],
                [ranks[i] for i in direct] if ranks else [],
            )
            after.update(zip(direct, kept))
            whole.update(zip(direct, norms))
    for i, (delta, w, d) in enumerate(zip(deltas, weights, densities)):
        scale = 1.0
        if i in rescaled:
            kept_fraction = int(ip[i, 3]) / (1 << fused.RANDOM_BITS) if kind == "random" else d  # DARE's density grid
            scale = rescale_factor(
                None,
                (whole[i] if i in whole else fast.delta_l1(delta)) if mode == "l1" else 0.0,
                mode,
                kept_fraction,
                after=after.get(i, 0.0),
            )
        fp[i, 2] = w * scale * (1.0 if spec.consensus else lam / divisor)
        fp[i, 3] = w
    fused.merge_into(out, base, deltas, kinds, fp, ip, lam, spec.consensus == "sum", normalize, ranks)
    if fixes is not None:
        fused.merge_at(out, base, deltas, *fixes, fp, ip, lam, spec.consensus == "sum", normalize)
    return out


ZERO_SUM = "linear merge: the weights sum to zero, so they cannot be normalized; change them or set normalize: false"


def linear(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted average of whole models (model soup): Σwθ/Σw."""
    work = fast.work_dtype(tensors[0])
    res = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for t, w in zip(tensors, weights):
        res.add_(t.to(work), alpha=float(w))
    if normalize:
        total = sum(float(w) for w in weights)
        if abs(total) < 1e-12:
            raise MethodError(ZERO_SUM)
        res.div_(total)
    if out is None:
        return res.to(tensors[0].dtype)
    return out.copy_(res)


def linear_deltas(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    out: torch.Tensor | None = None,
    base_weight: float = 0.0,
) -> torch.Tensor:
    """Linear merge of base+δᵢ (and the base itself with `base_weight`) from resident task vectors."""
    total = sum(float(w) for w in weights) + base_weight
    if normalize and abs(total) < 1e-12:
        raise MethodError(ZERO_SUM)
    scale = 1.0 / total if normalize else 1.0
    out = torch.empty_like(base) if out is None else out
    return fused.weighted_sum_into(
        out, base, deltas, [float(w) * scale for w in weights], base_coeff=1.0 if normalize else total
    )


def slerp_coefficients(
    t: float, n0_sq: float, n1_sq: float, dot: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> tuple[float, float]:
    """mergekit's slerp weights (s0, s1) on the un-normalized tensors, from their norms and dot product;
    near-parallel tensors fall back to lerp."""
    n0, n1 = math.sqrt(max(n0_sq, 0.0)), math.sqrt(max(n1_sq, 0.0))
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t
    theta0 = math.acos(max(-1.0, min(1.0, cos)))
    sin0 = math.sin(theta0)
    return math.sin(theta0 - theta0 * t) / sin0, math.sin(theta0 * t) / sin0


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spherical interpolation between whole (flattened) model tensors."""
    g = fast.gram([v0, v1])
    s0, s1 = slerp_coefficients(t, g[0][0], g[1][1], g[0][1])
    out = torch.empty_like(v0) if out is None else out
    return fused.weighted_sum_into(out, v0, [v1], [s1], base_coeff=s0)


def slerp_delta(t: float, base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """slerp(base, base + δ) from the resident task vector: ‖base+δ‖² and ⟨base, base+δ⟩ follow from the
    Gram matrix of (base, δ), and s0·base + s1·(base+δ) = (s0+s1)·base + s1·δ — one pass, no base+δ."""
    base_coeff, s1 = slerp_delta_coefficients(t, fast.cached_gram([base, delta]))
    out = torch.empty_like(base) if out is None else out
    return fused.weighted_sum_into(out, base, [delta], [s1], base_coeff=base_coeff)


def model_stock_coefficients(g: list[list[float]]) -> list[float]:
    """Each task vector's coefficient t/N, from the Gram matrix of the N task vectors (their norms and dots)."""
    n = len(g)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = math.sqrt(max(g[i][i], 0.0)) * math.sqrt(max(g[j][j], 0.0))
            cos.append(max(-1.0, min(1.0, g[i][j] / max(norms, 1e-6))))
    c = sum(cos) / len(cos)
    t = (n * c) / (1 + (n - 1) * c)
    return [t / n] * n


def slerp_delta_coefficients(t: float, g: list[list[float]]) -> tuple[float, float]:
    """(base coefficient, δ coefficient) of slerp(base, base + δ), from the Gram matrix of (base, δ):
    s0·base + s1·(base+δ) = (s0+s1)·base + s1·δ."""
    bb, bd, dd = g[0][0], g[0][1], g[1][1]
    s0, s1 = slerp_coefficients(t, bb, bb + 2 * bd + dd, bb + bd)
    return s0 + s1, s1


def model_stock(
    base: torch.Tensor, deltas: Sequence[torch.Tensor], filter_wise: bool = False, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Model Stock: move from base towards the average by t = N·cosθ/(1+(N−1)·cosθ), cosθ the mean pairwise
    cosine of the offsets δᵢ (whole tensors; per row with filter_wise)."""
    n = len(deltas)
    out = torch.empty_like(base) if out is None else out
    if not filter_wise:
        return fused.weighted_sum_into(out, base, deltas, model_stock_coefficients(fast.cached_gram(deltas)))
    work = fast.work_dtype(base)
    offsets = [d.to(work).reshape(1, -1) if d.dim() < 2 else d.to(work).reshape(d.shape[0], -1) for d in deltas]
    cos_rows = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cos_rows.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos_rows).mean(dim=0).unsqueeze(-1)
    t_rows = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    change = (t_rows * torch.stack(offsets).mean(dim=0)).reshape(base.shape)
    return _finish(base, change, out)
