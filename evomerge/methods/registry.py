"""Merge-method declarations: which parameters each method takes and their mergekit 0.1.5 defaults.

Kept apart from the kernels so the recipe, the search space and the mergekit exporter can validate
parameters without touching tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MethodError


@dataclass(frozen=True)
class MethodSpec:
    name: str
    family: str  # "task_arithmetic" (sparsify → weight → consensus → sum), "linear", "slerp", "model_stock", or
    # a method of its own (nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl)
    sparsification: str | None = None  # magnitude | random | magnitude_outliers | rank_magnitude
    consensus: str | None = None  # "sum" sign election, or None
    needs_base: bool = True
    # per-source ("tensor") parameters: name -> default (None = required)
    source_params: dict[str, Any] = field(default_factory=dict)
    # merge-wide parameters: name -> default
    global_params: dict[str, Any] = field(default_factory=dict)
    min_sources: int = 1
    max_sources: int | None = None


def _gta(name: str, sparsification: str | None, consensus: str | None, normalize: bool, rescale: bool) -> MethodSpec:
    source_params: dict[str, Any] = {"weight": None, "density": 1.0}
    if sparsification == "magnitude_outliers":
        source_params["gamma"] = 0.01
    if sparsification == "rank_magnitude":
        source_params["epsilon"] = 0.15
    return MethodSpec(
        name=name,
        family="task_arithmetic",
        sparsification=sparsification,
        consensus=consensus,
        source_params=source_params,
        global_params={"normalize": normalize, "rescale": rescale, "lambda": 1.0, "rescale_mode": "l1"},
    )


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        # min 0: a linear merge may consist of the base model alone (listed among the models)
        MethodSpec(
            "linear",
            "linear",
            needs_base=False,
            source_params={"weight": None},
            global_params={"normalize": True},
            min_sources=0,
        ),
        _gta("task_arithmetic", None, None, normalize=False, rescale=False),
        _gta("ties", "magnitude", "sum", normalize=True, rescale=False),
        _gta("dare_ties", "random", "sum", normalize=False, rescale=True),
        _gta("dare_linear", "random", None, normalize=False, rescale=True),
        _gta("breadcrumbs", "magnitude_outliers", None, normalize=False, rescale=False),
        _gta("breadcrumbs_ties", "magnitude_outliers", "sum", normalize=False, rescale=False),
        _gta("della", "rank_magnitude", "sum", normalize=True, rescale=True),
        _gta("della_linear", "rank_magnitude", None, normalize=False, rescale=True),
        MethodSpec("slerp", "slerp", global_params={"t": None}, min_sources=1, max_sources=1),
        MethodSpec("model_stock", "model_stock", global_params={"filter_wise": False}, min_sources=2),
        # the methods below: plain torch kernels (spherical.py, selective.py), parity with mergekit 0.1.5
        MethodSpec(
            "nuslerp",
            "nuslerp",
            needs_base=False,  # with a base: SLERP of the two task vectors
            source_params={"weight": None},
            global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            min_sources=2,
            max_sources=2,
        ),
        MethodSpec(
            "multislerp",
            "multislerp",
            needs_base=False,
            source_params={"weight": None},
            global_params={"normalize_weights": True, "eps": 1e-8},
        ),
        MethodSpec("karcher", "karcher", needs_base=False, global_params={"max_iter": 10, "tol": 1e-5}),
        MethodSpec("sce", "sce", global_params={"select_topk": 1.0}),
        MethodSpec("nearswap", "nearswap", global_params={"t": None}, min_sources=1, max_sources=1),
        MethodSpec("arcee_fusion", "arcee_fusion", min_sources=1, max_sources=1),
        MethodSpec("ram", "ram", global_params={"epsilon": 1e-5}),
        MethodSpec("ramplus_tl", "ramplus_tl", global_params={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    ]
}

RESCALE_MODES = ("l1", "inverse_density")

# (low, high, low included, high included) for parameters with a range; the rest are any real number.
PARAM_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "density": (0.0, 1.0, True, True),  # 0 keeps nothing of that task vector, as in mergekit
    "gamma": (0.0, 1.0, True, False),
    "t": (0.0, 1.0, True, True),
}


def range_text(name: str) -> str:
    lo, hi, lo_in, hi_in = PARAM_RANGES[name]
    return f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def in_range(name: str, value: float) -> bool:
    if name not in PARAM_RANGES:
        return True
    lo, hi, lo_in, hi_in = PARAM_RANGES[name]
    value = float(value)
    return (lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)


def della_band_ok(density_low: float, density_high: float, epsilon: float) -> bool:
    """DELLA keeps entries with probability density ± epsilon, which must stay inside (0, 1) for every density
    below 1 in [density_low, density_high] (density 1 keeps everything and needs no band)."""
    if density_low >= 1.0 or epsilon <= 0.0:
        return True
    return density_low - epsilon > 0.0 and density_high < 1.0 and density_high + epsilon < 1.0


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}") from None


def resolve_params(
    spec: MethodSpec, n_sources: int, source_params: list[dict[str, Any]], global_params: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Fill defaults and validate; returns (per-source params, global params) ready for a kernel.

    As in mergekit, a per-source parameter given merge-wide (e.g. `density: 0.5` under `parameters:`)
    is the default for every source that does not set its own."""
    shared = {k: v for k, v in global_params.items() if k in spec.source_params}
    global_params = {k: v for k, v in global_params.items() if k not in spec.source_params}
    if n_sources < spec.min_sources or (spec.max_sources is not None and n_sources > spec.max_sources):
        if spec.max_sources is None:
            want = f"at least {spec.min_sources}"
        else:
            want = f"{spec.min_sources}" + (f"..{spec.max_sources}" if spec.max_sources != spec.min_sources else "")
        raise MethodError(f"{spec.name} takes {want} non-base source(s), got {n_sources}")
    per_source = []
    for i, given in enumerate(source_params):
        unknown = set(given) - set(spec.source_params)
        if unknown:
            raise MethodError(
                f"{spec.name}: unknown per-source parameter(s) {sorted(unknown)} for source {i}; known: "
                f"{sorted(spec.source_params)}"
            )
        p = {}
        for name, default in spec.source_params.items():
            value = given.get(name, shared.get(name, default))
            if value is None:
                raise MethodError(f"{spec.name}: source {i} needs parameter {name!r}")
            p[name] = value
        for name in ("density", "gamma"):
            if name in p and not in_range(name, p[name]):
                raise MethodError(f"{spec.name}: {name} must be in {range_text(name)}, got {p[name]} for source {i}")
        if "epsilon" in p and p["density"] > 0 and not della_band_ok(p["density"], p["density"], p["epsilon"]):
            raise MethodError(
                f"{spec.name}: density ± epsilon must lie in (0, 1), got density={p['density']} "
                f"epsilon={p['epsilon']} for source {i}"
            )
        per_source.append(p)
    unknown = set(global_params) - set(spec.global_params)
    if unknown:
        raise MethodError(f"{spec.name}: unknown parameter(s) {sorted(unknown)}; known: {sorted(spec.global_params)}")
    g = {}
    for name, default in spec.global_params.items():
        value = global_params.get(name, default)
        if value is None:
            raise MethodError(f"{spec.name} needs parameter {name!r}")
        g[name] = value
    if "rescale_mode" in g and g["rescale_mode"] not in RESCALE_MODES:
        raise MethodError(f"{spec.name}: rescale_mode must be one of {RESCALE_MODES}, got {g['rescale_mode']!r}")
    if spec.family == "slerp" and not in_range("t", g["t"]):
        raise MethodError(f"slerp: t must be in {range_text('t')}, got {g['t']}")
    if spec.family == "nearswap" and not float(g["t"]) > 0:
        raise MethodError(f"nearswap: t (the distance under which an entry is swapped in) must be > 0, got {g['t']}")
    if spec.family == "sce" and not 0 <= float(g["select_topk"]) <= 1:
        raise MethodError(f"sce: select_topk must be in [0, 1], got {g['select_topk']}")
    return per_source, g
