"""Search spaces: which recipe knobs the optimizer turns, and how a point decodes to a Recipe.

A space (YAML in `search_spaces/`) names the method (or a categorical method choice), the granularity
(global, blocks of k layers, single layers, or K knots over depth with each layer's value interpolated
between them; optionally attention and MLP apart) and the genes with bounds. Bound to concrete models it
becomes a flat list of named genes; a point (gene name → value) decodes deterministically into a Recipe whose
per-layer values are mergekit gradient lists (one entry per layer, or per knot) and whose embedding/head
values are per-tensor filters, so most searched recipes export to mergekit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import validation_summary
from .layers import Layout
from .methods import METHODS, get_method
from .methods.registry import PARAM_RANGES, della_band_ok, in_range, range_text
from .recipe import MethodRule, ModelEntry, Recipe, RecipeError, Rule, filter_matches

SOURCE_GENES = ("weight", "density", "gamma", "epsilon")
GLOBAL_GENES = ("t", "lambda")


class GeneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    init: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "GeneSpec":
        if not self.low < self.high:
            raise ValueError(f"gene bounds need low < high, got [{self.low}, {self.high}]")
        if self.init is not None and not self.low <= self.init <= self.high:
            raise ValueError(f"gene init {self.init} outside [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled gene needs low > 0, got {self.low}")
        return self

    @property
    def start(self) -> float:
        return self.init if self.init is not None else (self.low + self.high) / 2


class SearchSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    method: str | None = None
    method_choice: list[str] | None = None
    granularity: Literal["global", "block", "layer", "knots"] = "layer"
    block_size: int = 1
    knots: int = 4  # granularity knots: control points over depth, values interpolated between them
    split_attn_mlp: bool = False
    filters: list[str] = Field(default_factory=list)  # tensor-name filters with genes of their own (mergekit-evolve)
    smooth: bool = False  # per-layer values interpolated between the groups' genes (a mergekit gradient list)
    embed_head_genes: bool = True  # false: embeddings/head follow the first/last layers' values (mergekit slices)
    genes: dict[str, GeneSpec]
    parameters: dict[str, Any] = Field(default_factory=dict)  # fixed merge-wide parameters
    base: str | None = None
    sources: list[str] | None = None
    dtype: str = "float32"
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        if (self.method is None) == (self.method_choice is None):
            raise ValueError("give exactly one of method or method_choice")
        methods = self.methods()
        for m in methods:
            get_method(m)
        allowed = set(GLOBAL_GENES)
        for m in methods:
            allowed |= set(METHODS[m].source_params)
        unknown = set(self.genes) - allowed
        if unknown:
            raise ValueError(f"gene(s) {sorted(unknown)} are not parameters of {methods}; allowed: {sorted(allowed)}")
        if self.granularity == "block" and self.block_size < 1:
            raise ValueError("block_size must be ≥ 1")
        if self.split_attn_mlp and self.filters:
            raise ValueError("give split_attn_mlp or filters, not both")
        if self.smooth and self.granularity in ("global", "knots"):
            raise ValueError("smooth interpolates between layer groups: use granularity block or layer")
        if self.granularity == "knots" and self.knots < 2:
            raise ValueError(f"granularity knots needs knots ≥ 2, got {self.knots}")
        if self.granularity == "knots" and self.method_choice:
            raise ValueError("a method cannot be interpolated between knots: use granularity block or layer")
        self._check_ranges()
        return self

    def _check_ranges(self) -> None:
        """Every value a gene can take must be a valid parameter, so no candidate fails for its bounds."""
        for name, gene in self.genes.items():
            if name in PARAM_RANGES and not (in_range(name, gene.low) and in_range(name, gene.high)):
                raise ValueError(
                    f"genes.{name}: bounds [{gene.low:g}, {gene.high:g}] leave {range_text(name)}, the range of {name}"
                )
        for name, value in self.parameters.items():
            if isinstance(value, (int, float)) and not in_range(name, value):
                raise ValueError(f"parameters.{name}: {value} is outside {range_text(name)}")
        if any(METHODS[m].sparsification == "rank_magnitude" for m in self.methods()):
            density = self.genes.get("density")
            d_lo, d_hi = (density.low, density.high) if density else (float(self.parameters.get("density", 1.0)),) * 2
            epsilon = (
                self.genes["epsilon"].high if "epsilon" in self.genes else float(self.parameters.get("epsilon", 0.15))
            )
            if not della_band_ok(d_lo, d_hi, epsilon):
                raise ValueError(
                    f"DELLA keeps entries with probability density ± epsilon, which must stay in (0, 1): density in "
                    f"[{d_lo:g}, {d_hi:g}] with epsilon up to {epsilon:g} leaves it; narrow the density bounds or "
                    "epsilon"
                )

    def methods(self) -> list[str]:
        return list(self.method_choice or [self.method])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchSpace":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
            return cls.model_validate(data)
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"{path}: cannot read search space ({e})") from None
        except ValidationError as e:
            raise RecipeError(f"{path}: invalid search space: {validation_summary(e)}") from None

    def bind(
        self,
        base: str,
        sources: list[str],
        layout: Layout | list[str],
        num_layers: int | None = None,
        source_names: list[str] | None = None,
    ) -> "BoundSpace":
        """Bound to a model's layout (or tensor names read by pattern, in a model of `num_layers` layers)."""
        if not isinstance(layout, Layout):
            layout = Layout.by_name(layout, depth=num_layers)
        return BoundSpace(self, base, list(sources), list(source_names or [Path(s).name for s in sources]), layout)


