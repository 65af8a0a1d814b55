"""The data-flow-space (DFS) genome of Akiba et al. 2024 (§3.2): which layers a token passes through, and with what
scale of the residual stream.

The participants' layers are laid out in order (all of the first model's, then the next model's: M in all) and
repeated `repeats` (r) times, T = M·r slots. Each slot has an indicator gene and is part of the path when it is
> 0; the path visits the included slots in order, so any layer can appear up to r times and the search is over
2^T paths instead of (M + 1)^T arbitrary sequences. The residual stream entering a step is multiplied by a
scale that depends on the layer it comes from and the one it enters:
- `scales: pairs` — the paper's M×M matrix W, one gene per (from-layer, to-layer) pair;
- `scales: models` (default) — one gene per (from-model, to-model) pair; a model's own next layer (the data
  flow it was trained on) keeps scale 1. Two 32-layer participants give 4 scale genes instead of 4,096;
- `scales: none` — every scale 1.
The first step's scale is 1 (the embedding enters as it was trained). The initial point is the first
participant's own layers (a path equal to that model).

A space with `ps:` (a parameter-space space file) is PS+DFS: the PS search runs first and its best merge joins
the participants ahead of the sources (`search` and `demo` do this).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RecipeError, validation_summary
from .layer_path import Participant, PathRecipe
from .recipe import read_yaml
from .space import Gene, GeneVector, SearchSpace


class DFSGenes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repeats: int = 3
    scales: Literal["pairs", "models", "none"] = "models"
    scale_low: float = 0.5
    scale_high: float = 2.0

    @model_validator(mode="after")
    def _check(self) -> "DFSGenes":
        if self.repeats < 1:
            raise ValueError(f"repeats must be ≥ 1, got {self.repeats}")
        if not 0 < self.scale_low < 1 < self.scale_high:
            raise ValueError(f"scales need 0 < scale_low < 1 < scale_high, got [{self.scale_low}, {self.scale_high}]")
        return self


class PathSpace(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    dfs: DFSGenes = Field(default_factory=DFSGenes)
    ps: str | None = None  # a parameter-space space file searched first (PS+DFS); relative to this file
    participants: list[Participant] = Field(default_factory=list)  # set when bound to models (search, demo)
    embed_model: int = 0
    dtype: str = "float32"
    seed: int = 0  # recorded with the run like a parameter-space space's; a layer path draws nothing at random

    def ps_space(self) -> SearchSpace | None:
        return SearchSpace.load(self.ps) if self.ps else None

    def bind(self, num_layers: list[int]) -> "BoundPathSpace":
        if not self.participants:
            raise RecipeError(f"space {self.name}: no participants (search binds the sources and the PS merge)")
        if len(num_layers) != len(self.participants):
            raise RecipeError(f"space {self.name}: {len(self.participants)} participants, {len(num_layers)} models")
        return BoundPathSpace(self, [p.label for p in self.participants], num_layers)


def load_space(path: str | os.PathLike) -> SearchSpace | PathSpace:
    """A search space file: a layer-path (DFS) space when it has `dfs:`, else a parameter-space one."""
    path = Path(path)
    data = read_yaml(path, "search space")
    if not (isinstance(data, dict) and "dfs" in data):
        return SearchSpace.load(path)
    if data.get("ps"):
        data["ps"] = str((path.parent / data["ps"]).resolve())
    try:
        space = PathSpace.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{path}: invalid search space: {validation_summary(e)}") from None
    space.ps_space()  # a PS stage that cannot load fails now, naming its file
    return space


def space_from_dict(data: dict[str, Any]) -> SearchSpace | PathSpace:
    return PathSpace.model_validate(data) if "dfs" in data else SearchSpace.model_validate(data)


class BoundPathSpace(GeneVector):
    """The DFS genome over participants with the given layer counts."""

    def __init__(self, space: PathSpace, labels: list[str], num_layers: list[int]) -> None:
        self.space = space
        self.labels = labels
        self.num_layers = num_layers
        self.layers = [(p, i) for p, n in enumerate(num_layers) for i in range(n)]  # global layer index → (p, i)
        e = space.embed_model
        genes = [
            Gene(f"on@{t}", -1.0, 1.0, 0.5 if t < len(self.layers) and self.layers[t][0] == e else -0.5)
            for t in range(len(self.layers) * space.dfs.repeats)
        ]
        s = space.dfs
        if s.scales == "pairs":
            genes += [
                Gene(f"scale@{self._layer_name(a)}>{self._layer_name(b)}", s.scale_low, s.scale_high, 1.0, log=True)
                for a in range(len(self.layers))
                for b in range(len(self.layers))
            ]
        elif s.scales == "models":
            genes += [Gene(f"scale@{a}>{b}", s.scale_low, s.scale_high, 1.0, log=True) for a in labels for b in labels]
        self.genes = genes
        self.by_name = {g.name: g for g in genes}

    def _layer_name(self, g: int) -> str:
        p, i = self.layers[g]
        return f"{self.labels[p]}.{i}"

    def _scale(self, params: dict[str, Any], a: int, b: int) -> float:
        """Scale of the residual stream going from global layer a into global layer b."""
        mode = self.space.dfs.scales
        (pa, ia), (pb, ib) = self.layers[a], self.layers[b]
        if mode == "pairs":
            return float(params[f"scale@{self._layer_name(a)}>{self._layer_name(b)}"])
        if mode == "models" and not (pa == pb and ib == ia + 1):
            return float(params[f"scale@{self.labels[pa]}>{self.labels[pb]}"])
        return 1.0

    def decode(self, params: dict[str, Any], name: str | None = None) -> PathRecipe:
        """Deterministic: the included slots in order, each with the scale of its incoming transition."""
        self.missing(params)
        M = len(self.layers)
        chosen = [t % M for t in range(M * self.space.dfs.repeats) if float(params[f"on@{t}"]) > 0]
        if not chosen:
            raise RecipeError("no slot of the layer path is included (every indicator gene ≤ 0)")
        steps = []
        for k, g in enumerate(chosen):
            p, i = self.layers[g]
            scale = 1.0 if k == 0 else self._scale(params, chosen[k - 1], g)
            steps.append({"model": p, "layer": i, "scale": scale})
        return PathRecipe(
            models=self.space.participants,
            layer_path=steps,
            embed_model=self.space.embed_model,
            dtype=self.space.dtype,
            name=name,
        )
