"""Merge methods: one registry, two entry points.

- `merge_deltas`: what the engine calls, on resident task vectors, writing into a preallocated output.
- `merge_tensors`: mergekit-shaped (raw model tensors, base first), used for parity with mergekit.
"""

from __future__ import annotations

import zlib
from typing import Any, Sequence

import torch

from . import kernels, selective, spherical
from .registry import METHODS, MethodError, MethodSpec, get_method, resolve_params

__all__ = [
    "METHODS",
    "MethodError",
    "MethodSpec",
    "get_method",
    "resolve_params",
    "merge_deltas",
    "merge_tensors",
    "source_seeds",
]


def source_seeds(seed: int, key: str, n: int) -> list[int]:
    """One seed per source from (recipe seed, tensor name, source index): a random mask does not depend on
    the order tensors are visited, so runs reproduce exactly."""
    return [(int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 31 + i) % (2**63 - 1) for i in range(n)]


def merge_deltas(
    method: str,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    source_params: Sequence[dict[str, Any]],
    global_params: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    key: str = "",
    out: torch.Tensor | None = None,
    base_weight: float = 0.0,
    tie_order: str = "mergekit",
) -> torch.Tensor:
    """Merge one tensor from its base and task vectors δᵢ = θᵢ − base. `base_weight` is the base model's own
    weight in a linear merge where it is listed among the models (mergekit allows that); `tie_order` orders equal
    |δ| at a TIES/breadcrumbs cut (`Recipe.tie_order`)."""
    spec = get_method(method)
    params, g = resolve_params(spec, len(deltas), list(source_params), dict(global_params or {}))
    if any(p.get("density", 1.0) <= 0 for p in params):  # density 0 keeps nothing of that task vector (mergekit)
        deltas = [torch.zeros_like(d) if p.get("density", 1.0) <= 0 else d for d, p in zip(deltas, params)]
        params = [{**p, "density": 1.0} if p.get("density", 1.0) <= 0 else p for p in params]
    if spec.family == "task_arithmetic":
        return kernels.task_arithmetic(
            spec, base, deltas, params, g, out=out, seeds=source_seeds(seed, key, len(deltas)), tie_order=tie_order
        )
    if spec.family == "linear":
        return kernels.linear_deltas(
            base,
            deltas,
            [p["weight"] for p in params],
            normalize=bool(g["normalize"]),
            out=out,
            base_weight=base_weight,
        )
    if spec.family == "slerp":
        return kernels.slerp_delta(float(g["t"]), base, deltas[0], out=out)
    if spec.family == "model_stock":
        return kernels.model_stock(base, deltas, filter_wise=bool(g["filter_wise"]), out=out)
    if spec.family == "karcher":  # a mean of the models themselves, the base among them (as mergekit takes it)
        merged = spherical.karcher([base, *(base + d for d in deltas)], int(g["max_iter"]), float(g["tol"]))
        return _written(merged, base, out)
    change = merged_change(spec, base, deltas, params, g)
    return _written(base.to(change.dtype) + change, base, out)


def merged_change(
    spec: MethodSpec, base: torch.Tensor, deltas: Sequence[torch.Tensor], params: list[dict], g: dict[str, Any]
) -> torch.Tensor:
    """The change to the base of the methods with kernels of their own (spherical.py, selective.py)."""
    if spec.family == "nuslerp":
        t = spherical.nuslerp_t([p["weight"] for p in params])
        return spherical.nuslerp(t, deltas[0], deltas[1], bool(g["nuslerp_row_wise"]), bool(g["nuslerp_flatten"]))
    if spec.family == "multislerp":
        weights = [p["weight"] for p in params]
        return spherical.multislerp(deltas, weights, bool(g["normalize_weights"]), float(g["eps"]))
    if spec.family == "sce":
        return selective.sce(deltas, float(g["select_topk"]))
    if spec.family == "nearswap":
        return selective.nearswap(float(g["t"]), deltas[0])
    if spec.family == "arcee_fusion":
        return selective.arcee_fusion(base, deltas[0])
    if spec.family == "ram":
        return selective.ram(deltas, float(g["epsilon"]))
    if spec.family == "ramplus_tl":
        return selective.ram(deltas, float(g["epsilon"]), float(g["r"]), float(g["alpha"]))
    raise MethodError(f"no kernel for family {spec.family}")


def _written(merged: torch.Tensor, base: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return merged.to(base.dtype) if out is None else out.copy_(merged)


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    source_params: Sequence[dict[str, Any]] | None = None,
    global_params: dict[str, Any] | None = None,
    *,
    base: torch.Tensor | None = None,
    seed: int = 0,
    key: str = "",
) -> torch.Tensor:
    """mergekit-shaped entry: `tensors` are the non-base models, `base` the base model's tensor."""
    spec = get_method(method)
    source_params = list(source_params or [{} for _ in tensors])
    if spec.family == "linear" and base is None:
        params, g = resolve_params(spec, len(tensors), source_params, dict(global_params or {}))
        return kernels.linear(tensors, [p["weight"] for p in params], normalize=bool(g["normalize"]))
    if base is None and not spec.needs_base:  # the spherical methods on the models themselves
        params, g = resolve_params(spec, len(tensors), source_params, dict(global_params or {}))
        if spec.family == "karcher":
            return spherical.karcher(tensors, int(g["max_iter"]), float(g["tol"])).to(tensors[0].dtype)
        zero = torch.zeros((), dtype=tensors[0].dtype)  # from a zero base, the change is the result
        return merged_change(spec, zero, tensors, params, g).to(tensors[0].dtype)
    if base is None:
        raise MethodError(f"{method} needs a base model tensor")
    if spec.family == "slerp":
        _, g = resolve_params(spec, len(tensors), source_params, dict(global_params or {}))
        return kernels.slerp(float(g["t"]), base, tensors[0])
    deltas = [t - base for t in tensors]
    return merge_deltas(method, base, deltas, source_params, global_params, seed=seed, key=key)