@dataclass(frozen=True)
class Gene:
    name: str
    low: float = 0.0
    high: float = 1.0
    init: float = 0.5
    log: bool = False
    choices: tuple[str, ...] | None = None  # categorical when set

    def from_unit(self, u: float) -> float | str:
        """Map u ∈ [0, 1] (CMA-ES coordinates) to the gene's range; clipped, categorical by bins."""
        u = min(1.0, max(0.0, float(u)))
        if self.choices:
            return self.choices[min(len(self.choices) - 1, int(u * len(self.choices)))]
        if self.log:
            import math

            return math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return self.low + u * (self.high - self.low)

    def to_unit(self, v: float | str) -> float:
        if self.choices:
            return (self.choices.index(v) + 0.5) / len(self.choices)
        if self.log:
            import math

            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (float(v) - self.low) / (self.high - self.low)


@dataclass
class _Group:
    name: str
    layers: tuple[int, ...] | None  # layer group; None for a set of non-layer tensors
    tensors: tuple[str, ...] = ()  # non-layer tensors of this group
    part: str | None = None  # label of the tensors of the layers it covers ("attn"/"mlp" when split, a filter)
    knot: bool = False  # a control point over depth (granularity knots), not a set of layers of its own
    tower: str | None = None  # the tower whose layers these are (None in a one-tower model)


@dataclass(frozen=True)
class _Part:
    """Tensors of a layer with genes of their own: those matching `filter` (None: the rest)."""

    filter: str | None
    label: str | None


class GeneVector:
    """A flat, ordered list of genes (`self.genes`) and its maps to and from the unit cube that CMA-ES searches."""

    genes: list[Gene]

    @property
    def dim(self) -> int:
        return len(self.genes)

    def initial(self) -> dict[str, float | str]:
        return {
            g.name: (g.choices[min(len(g.choices) - 1, int(g.init * len(g.choices)))] if g.choices else g.init)
            for g in self.genes
        }

    def from_unit(self, x) -> dict[str, float | str]:
        return {g.name: g.from_unit(u) for g, u in zip(self.genes, x)}

    def to_unit(self, params: dict[str, float | str]) -> list[float]:
        return [g.to_unit(params[g.name]) for g in self.genes]

    def missing(self, params: dict[str, float | str]) -> None:
        missing = [g.name for g in self.genes if g.name not in params]
        if missing:
            raise RecipeError(f"search point lacks gene(s) {missing[:5]}")


