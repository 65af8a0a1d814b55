"""Pure tensor kernels. Each takes task vectors δᵢ = θᵢ − θ_base (the form the engine keeps resident)
and writes base + merged change into `out` when one is given, so a search can reuse one target tensor.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .registry import MethodSpec
from .sparsify import SPARSIFIERS


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate half-precision inputs in fp32; keep fp32/fp64 as they are."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _finish(base: torch.Tensor, change: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return (base.to(change.dtype) + change).to(base.dtype)
    return torch.add(base, change, out=out)


def task_arithmetic(
    spec: MethodSpec,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    source_params: Sequence[dict[str, Any]],
    global_params: dict[str, Any],
    generators: Sequence[torch.Generator | None],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generalized task-arithmetic family: sparsify each δ, weight, optional sign election, sum."""
    work = _work_dtype(base)
    mode = global_params["rescale_mode"] if global_params["rescale"] else None
    weights = [float(p["weight"]) for p in source_params]
    weighted = []
    for delta, p, gen, w in zip(deltas, source_params, generators, weights):
        d = delta.to(work)
        if spec.sparsification is not None:
            extra = {k: p[k] for k in ("gamma", "epsilon") if k in p}
            d = SPARSIFIERS[spec.sparsification](d, float(p["density"]), rescale_mode=mode, generator=gen, **extra)
        weighted.append(d * w)

    if spec.consensus == "sum":
        total = torch.stack(weighted).sum(dim=0)
        elected_positive = total >= 0
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for wd, w in zip(weighted, weights):
            keep = torch.where(elected_positive, wd > 0, wd < 0)
            mixed.addcmul_(wd, keep)
            divisor.add_(keep, alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = torch.stack(weighted).sum(dim=0)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if global_params["normalize"]:
        mixed = mixed.div_(divisor)
    lam = float(global_params["lambda"])
    if lam != 1.0:
        mixed.mul_(lam)
    return _finish(base, mixed, out)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted average of whole models (model soup): Σwθ/Σw."""
    work = _work_dtype(tensors[0])
    res = torch.zeros(tensors[0].shape, dtype=work, device=tensors[0].device)
    for t, w in zip(tensors, weights):
        res.add_(t.to(work), alpha=float(w))
    if normalize:
        total = sum(float(w) for w in weights)
        if abs(total) < 1e-12:
            raise ValueError("linear merge: the weights sum to zero, so they cannot be normalized")
        res.div_(total)
    if out is None:
        return res.to(tensors[0].dtype)
    return out.copy_(res)


def linear_deltas(base: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True, out: torch.Tensor | None = None, base_weight: float = 0.0) -> torch.Tensor:
    """Linear merge of base+δᵢ (and the base itself with `base_weight`) from resident task vectors."""
    work = _work_dtype(base)
    total = sum(float(w) for w in weights) + base_weight
    if normalize and abs(total) < 1e-12:
        raise ValueError("linear merge: the weights sum to zero, so they cannot be normalized")
    scale = 1.0 / total if normalize else 1.0
    change = torch.zeros(base.shape, dtype=work, device=base.device)
    for d, w in zip(deltas, weights):
        change.add_(d.to(work), alpha=float(w) * scale)
    base_coeff = 1.0 if normalize else total
    if base_coeff != 1.0:
        change.add_(base.to(work), alpha=base_coeff - 1.0)
    return _finish(base, change, out)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, out: torch.Tensor | None = None, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation between whole (flattened) tensors; near-parallel falls back to lerp."""
    work = _work_dtype(v0)
    a, b = v0.to(work), v1.to(work)
    n0 = float(torch.linalg.vector_norm(a, dtype=torch.float64))
    n1 = float(torch.linalg.vector_norm(b, dtype=torch.float64))
    dot = float((a.double() * b.double()).sum())
    dot /= (n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0)
    if abs(dot) > dot_threshold:
        s0, s1 = 1.0 - t, t
    else:
        theta0 = math.acos(max(-1.0, min(1.0, dot)))
        sin0 = math.sin(theta0)
        s0 = math.sin(theta0 - theta0 * t) / sin0
        s1 = math.sin(theta0 * t) / sin0
    res = a * s0
    res.add_(b, alpha=s1)
    if out is None:
        return res.to(v0.dtype)
    return out.copy_(res)


def model_stock(base: torch.Tensor, deltas: Sequence[torch.Tensor], filter_wise: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Model Stock: move from base towards the average by t = N·cosθ/(1+(N−1)·cosθ)."""
    work = _work_dtype(base)
    if filter_wise:
        offsets = [d.to(work).reshape(1, -1) if d.dim() < 2 else d.to(work).reshape(d.shape[0], -1) for d in deltas]
    else:
        offsets = [d.to(work).reshape(-1) for d in deltas]
    cos = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cos.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(offsets)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    mean = torch.stack(offsets).mean(dim=0)
    change = (t * mean).reshape(base.shape)
    return _finish(base, change, out)
