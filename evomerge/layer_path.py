"""Data-flow-space (DFS) merging: a model whose layers are a path through the layers of several participants.

A layer-path recipe lists its participants (model directories, or a parameter-space recipe whose merge takes
part) and the path: steps `(model, layer, scale)`. The embedding, final norm, head, config and tokenizer come
from one participant (`embed_model`, the first by default). A step's `scale` multiplies the residual stream
entering it (Akiba et al. 2024, §3.2).

In memory the participants are resident once and a candidate is a thin host model whose layer list points at
their layers (shallow module copies that share every weight, each with its own cache index, so a layer used
twice in a path keeps two KV-cache entries). `path_fold.write_path` writes the path as an ordinary checkpoint.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError, validation_summary
from .recipe import Recipe, SlicesNotAligned, atomic_write_text, mergekit_setting, read_yaml
from .slices import SlicedRecipe

# config keys that may differ between participants: what a layer computes does not depend on them
FREE_CONFIG_KEYS = {
    "num_hidden_layers",
    "layer_types",
    "_name_or_path",
    "name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
    "use_cache",
    "max_window_layers",
    "_commit_hash",
}


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Union[int, str]  # participant: index or name
    layer: int
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not v > 0:
            raise ValueError(f"a step's scale multiplies the residual stream and must be > 0, got {v}")
        return v


class Participant(BaseModel):
    """A model directory, or a parameter-space recipe (a dict or a recipe file) merged in memory."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    recipe: Union[dict[str, Any], str, None] = None
    name: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "Participant":
        if (self.model is None) == (self.recipe is None):
            raise ValueError("a participant gives exactly one of model (a directory) or recipe (a merge)")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.model is not None:
            return Path(self.model).name
        return "merge"

    def ps_recipe(self) -> Recipe:
        if isinstance(self.recipe, str):
            return Recipe.load(self.recipe)
        return Recipe.from_dict(self.recipe, where=f"participant {self.label}")

    def directory(self) -> str:
        """The directory holding this participant's config and tokenizer (a merge's base model)."""
        if self.model is not None:
            return self.model
        recipe = self.ps_recipe()
        return recipe.base_model or recipe.models[0].model


class PathRecipe(BaseModel):
    """A layer path over participants: what `evomerge merge` writes and a DFS search evolves."""

    model_config = ConfigDict(extra="forbid")
    models: list[Participant]
    layer_path: list[Step]
    embed_model: Union[int, str] = 0
    head_model: Union[int, str, None] = None  # final norm and head; default: embed_model
    dtype: str = "float32"
    name: str | None = None
    # output tensor name → factor it is written with (mergekit passthrough's `scale`, e.g. 0 on a copied layer's
    # o_proj/down_proj); only `evomerge merge` applies it: a search's paths never carry one
    tensor_scale: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "PathRecipe":
        labels = [p.label for p in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"participants need distinct names, got {labels}; give each a name:")
        if not self.layer_path:
            raise ValueError("layer_path is empty: a path needs at least one step")
        self.embed_model = self.index(self.embed_model)
        self.head_model = self.index(self.head_model) if self.head_model is not None else None
        for step in self.layer_path:
            step.model = self.index(step.model)
        return self

    def index(self, ref: int | str) -> int:
        labels = [p.label for p in self.models]
        if isinstance(ref, int):
            if not 0 <= ref < len(self.models):
                raise ValueError(f"participant index {ref} is not among the {len(self.models)} participants")
            return ref
        if ref not in labels:
            raise ValueError(f"participant {ref!r} is not one of {labels}")
        return labels.index(ref)

    def steps(self) -> list[tuple[int, int, float]]:
        return [(int(s.model), s.layer, s.scale) for s in self.layer_path]

    @property
    def head(self) -> int:
        return int(self.embed_model if self.head_model is None else self.head_model)

    @classmethod
    def from_mergekit(cls, data: dict[str, Any], where: str = "config") -> "PathRecipe":
        """A mergekit `passthrough` config with `slices` (a frankenmerge: layer ranges copied, stacked, repeated).
        As in mergekit, the embedding comes from the first slice's model, the final norm and head from the last."""
        slices = data.get("slices") or []
        models: list[str] = []
        steps = []
        settings = []  # each slice's `scale`: its source's, else the slice's, else the config's (as mergekit reads)
        for i, piece in enumerate(slices):
            sources = piece.get("sources") if isinstance(piece, dict) else None
            if not sources or len(sources) != 1:
                raise RecipeError(f"{where}: passthrough slice {i} needs exactly one source, got {sources!r}")
            source = sources[0]
            levels = [source.get("parameters") or {}, piece.get("parameters") or {}, data.get("parameters") or {}]
            unknown = {k for level in levels for k in level} - {"scale"}
            if unknown:
                raise RecipeError(f"{where}: passthrough takes one parameter, scale; got {sorted(unknown)}")
            settings.append(next((level["scale"] for level in levels if "scale" in level), None))
            start, stop = source["layer_range"]
            if source["model"] not in models:
                models.append(source["model"])
            steps += [{"model": models.index(source["model"]), "layer": j} for j in range(start, stop)]
        if not steps:
            raise RecipeError(f"{where}: a passthrough config needs slices with layer ranges")
        scales = _passthrough_scales(slices, settings) if any(s is not None for s in settings) else {}
        names = [Path(m).name for m in models]
        participants = [
            {"model": m, **({"name": f"{n}-{k}"} if names.count(n) > 1 else {})}
            for k, (m, n) in enumerate(zip(models, names))
        ]
        recipe = {"models": participants, "layer_path": steps, "embed_model": steps[0]["model"]}
        recipe["head_model"] = steps[-1]["model"]
        if scales:
            recipe["tensor_scale"] = scales
        for key in ("dtype", "name"):
            if data.get(key):
                recipe[key] = data[key]
        return cls.from_dict(recipe, where=where)

    # ---- files --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> "PathRecipe":
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise RecipeError(f"{where}: invalid layer-path recipe: {validation_summary(e)}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    def to_mergekit(self, writers: dict[tuple[int, int], list[str]] | None = None) -> dict[str, Any]:
        """mergekit `passthrough` slices. mergekit takes the embedding from the first slice's model and the final
        norm and head from the last one's, and reads models from disk; scales need the names of the weights that
        write into the residual stream (`writers`, from `residual_writers`)."""
        merged = [p.label for p in self.models if p.model is None]
        if merged:
            raise RecipeError(
                f"participant(s) {merged} are merges held in memory; mergekit reads models from disk: write them "
                "with `evomerge merge` and name those directories as participants"
            )
        steps = self.steps()
        e, h = int(self.embed_model), self.head
        if steps[0][0] != e or steps[-1][0] != h:
            raise RecipeError(
                f"mergekit takes the embedding from the first slice's model and the head from the last one's; this "
                f"path starts in {self.models[steps[0][0]].label} and ends in {self.models[steps[-1][0]].label}, "
                f"its embedding comes from {self.models[e].label} and its head from {self.models[h].label}"
            )
        factors = fold_factors(steps)
        if self.tensor_scale and any(abs(f - 1.0) > 1e-12 for f in factors):
            raise RecipeError("a path with both residual-stream scales and tensor scales has no mergekit form")
        slices: list[dict[str, Any]] = []
        for k, (p, layer, _) in enumerate(steps):
            last = slices[-1] if slices else None
            if last is not None and last["_key"] == (p, factors[k]) and last["sources"][0]["layer_range"][1] == layer:
                last["sources"][0]["layer_range"][1] = layer + 1
                continue
            source: dict[str, Any] = {"model": self.models[p].model, "layer_range": [layer, layer + 1]}
            if abs(factors[k] - 1.0) > 1e-12:
                names = sorted(set((writers or {}).get((p, layer), [])))
                if not names:
                    raise RecipeError("a scaled path exports with the names of its residual-stream writers")
                source["parameters"] = {"scale": [{"filter": n, "value": factors[k]} for n in names] + [{"value": 1.0}]}
            slices.append({"_key": (p, factors[k]), "sources": [source]})
        for s in slices:
            s.pop("_key")
        config: dict[str, Any] = {"merge_method": "passthrough", "slices": slices, "dtype": self.dtype}
        if self.tensor_scale:  # mergekit matches filters as substrings of the output names: exact names here
            rules = [{"filter": n, "value": v} for n, v in sorted(self.tensor_scale.items())]
            config["parameters"] = {"scale": rules + [{"value": 1.0}]}
        return config


def _passthrough_scales(slices: list[dict], settings: list[Any]) -> dict[str, float]:
    """Output tensor name → mergekit passthrough's `scale` for it, where it is not 1: layer i of an n-layer slice read
    at t = i/(n−1) (1 for a one-layer slice), the embeddings with the first slice's setting and the final norm and
    head with the last one's, at t = 0 — as mergekit plans them. Filters are substrings of the output names."""
    from .checkpoint import Checkpoint
    from .layers import Layout

    scales: dict[str, float] = {}

    def put(name: str, setting: Any, t: float) -> None:
        value = mergekit_setting(setting, name, t)
        if value is not None and float(value) != 1.0:
            scales[name] = float(value)

    @functools.cache
    def placed(model: str) -> tuple[list[str], Layout]:  # a model's tensor names and layout, read once
        names = Checkpoint.open(model).tensor_names()
        return names, Layout.of(model, names)

    k = 0
    for piece, setting in zip(slices, settings):
        source = piece["sources"][0]
        start, stop = source["layer_range"]
        if setting is not None:
            names, layout = placed(source["model"])
            for j in range(start, stop):
                t = (j - start) / (stop - start - 1) if stop - start > 1 else 1.0
                for n in names:
                    if layout[n].layer == j:
                        head, rest = n.split(f".{j}.", 1)
                        put(f"{head}.{k + j - start}.{rest}", setting, t)
        k += stop - start
    for piece, setting, want in ((slices[0], settings[0], True), (slices[-1], settings[-1], False)):
        if setting is None:
            continue
        names, layout = placed(piece["sources"][0]["model"])
        for n in names:
            if layout[n].layer is None and (layout[n].group == "embed") == want:
                put(n, setting, 0.0)
    return scales


def load_any_recipe(path: str | os.PathLike) -> Recipe | PathRecipe | SlicedRecipe:
    """A recipe file: a layer path (`layer_path:`) or a parameter-space recipe / mergekit config (whose slices may
    take other layers or other models per slice: a `SlicedRecipe`)."""
    path = Path(path)
    data = read_yaml(path, "recipe")
    if isinstance(data, dict) and "layer_path" in data:
        return PathRecipe.from_dict(data, where=str(path))
    if isinstance(data, dict) and data.get("merge_method") == "passthrough" and "slices" in data:
        return PathRecipe.from_mergekit(data, where=str(path))
    if isinstance(data, dict) and "slices" in data:
        try:
            return Recipe.from_dict(data, where=str(path))
        except SlicesNotAligned:  # other layers or other models per slice
            return SlicedRecipe.from_mergekit(data, where=str(path))
    return Recipe.load(path)


def fold_factors(steps: list[tuple[int, int, float]]) -> list[float]:
    """Per step, the factor 1/c_k folded into the weights that write into the residual stream."""
    c, out = 1.0, []
    for _, _, s in steps:
        c *= s
        out.append(1.0 / c)
    return out


# ---- resident participants and the host model ------------------------------------------------------
def load_participants(recipe: PathRecipe, device: str | None = "cpu", dtype: str | torch.dtype = "float32"):
    """Each participant as a model on `device`; a merge participant is materialized once, in memory."""
    from transformers import AutoModelForCausalLM

    from .engine import Engine, parse_dtype, resolve_device

    dtype, device = parse_dtype(dtype), resolve_device(device)
    models = []
    for p in recipe.models:
        if p.model is not None:
            from .checkpoint import Checkpoint

            Checkpoint.open(p.model)  # one clear error for a missing or malformed directory
            models.append(AutoModelForCausalLM.from_pretrained(p.model, dtype=dtype).to(device).eval())
            continue
        ps = p.ps_recipe()
        if ps.base_model is None:
            raise RecipeError(f"participant {p.label}: a merge participant needs a base_model")
        engine = Engine(ps.base_model, [m.model for m in ps.source_entries()], device=device, dtype=dtype)
        model = engine.load_target_model()
        engine.materialize(ps, engine.bind(model))
        del engine
        models.append(model)
    return models


def layer_list_name(model: torch.nn.Module) -> str:
    """Qualified name of the model's decoder-layer list: the ModuleList of `num_hidden_layers` modules of one class."""
    n = model.config.num_hidden_layers
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == n and len({type(c) for c in m}) == 1
    ]
    if len(found) != 1:
        raise RecipeError(
            f"{type(model).__name__}: cannot tell its decoder layers ({len(found)} module lists of {n} layers: "
            f"{found}); layer paths need one"
        )
    return found[0]


def check_participants(models: list[torch.nn.Module], labels: list[str]) -> None:
    """Participants must share the architecture and every config value that shapes a layer."""
    first = _layer_config(models[0])
    for model, label in zip(models[1:], labels[1:]):
        other = _layer_config(model)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            shown = ", ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in diff[:4])
            raise RecipeError(
                f"participant {label} differs from {labels[0]} in {shown}: a layer path needs one architecture"
            )


def _layer_config(model: torch.nn.Module) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        **{k: v for k, v in model.config.to_dict().items() if k not in FREE_CONFIG_KEYS},
    }


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree that shares every parameter and buffer (and copies of the hook tables)."""
    new = copy.copy(module)
    _fresh_tables(new, module)
    new._modules = {k: _shallow(v) if v is not None else None for k, v in module._modules.items()}
    return new


class LayerPaths:
    """The participants' layers, and one host model (the embed participant's modules around a layer list) that
    each candidate path is installed into. The host object stays the same, so evaluators bound to it score
    whatever path is installed."""

    def __init__(
        self, participants: list[torch.nn.Module], labels: list[str], embed: int = 0, head: int | None = None
    ) -> None:
        check_participants(participants, labels)
        self.participants = participants
        self.list_name = layer_list_name(participants[embed])
        self.layers = [list(m.get_submodule(self.list_name)) for m in participants]
        self.num_layers = [len(layers) for layers in self.layers]
        self.host, self._list_parent = self._make_host(participants[embed])
        if head is not None and head != embed:
            self._swap_head(participants[head])

    def _swap_head(self, model: torch.nn.Module) -> None:
        """The modules after the layers (final norm, head) from another participant: every module outside the
        layer list whose parameters are not embeddings."""
        from .layers import tree_places

        places = tree_places(self.host)
        owners = {
            name.rsplit(".", 1)[0]
            for name, _ in self.host.named_parameters()
            if not name.startswith(self.list_name + ".") and places[name].group != "embed"
        }
        for owner in owners:
            parent, _, child = owner.rpartition(".")
            node = self.host.get_submodule(parent) if parent else self.host
            if node is not self.host and node not in _chain(self.host, self.list_name.split(".")[:-1]):
                raise RecipeError(f"cannot take {owner} from another participant: its parent is shared")
            node._modules[child] = model.get_submodule(owner)

    def _make_host(self, model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        """Copies of the modules from the root down to the layer list's parent, with a config of their own; every
        other module (embedding, norm, head, rotary tables) is the participant's own."""
        config = copy.deepcopy(model.config)
        host = copy.copy(model)
        _fresh_tables(host, model)
        node, orig = host, model
        parts = self.list_name.split(".")
        for part in parts[:-1]:
            child = copy.copy(orig._modules[part])
            _fresh_tables(child, orig._modules[part])
            node._modules[part] = child
            node, orig = child, orig._modules[part]
        for m in [host, *_chain(host, parts[:-1])]:
            if getattr(m, "config", None) is model.config:
                m.config = config
        return host, node

    def use(self, steps: list[tuple[int, int, float]]) -> torch.nn.Module:
        """Install a path (participant, layer, scale per step) into the host and return the host."""
        if not steps:
            raise RecipeError("a layer path needs at least one step")
        for p, layer, _ in steps:
            if not 0 <= p < len(self.layers) or not 0 <= layer < self.num_layers[p]:
                raise RecipeError(f"step ({p}, {layer}) names no layer (participants have {self.num_layers} layers)")
        built = []
        for k, (p, layer, scale) in enumerate(steps):
            copied = _shallow(self.layers[p][layer])
            for m in copied.modules():
                if hasattr(m, "layer_idx"):
                    m.layer_idx = k  # its own KV-cache entry, even where the same layer appears twice
            if scale != 1.0:
                copied.register_forward_pre_hook(_scaler(scale), with_kwargs=True)
            built.append(copied)
        self._list_parent._modules[self.list_name.split(".")[-1]] = torch.nn.ModuleList(built)
        config = self.host.config
        config.num_hidden_layers = len(steps)
        if getattr(self.participants[0].config, "layer_types", None) is not None:
            config.layer_types = [self.participants[p].config.layer_types[layer] for p, layer, _ in steps]
        return self.host

    def identity(self, participant: int) -> list[tuple[int, int, float]]:
        """The path that is a participant's own layers in order."""
        return [(participant, i, 1.0) for i in range(self.num_layers[participant])]


def _scaler(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


def _fresh_tables(new: torch.nn.Module, orig: torch.nn.Module) -> None:
    """A copied module's own tables (children, parameters, buffers, hooks): changing them leaves `orig` as it is."""
    for key, value in orig.__dict__.items():
        if isinstance(value, dict) and key.startswith("_"):
            new.__dict__[key] = type(value)(value)


def _chain(root: torch.nn.Module, parts: list[str]) -> list[torch.nn.Module]:
    out, node = [], root
    for part in parts:
        node = node._modules[part]
        out.append(node)
    return out