class BoundSpace(GeneVector):
    """A search space bound to a base, sources and tensor names: a flat, ordered list of genes."""

    def __init__(
        self,
        space: SearchSpace,
        base: str,
        sources: list[str],
        source_names: list[str],
        layout: Layout,
    ) -> None:
        self.space = space
        self.base = base
        self.sources = sources
        self.source_names = source_names
        self.layout = layout
        self.num_layers = layout.num_layers
        self.tensor_names = list(layout.infos)
        self.towers = layout.towers or {None: 0}  # each tower's depth: layer genes and gradients per tower
        if space.split_attn_mlp:
            self.parts = [_Part(None, "attn"), _Part("mlp", "mlp")]
        else:
            self.parts = [_Part(f, f) for f in space.filters] + [_Part(None, None)]
        self.groups = self._groups()
        genes: list[Gene] = []
        for g in self.groups:
            if space.method_choice:
                genes.append(Gene(f"method@{g.name}", choices=tuple(space.method_choice), init=0.5))
            for pname, spec in space.genes.items():
                if pname in GLOBAL_GENES:
                    continue
                for sname in source_names:
                    genes.append(Gene(f"{pname}[{sname}]@{g.name}", spec.low, spec.high, spec.start, spec.log))
        for pname, spec in space.genes.items():
            if pname in GLOBAL_GENES:
                genes.append(Gene(pname, spec.low, spec.high, spec.start, spec.log))
        self.genes = genes
        self.by_name = {g.name: g for g in genes}

    def _groups(self) -> list[_Group]:
        s = self.space
        if s.granularity == "global":
            return [_Group("all", None)]
        k = 1 if s.granularity == "layer" else s.block_size
        groups = []
        own = s.embed_head_genes
        embed = tuple(n for n, i in self.layout.infos.items() if own and i.layer is None and i.group == "embed")
        head = tuple(n for n in self.tensor_names if own and self._after_layers(n))
        if embed:
            groups.append(_Group("embed", None, embed))
        for tower, depth in self.towers.items():
            prefix = f"{tower}." if tower else ""
            if s.granularity == "knots":
                if s.knots > depth:
                    raise RecipeError(
                        f"space {s.name}: {s.knots} knots over {depth} layers{f' of the {tower}' if tower else ''}; "
                        "use at most one per layer"
                    )
                # knot j sits at depth j/(K−1), where mergekit puts entry j of a K-entry gradient list; its layer
                # group is the nearest layer (what the report's heatmap reads back)
                for j in range(s.knots):
                    nearest = (round(j * (depth - 1) / (s.knots - 1)),)
                    for part in self.parts:
                        label = f"{prefix}K{j}.{part.label}" if part.label else f"{prefix}K{j}"
                        groups.append(_Group(label, nearest, part=part.label, knot=True, tower=tower))
                continue
            for start in range(0, depth, k):
                layers = tuple(range(start, min(start + k, depth)))
                label = prefix + (f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}")
                for part in self.parts:
                    name = f"{label}.{part.label}" if part.label else label
                    groups.append(_Group(name, layers, part=part.label, tower=tower))
        if head:
            groups.append(_Group("head", None, head))
        return groups

    def representative(self, group: _Group) -> str | None:
        """One tensor whose parameters are this group's genes (for reading a recipe back per group)."""
        if group.layers is None:
            return group.tensors[0] if group.tensors else next(iter(self.tensor_names), None)
        filtered = [p.filter for p in self.parts if p.filter is not None]
        for n, info in self.layout.infos.items():
            if info.layer != group.layers[0] or info.tower != group.tower:
                continue
            f = self._filter_of(group.part)
            if f is not None and filter_matches(f, info):
                return n
            if f is None and not any(filter_matches(x, info) for x in filtered):
                return n
        return None

    def decode(self, params: dict[str, float | str], name: str | None = None) -> Recipe:
        """Deterministic: the same params always give the same Recipe."""
        self.missing(params)
        s = self.space
        if s.granularity == "global":
            models = [
                ModelEntry(
                    model=src, parameters={p: float(params[f"{p}[{sn}]@all"]) for p in s.genes if p not in GLOBAL_GENES}
                )
                for src, sn in zip(self.sources, self.source_names)
            ]
            method = str(params["method@all"]) if s.method_choice else s.method
            rules: list[MethodRule] = []
        else:
            models = []
            for src, sn in zip(self.sources, self.source_names):
                models.append(
                    ModelEntry(
                        model=src, parameters={p: self._rules(params, p, sn) for p in s.genes if p not in GLOBAL_GENES}
                    )
                )
            method = s.method_choice[0] if s.method_choice else s.method
            rules = self._method_rules(params) if s.method_choice else []
        if any(METHODS[m].family == "linear" for m in s.methods()):  # a linear merge leaves the base out: weight 0
            models.insert(0, ModelEntry(model=self.base, parameters={"weight": 0.0}))
        global_params = dict(s.parameters)
        for p in GLOBAL_GENES:
            if p in s.genes:
                global_params[p] = float(params[p])
        return Recipe(
            merge_method=method,
            base_model=self.base,
            models=models,
            parameters=global_params,
            method_rules=rules,
            dtype=s.dtype,
            seed=s.seed,
            tie_order="position",  # what a candidate costs matters here; `evomerge merge` of it writes the same
            name=name,
        )

    def _rules(self, params: dict, pname: str, sname: str) -> list[Rule]:
        """Per-tensor rules for the embedding/head genes, then one rule per part (and tower): a value per layer, or
        with `smooth` or knots the groups' values as a gradient list (interpolated over depth as mergekit does)."""
        rules = []
        per_layer = {(t, part.label): [0.0] * depth for t, depth in self.towers.items() for part in self.parts}
        anchors: dict[tuple, list[float]] = {key: [] for key in per_layer}
        for g in self.groups:
            value = float(params[f"{pname}[{sname}]@{g.name}"])
            if g.layers is None:
                rules.extend(Rule(filter=f"name:{t}", value=value) for t in g.tensors)
                continue
            anchors[g.tower, g.part].append(value)
            for i in () if g.knot else g.layers:
                per_layer[g.tower, g.part][i] = value
        interpolated = self.space.smooth or self.space.granularity == "knots"
        if not self.space.embed_head_genes and not interpolated:
            # mergekit slices: the tensors after the last layer take the last slice's values (a gradient list
            # would give them its first entry: mergekit reads it at t = 0 outside the layers)
            last_tower = list(self.towers)[-1]
            for n in self.tensor_names:
                if self._after_layers(n):
                    tower = self.layout[n].tower if self.layout[n].tower in self.towers else last_tower
                    rules.append(Rule(filter=f"name:{n}", value=per_layer[tower, self.parts[-1].label][-1]))
        # filtered parts first: rules match first-wins
        for part in sorted(self.parts, key=lambda p: p.filter is None):
            for tower in self.towers:
                values = anchors[tower, part.label] if interpolated else per_layer[tower, part.label]
                rules.append(Rule(filter=part.filter, tower=tower, value=values if len(values) > 1 else values[0]))
        return rules

    def _method_rules(self, params: dict) -> list[MethodRule]:
        rules = []
        for g in self.groups:
            m = str(params[f"method@{g.name}"])
            if g.layers is None:
                rules.extend(MethodRule(filter=f"name:{t}", method=m) for t in g.tensors)
            else:
                rules.append(MethodRule(filter=self._filter_of(g.part), tower=g.tower, layers=list(g.layers), method=m))
        # rules match first-wins: the narrower (filtered) ones must precede the layer-only ones
        return sorted(rules, key=lambda r: r.filter is None)

    def _filter_of(self, label: str | None) -> str | None:
        return next(p.filter for p in self.parts if p.label == label)

    def _after_layers(self, name: str) -> bool:
        """A tensor after the last layer (final norm, head): outside the layers and not an embedding."""
        info = self.layout[name]
        return info.layer is None and info.group != "embed"
