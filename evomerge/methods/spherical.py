"""Merges on the hypersphere beyond two-model SLERP, as mergekit 0.1.5 defines them: NuSLERP (two models, per
row or flattened), Multi-SLERP (barycentric interpolation in the tangent space at the weighted mean) and the
Karcher mean (the Riemannian centre of mass, by fixed-point iteration).

They take whole tensors — task vectors when the recipe has a base (the base is added back by the caller), model
tensors otherwise — and compute in float32 at least. Not a search hot path: plain torch, one tensor at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import fast
from .registry import MethodError


def _work(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(fast.work_dtype(t)) for t in tensors]


def nuslerp_t(weights: Sequence[float]) -> float:
    """mergekit's interpolation factor from the two models' weights: w₁/(w₀+w₁), ½ when they cancel."""
    total = float(weights[0]) + float(weights[1])
    return 0.5 if abs(total) < 1e-6 else float(weights[1]) / total


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """SLERP of whole flattened tensors (`flatten`), or of each row (`row_wise`: along dim 0) or each column;
    colinear pairs fall back to linear interpolation."""
    shape = v0.shape
    v0, v1 = _work([v0, v1])
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    eps = 1e-8
    u0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def multislerp(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize_weights: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Weighted interpolation of N tensors on the sphere: project onto the tangent space at the weighted mean
    direction, average there, map back, scale by the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    shape = tensors[0].shape
    flat = torch.stack([t.reshape(-1) for t in _work(tensors)])
    w = torch.tensor([float(x) for x in weights], dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) == 2:  # antipodal pair: linear interpolation
            return (flat[0] * w[0] + flat[1] * w[1]).reshape(shape)
        raise MethodError("multislerp: the weighted directions cancel out (antipodal tensors); change the weights")
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * w.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    return (result * (norms.squeeze(-1) * w).sum()).reshape(shape)


def karcher(tensors: Sequence[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of the tensors' directions (equal weights), scaled by their mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    work = _work(tensors)
    alphas = [1.0 / len(work)] * len(work)
    norms = [torch.linalg.vector_norm(t) for t in work]
    units = [t / n if n.item() != 0.0 else torch.zeros_like(t) for t, n in zip(work, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(work[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    points = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(weights, points))
    mean_norm = torch.linalg.vector_norm(mean)
    mean = points[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, points):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean
