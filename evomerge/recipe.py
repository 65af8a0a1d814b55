"""Recipe: which sources, base, method and parameters to use for each tensor.

The schema is mergekit's (`merge_method`, `base_model`, `models[].parameters`, `parameters`, `dtype`,
`tokenizer_source`) so a mergekit config loads as a recipe. A parameter value is
- a scalar,
- a gradient list, interpolated over depth as mergekit 0.1.5 does (layer i at t=i/(L−1) of its own tower's L
  layers; tensors outside the layers — embeddings, final norm, head — at t=0; a list of length L gives each layer
  its own value exactly), or
- a list of rules `{filter, tower, layers, value}` tried in order; `filter` matches a role exactly (embed, attn,
  mlp, norm, head, other; experts and router inside an MoE mlp) or else a substring of the tensor name (mergekit's
  filters; `name:TEXT` says so explicitly); `tower` and `layers` (an explicit index list) are evomerge
  extensions mergekit cannot express.
evomerge adds `method_rules` (a merge method per group) and `seed` (DARE/DELLA masks).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, validation_summary
from .layers import GROUPS, PARTS, Layout, TensorInfo, classify
from .methods import METHODS, get_method

Scalar = Union[bool, int, float, str]
ROLES = (*GROUPS, *PARTS)
ANY_METHOD_PARAMS = {p for spec in METHODS.values() for p in (*spec.source_params, *spec.global_params)}
log = logging.getLogger(__name__)


def filter_matches(filter: str | None, info: TensorInfo) -> bool:
    """A role (embed, attn, mlp, norm, head, other; experts, router inside an MoE mlp) matches that role exactly;
    `name:TEXT` a substring of the tensor name; any other text a substring too (mergekit's filters), "*" all."""
    if filter in (None, "*"):
        return True
    if filter in ROLES:
        return filter in info.roles()
    return filter.removeprefix("name:") in info.name


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    tower: str | None = None  # encoder, decoder, vision, text, … (a model's towers; see layers.Layout)
    layers: list[int] | None = None
    value: Union[Scalar, list[float]]

    def matches(self, info: TensorInfo) -> bool:
        if not filter_matches(self.filter, info):
            return False
        if self.tower is not None and info.tower != self.tower:
            return False
        if self.layers is not None and info.layer not in self.layers:
            return False
        return True


ParamValue = Union[Scalar, list[Rule], list[float]]


class MethodRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    tower: str | None = None
    layers: list[int] | None = None
    method: str

    def matches(self, info: TensorInfo) -> bool:
        return Rule(filter=self.filter, tower=self.tower, layers=self.layers, value=0).matches(info)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        get_method(v)
        return v


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """Another token's row of one model, by id or by token (one of the two)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "ModelTokenEmbedding":
        if (self.token_id is None) == (self.token is None):
            raise ValueError("model_token: give token_id or token, one of them")
        return self


class TokenEmbedding(BaseModel):
    """mergekit's `tokenizer.tokens` entry: where a token's embedding comes from (a model path: its own row there);
    `force` gives every model that row, not only those lacking the token."""

    model_config = ConfigDict(extra="forbid")
    source: Union[Annotated[Union[ZeroEmbedding, ModelTokenEmbedding], Field(discriminator="kind")], str]
    force: bool = False


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    method_rules: list[MethodRule] = Field(default_factory=list)
    dtype: str | None = None  # the arithmetic's dtype (None: float32); given alone, also the output's
    out_dtype: str | None = None  # None: `dtype` if given, else the sources' own dtype (as mergekit keeps it)
    tokenizer_source: str | None = None  # "base", "union" or a model: one vocabulary for models whose tokenizers differ
    tokens: dict[str, TokenEmbedding] | None = None  # mergekit's tokenizer.tokens: embeddings of chosen tokens
    pad_to_multiple_of: int | None = None  # mergekit's tokenizer.pad_to_multiple_of: table rows rounded up
    chat_template: str | None = None  # Jinja text, or "auto": the template most of the models have (as mergekit)
    seed: int = 0
    # equal |δ| at a TIES/breadcrumbs cut: kept in the order mergekit's CPU sort leaves them ("mergekit"), or first
    # positions first ("position": a search's candidates, which skips replaying that sort)
    tie_order: Literal["mergekit", "position"] = "mergekit"
    name: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _known(cls, v: str) -> str:
        get_method(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        methods = {self.merge_method} | {r.method for r in self.method_rules}
        known = set()
        for m in methods:
            spec = METHODS[m]
            known |= set(spec.source_params) | set(spec.global_params)
            if spec.needs_base and self.base_model is None:
                raise ValueError(f"merge method {m} needs base_model")
        linear = sorted(m for m in methods if METHODS[m].family == "linear")
        if linear and self.base_model is not None and self.base_entry() is None:
            raise ValueError(
                f"{linear[0]} averages every model, base_model too: list {self.base_model} among the models with a "
                "weight (0 leaves it out), or drop base_model (mergekit refuses this config as well)"
            )
        known |= {"int8_mask"}  # accepted for mergekit compatibility; a no-op here
        for where, params in [("parameters", self.parameters)] + [
            (f"models[{i}] ({m.model})", m.parameters) for i, m in enumerate(self.models)
        ]:
            unused = set(params) - known
            unknown = unused - ANY_METHOD_PARAMS  # a typo, not a parameter of another method
            if unknown:
                raise ValueError(
                    f"{where}: parameter(s) {sorted(unknown)} are not used by {sorted(methods)}; known: {sorted(known)}"
                )
            if unused:  # mergekit ignores them too (e.g. a weight on model_stock or slerp models)
                log.warning("%s: %s not used by %s; ignored", where, ", ".join(sorted(unused)), ", ".join(methods))
        if self.tokenizer_source not in (None, "base", "union", self.base_model, *[m.model for m in self.models]):
            raise ValueError(
                f"tokenizer_source must be base, union or one of the models, got {self.tokenizer_source!r}"
            )
        if (self.tokens or self.pad_to_multiple_of) and self.tokenizer_source is None:
            raise ValueError("tokens and pad_to_multiple_of shape the output vocabulary: give a tokenizer_source too")
        if self.chat_template not in (None, "auto") and "{" not in self.chat_template:
            raise ValueError(
                f"chat_template {self.chat_template!r}: give the template's Jinja text or 'auto' (the models' own); "
                "mergekit's bundled templates by name are not shipped with evomerge"
            )
        return self

    # ---- sources ------------------------------------------------------------------------------
    def source_entries(self) -> list[ModelEntry]:
        """The models that contribute task vectors: every listed model except the base itself."""
        return [m for m in self.models if not _same_path(m.model, self.base_model)]

    def base_entry(self) -> ModelEntry | None:
        return next((m for m in self.models if _same_path(m.model, self.base_model)), None)

    # ---- per-tensor resolution -----------------------------------------------------------------
    def method_for(self, info: TensorInfo) -> str:
        for rule in self.method_rules:
            if rule.matches(info):
                return rule.method
        return self.merge_method

    def plan(self, tensor: TensorInfo | str, num_layers: int | None = None) -> "TensorPlan":
        """Resolve method and parameters for one tensor (its place in the model, or a name read by pattern in a
        model of `num_layers` layers)."""
        info = classify(tensor) if isinstance(tensor, str) else tensor
        name = info.name
        method = self.method_for(info)
        spec = METHODS[method]
        t = info.t(num_layers)
        accepted = set(spec.source_params) | set(spec.global_params)
        global_params = {}
        for k, v in self.parameters.items():
            if k in accepted:
                value = evaluate(v, info, t)
                if value is not None:
                    global_params[k] = value
        source_params = []
        for entry in self.source_entries():
            p = {}
            for k, v in entry.parameters.items():
                if k in spec.source_params:
                    value = evaluate(v, info, t)
                    if value is not None:
                        p[k] = value
            source_params.append(p)
        base_weight = 0.0
        base = self.base_entry()
        if spec.family == "linear" and base is not None:
            value = evaluate(base.parameters.get("weight", self.parameters.get("weight", 1.0)), info, t)
            base_weight = float(value if value is not None else 0.0)
        return TensorPlan(name, method, source_params, global_params, base_weight)

    def check_towers(self, layout: Layout) -> None:
        """A rule's `tower` must be one of the model's towers: a misspelt one would silently match nothing."""
        named = {r.tower for r in self._all_rules()} - {None}
        known = set(layout.towers) - {None}
        if named - known:
            raise RecipeError(
                f"tower(s) {sorted(named - known)} not in this model; its towers: "
                + (", ".join(sorted(known)) if known else "none (one stack of layers: drop `tower`)")
            )

    def role_filters(self) -> set[str]:
        """The filters of this recipe's rules that name a role."""
        return {r.filter for r in self._all_rules()} & set(ROLES)

    def reads_structure(self) -> bool:
        """Whether any value depends on where a tensor sits (a gradient over depth, rules, method rules): only then
        does a merge need the model's layout, built from its module tree (~2 s of imports)."""
        return bool(self.method_rules) or any(isinstance(v, list) for v in self._values())

    def _all_rules(self) -> list[Rule | MethodRule]:
        """Every rule of the recipe: the parameters' (merge-wide and per model) and the method rules."""
        values = self._values()
        return [r for v in values if isinstance(v, list) for r in v if isinstance(r, Rule)] + list(self.method_rules)

    def _values(self) -> list[Any]:
        """Every parameter value of the recipe, merge-wide and per model."""
        return [*self.parameters.values(), *(v for m in self.models for v in m.parameters.values())]

    def mergekit_readings(self, layout: Layout) -> list[str]:
        """A note for each role filter that names other tensors of this model than mergekit's reading of the same
        text (a substring of the name): the same on Llama-style models, not on MoE, Qwen3's q/k norms, encoders."""
        notes = []
        for f in sorted(self.role_filters()):
            role = {n for n, info in layout.infos.items() if f in info.roles()}
            text = {n for n in layout.infos if f in n}
            if role != text:
                differ = sorted(role ^ text)
                notes.append(
                    f"filter {f!r} names the role {f} ({len(role)} tensors); mergekit would read it as a substring of "
                    f"the names ({len(text)} tensors; they differ on {differ[0]}{' …' if len(differ) > 1 else ''}); "
                    f"write 'name:{f}' for mergekit's reading"
                )
        return notes

    # ---- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        path = Path(path)
        data = read_yaml(path, "recipe")
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe is a YAML mapping with merge_method and models")
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "Recipe":
        data = dict(data)
        if "slices" in data:
            data = _slices_as_models(data, where)
        if isinstance(data.get("tokenizer"), dict):  # mergekit's newer spelling: tokenizer: {source, tokens, …}
            tokenizer = data.pop("tokenizer")
            unknown = set(tokenizer) - {"source", "tokens", "pad_to_multiple_of"}
            if unknown or "tokenizer_source" in data:
                raise RecipeError(
                    f"{where}: tokenizer {tokenizer}: give source, tokens and pad_to_multiple_of there, or "
                    "tokenizer_source alone, once"
                )
            data["tokenizer_source"] = tokenizer.get("source", "union")  # mergekit's default source
            data.update({k: tokenizer[k] for k in ("tokens", "pad_to_multiple_of") if tokenizer.get(k) is not None})
        for m in data.get("models") or []:
            if (
                isinstance(m, dict)
                and isinstance(m.get("model"), str)
                and "+" in m["model"]
                and not Path(m["model"]).exists()
            ):
                raise RecipeError(
                    f"{where}: model {m['model']!r} applies a LoRA ('+'); merge the LoRA into the model first"
                )
            if isinstance(m, dict) and m.get("parameters") is None:
                m["parameters"] = {}
        for params in [data.get("parameters")] + [
            m.get("parameters") for m in data.get("models") or [] if isinstance(m, dict)
        ]:
            if isinstance(
                params, dict
            ):  # mergekit also takes one conditional alone: `weight: {filter: mlp, value: 0.5}`
                params.update({k: [v] for k, v in params.items() if isinstance(v, dict) and "value" in v})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{where}: invalid recipe: {validation_summary(e)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True, exclude_defaults=False), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    def to_mergekit(self) -> dict[str, Any]:
        """A mergekit 0.1.5 config. Raises RecipeError for what mergekit cannot express."""
        methods = {r.method for r in self.method_rules}
        if methods - {self.merge_method}:
            raise RecipeError(
                "mergekit takes one merge_method per config; this recipe picks "
                f"{sorted(methods | {self.merge_method})} per group"
            )
        if self.parameters.get("rescale_mode", "l1") != "l1":
            raise RecipeError("mergekit only rescales by the L1 norm (rescale_mode: l1)")

        def export(v: ParamValue) -> Any:
            if isinstance(v, list) and v and isinstance(v[0], Rule):
                out = []
                for r in v:
                    if r.layers is not None or r.tower is not None:
                        raise RecipeError(
                            f"rule {r.model_dump(exclude_none=True)} selects a tower or layers by index; mergekit "
                            "cannot; use a gradient list instead"
                        )
                    # mergekit's filters are substrings of the names: roles read as such name the same tensors in
                    # the Llama-style models mergekit's examples use
                    f = r.filter.removeprefix("name:") if r.filter is not None else None
                    out.append({"filter": f, "value": r.value} if f is not None else {"value": r.value})
                return out
            return v

        cfg: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            cfg["base_model"] = self.base_model
        cfg["models"] = []
        for m in self.models:
            entry: dict[str, Any] = {"model": m.model}
            if m.parameters:
                entry["parameters"] = {k: export(v) for k, v in m.parameters.items()}
            cfg["models"].append(entry)
        params = {k: export(v) for k, v in self.parameters.items() if k != "rescale_mode"}
        if params:
            cfg["parameters"] = params
        if self.dtype:
            cfg["dtype"] = self.dtype
        if self.out_dtype:
            cfg["out_dtype"] = self.out_dtype
        if self.tokens or self.pad_to_multiple_of:
            cfg["tokenizer"] = {"source": self.tokenizer_source}
            if self.tokens:
                cfg["tokenizer"]["tokens"] = {t: e.model_dump(exclude_defaults=True) for t, e in self.tokens.items()}
            if self.pad_to_multiple_of:
                cfg["tokenizer"]["pad_to_multiple_of"] = self.pad_to_multiple_of
        elif self.tokenizer_source:
            cfg["tokenizer_source"] = self.tokenizer_source
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        return cfg


@dataclass
class TensorPlan:
    name: str
    method: str
    source_params: list[dict[str, Any]]
    global_params: dict[str, Any]
    base_weight: float = 0.0


def evaluate(value: ParamValue, info: TensorInfo, t: float) -> Any:
    """mergekit's setting evaluation: scalar as is, numeric list interpolated at t, rules first match."""
    if isinstance(value, list):
        if not value:
            return None
        if isinstance(value[0], Rule):
            for rule in value:
                if rule.matches(info):
                    return evaluate(rule.value, info, t)
            return None
        scaled = t * (len(value) - 1)
        i0 = int(math.floor(scaled))
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    return value


def _same_path(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or os.path.abspath(a) == os.path.abspath(b)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content; one clear error for a missing or malformed file."""
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read {what} ({e})") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write text via a temp file and rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = [
    "Recipe",
    "RecipeError",
    "ModelEntry",
    "Rule",
    "MethodRule",
    "TensorPlan",
    "evaluate",
    "GROUPS",
    "atomic_write_text",
]


def _slices_as_models(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A mergekit config in the `slices:` form whose slices merge the same models over the same consecutive layer
    ranges, covering the whole stack in order, is the `models:` form. One slice keeps its parameters as they are
    (the slice's over the config's). Several slices — each its own gradients over its own layers — become
    per-layer rules with the values mergekit reads: layer i of an n-layer slice at t = i/(n−1) (1 for a one-layer
    slice), each parameter from the slice's source, else the slice, else the config; the embeddings take the first
    slice's values at t = 0, the tensors after the last layer the last slice's. Slices that copy, stack or reorder
    layers (frankenmerges) are `passthrough` layer paths; other shapes are refused in one line."""
    slices = data.pop("slices")
    if data.get("models"):
        raise RecipeError(f"{where}: give models or slices, not both")
    shape = "slices: a list of slices, each with sources (model, layer_range, parameters)"
    if not isinstance(slices, list) or not slices or not all(isinstance(p, dict) for p in slices):
        raise RecipeError(f"{where}: {shape}")
    for piece in slices:
        sources = piece.get("sources")
        if (
            not isinstance(sources, list)
            or not sources
            or not all(isinstance(x, dict) and "model" in x for x in sources)
        ):
            raise RecipeError(f"{where}: {shape}")
        unknown = set(piece) - {"sources", "base_model", "parameters"}
        if unknown:
            raise RecipeError(f"{where}: slice key(s) {sorted(unknown)} are not supported")
    models = [x["model"] for x in slices[0]["sources"]]
    if any([x["model"] for x in piece["sources"]] != models for piece in slices):
        raise SlicesNotAligned(f"{where}: every slice must merge the same models in the same order ({models})")
    layers = _num_layers(models[0])
    if layers is None:
        raise RecipeError(f"{where}: {models[0]}: no config.json with num_hidden_layers to check the layer ranges")
    ranges, start = [], 0
    for piece in slices:
        spans = {tuple(x.get("layer_range") or ()) for x in piece["sources"]}
        span = next(iter(spans))
        if len(spans) != 1 or len(span) != 2 or span[0] != start or not span[0] < span[1] <= layers:
            raise SlicesNotAligned(
                f"{where}: slice layer ranges {sorted(spans)}: the slices must take the same consecutive layers of "
                f"every model, from 0 to {layers} in order (frankenmerges are merge_method passthrough layer paths)"
            )
        ranges.append(span)
        start = span[1]
    if start != layers:
        raise SlicesNotAligned(f"{where}: the slices end at layer {start}, not at the last layer ({layers})")
    bases = {piece.get("base_model") for piece in slices} - {None}
    if len(bases) > 1:
        raise SlicesNotAligned(f"{where}: the slices name different base models {sorted(bases)}")
    if bases:
        data["base_model"] = bases.pop()
    config = dict(data.get("parameters") or {})
    if len(slices) == 1:
        data["models"] = [{"model": x["model"], "parameters": x.get("parameters") or {}} for x in slices[0]["sources"]]
        data["parameters"] = {**config, **(slices[0].get("parameters") or {})}
        return data
    from .checkpoint import Checkpoint

    names = Checkpoint.open(models[0]).tensor_names()
    layout = Layout.of(models[0], names)
    outside = [
        (n, layout[n], 0 if layout[n].group == "embed" else len(slices) - 1) for n in names if layout[n].layer is None
    ]
    spans = [(i, a, b - a) for i, (a, b) in enumerate(ranges)]
    data["models"], data["parameters"] = slice_settings(data.get("merge_method"), slices, config, spans, outside)
    return data


class SlicesNotAligned(RecipeError):
    """mergekit slices that are not one merge over the whole stack: `slices.SlicedRecipe` merges them."""


def slice_settings(
    method: str | None,
    slices: list[dict[str, Any]],
    config: dict[str, Any],
    spans: list[tuple[int, int, int]],
    outside: list[tuple[str, TensorInfo, int]],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The `models` and `parameters` of a recipe over the sources of `slices` (the first slice's, which every
    slice has here) with each setting resolved per layer as mergekit reads it: over `spans` (slice, first output
    layer, layers), output layer start + m at t = m/(n−1) (1 for a one-layer slice), each parameter from the
    slice's source, else the slice, else the config; over `outside` (name, place, slice) at t = 0."""
    spec = METHODS.get(method)
    per_source = set(spec.source_params) if spec else set()

    def setting(k: int | None, i: int, name: str) -> Any:
        """What mergekit reads for `name` in slice i: the slice's source k, else the slice, else the config."""
        levels = [slices[i]["sources"][k].get("parameters") or {}] if k is not None else []
        levels += [slices[i].get("parameters") or {}, config]
        return next((level[name] for level in levels if name in level), None)

    def rules(k: int | None, name: str) -> list[dict[str, Any]]:
        out = []
        for i, start, n in spans:
            value = setting(k, i, name)
            for m in range(n):
                t = m / (n - 1) if n > 1 else 1.0
                out += [{**r, "layers": [start + m], "value": _at(r["value"], t)} for r in _conditional(value)]
        for n, info, i in outside:  # mergekit: embeddings with the first slice's values, the rest with the last's
            matching = (r for r in _conditional(setting(k, i, name)) if filter_matches(r.get("filter"), info))
            found = next(matching, None)
            if found is not None:
                out.append({"filter": f"name:{n}", "value": _at(found["value"], 0.0)})
        return out

    used = sorted({i for i, _, _ in spans} | {i for _, _, i in outside})
    given = {x for i in used for src in slices[i]["sources"] for x in (src.get("parameters") or {})}
    given |= {x for i in used for x in (slices[i].get("parameters") or {})} | set(config)
    sources = slices[used[0]]["sources"]
    models = [
        {"model": src["model"], "parameters": {name: rules(k, name) for name in sorted(given & per_source)}}
        for k, src in enumerate(sources)
    ]
    return models, {name: rules(None, name) for name in sorted(given - per_source)}


def _conditional(value: Any) -> list[dict[str, Any]]:
    """A mergekit setting as a list of {filter?, value} rules (a plain value: one rule without a filter)."""
    if value is None:
        return []
    if isinstance(value, dict) and "value" in value:
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return list(value)
    return [{"value": value}]


def mergekit_setting(value: Any, tensor_name: str, t: float) -> Any:
    """mergekit's `evaluate_setting`: the first rule whose filter is absent, "*" or a substring of the (output)
    tensor name, its value read at t; None when no rule matches."""
    for rule in _conditional(value):
        f = rule.get("filter")
        if f is None or f == "*" or f in tensor_name:
            return _at(rule["value"], t)
    return None


def _at(value: Any, t: float) -> Any:
    """A gradient list read at t as mergekit reads it; any other value as it is."""
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return evaluate([float(v) for v in value], None, t)  # type: ignore[arg-type]
    return value


def _num_layers(model: str) -> int | None:
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
