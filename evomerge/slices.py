"""mergekit's `slices:` form in full: each slice merges its own sources, each source's layers from its own
`layer_range`, into the next layers of the output, which has as many layers as the slices together.

Two shapes of it are other things: one merge over the whole stack (every slice merging the same models over the
same layers, in order) is a plain recipe (`recipe._slices_as_models`), and `passthrough` slices are layer paths
(`layer_path.py`). Everything else is merged here as mergekit 0.1.5 plans it: output layer m of a slice reads
layer `layer_range[0] + m` of each of the slice's sources and merges them with the slice's settings at
t = m/(n−1) (1 for a one-layer slice); the embeddings are merged from the first slice's sources, the tensors after
the last layer from the last slice's, with settings at t = 0. The architecture, config and tokenizer are those
of the config's base model, else the first slice's first source, with `num_hidden_layers` the slices' total.
One quirk is kept, with a warning: mergekit pairs the last slice's sources with as many weights as the first slice
has sources, so a last slice with more sources leaves its extra ones out of the final norm and head. Each slice is
a `Recipe` over its own sources with its settings resolved per output layer, and the output is written one tensor
at a time (`engine.merge_tensor`), holding a tensor per model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import RecipeError
from .layers import Layout, TensorInfo
from .recipe import Recipe, atomic_write_text, slice_settings

log = logging.getLogger(__name__)

SLICE_KEYS = {"sources", "base_model", "parameters"}
TOP_KEYS = {"merge_method", "slices", "base_model", "parameters", "dtype", "out_dtype", "name", "seed", "tie_order"}


@dataclasses.dataclass
class Slice:
    recipe: Recipe  # the slice's merge over its sources, its settings resolved per output layer
    start: int  # its first output layer
    length: int
    first_layer: dict[str, int]  # model → its layer for the slice's first output layer


class SlicedRecipe:
    """A mergekit config in the `slices:` form that is neither one merge of the whole stack nor a passthrough."""

    def __init__(self, config: dict[str, Any], slices: list[Slice], reference: str, tail: Slice) -> None:
        self.config, self.slices, self.reference = config, slices, reference
        self.tail = tail  # what the tensors after the last layer merge (mergekit: the last slice's, see below)

    @property
    def num_layers(self) -> int:
        return sum(s.length for s in self.slices)

    @classmethod
    def from_mergekit(cls, data: dict[str, Any], where: str = "config") -> "SlicedRecipe":
        config = copy.deepcopy(data)
        unknown = set(config) - TOP_KEYS
        if unknown:
            raise RecipeError(
                f"{where}: {sorted(unknown)} with slices that take other layers or other models per slice are not "
                f"supported (known: {sorted(TOP_KEYS)}); the output keeps the reference model's tokenizer"
            )
        method, pieces = config.get("merge_method"), config["slices"]
        lengths = []
        for i, piece in enumerate(pieces):
            here = f"{where}: slice {i}"
            if not isinstance(piece, dict) or set(piece) - SLICE_KEYS or not isinstance(piece.get("sources"), list):
                raise RecipeError(f"{here}: a slice is {{sources: [{{model, layer_range, parameters}}], ...}}")
            spans = []
            for src in piece["sources"]:
                span = src.get("layer_range") if isinstance(src, dict) and "model" in src else None
                if not _is_range(span):
                    raise RecipeError(f"{here}: every source needs a model and a layer_range [first, end), got {src}")
                spans.append(span[1] - span[0])
            if not spans or len(set(spans)) != 1:
                raise RecipeError(f"{here}: its sources' layer ranges must be of one length, got {spans}")
            models = [src["model"] for src in piece["sources"]]
            if len(set(models)) != len(models):
                raise RecipeError(f"{here}: a model appears twice among its sources ({models})")
            lengths.append(spans[0])
        reference = config.get("base_model") or pieces[0]["sources"][0]["model"]
        from .checkpoint import Checkpoint

        names = Checkpoint.open(reference).tensor_names()
        layout = Layout.of(reference, names)
        outside = [n for n in names if layout[n].layer is None]
        top = {k: v for k, v in config.items() if k not in ("slices", "parameters", "base_model")}
        pre = [(name, layout[name], 0) for name in outside if layout[name].group == "embed"]
        post = [(name, layout[name], 0) for name in outside if layout[name].group != "embed"]

        def merged(i: int, piece: dict, start: int, n: int, outside: list) -> Slice:
            """Slice i as a recipe over its sources, settings resolved per output layer (and for `outside`)."""
            spans = [(0, start, n)] if n else []
            models, parameters = slice_settings(method, [piece], config.get("parameters") or {}, spans, outside)
            body = {**top, "base_model": piece.get("base_model") or config.get("base_model"), "models": models}
            recipe = Recipe.from_dict({**body, "parameters": parameters}, where=f"{where}: slice {i}")
            listed = {src["model"]: src["layer_range"][0] for src in piece["sources"]}
            if recipe.base_model is not None and recipe.base_model not in listed:
                raise RecipeError(
                    f"{where}: slice {i} merges onto {recipe.base_model}, which is not among its sources: list it "
                    "with the layer_range it gives the slice (as mergekit needs it)"
                )
            return Slice(recipe, start, n, listed)

        slices, start = [], 0
        for i, (piece, n) in enumerate(zip(pieces, lengths)):
            slices.append(merged(i, piece, start, n, pre if i == 0 else []))
            start += n
        # mergekit 0.1.5 pairs the last slice's sources with as many weights as the first slice has sources: the
        # tensors after the last layer merge only the last slice's first that many sources
        kept = pieces[-1]["sources"][: len(pieces[0]["sources"])]
        if len(kept) < len(pieces[-1]["sources"]):
            left = [src["model"] for src in pieces[-1]["sources"][len(kept) :]]
            log.warning(
                "%s: as mergekit 0.1.5 does, the final norm and head merge the last slice's first %d sources only "
                "(the first slice has %d); %s left out of them",
                where,
                len(kept),
                len(kept),
                ", ".join(left),
            )
        tail = merged(len(pieces) - 1, {**pieces[-1], "sources": kept}, start, 0, post)
        return cls(config, slices, reference, tail)

    # ---- files --------------------------------------------------------------------------------
    def to_mergekit(self) -> dict[str, Any]:
        return copy.deepcopy(self.config)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    # ---- writing ------------------------------------------------------------------------------
    def write(
        self,
        out_dir: str | os.PathLike,
        device: str | None = "cpu",
        out_dtype: str | None = None,
        allow_pickle: bool = False,
        overwrite: bool = False,
        max_shard_bytes: int = 2 * 1024**3,
    ) -> Path:
        """The merge as an HF model directory, one output tensor at a time."""
        from .checkpoint import Checkpoint, CheckpointError, check_output_dir
        from .engine import (
            _load,
            merge_dtypes,
            merge_tensor,
            model_card_text,
            resolve_device,
            set_config_dtype,
            write_streamed,
        )

        check_output_dir(out_dir, overwrite)
        dev = resolve_device(device)
        paths = list(dict.fromkeys([self.reference, *(m for s in (*self.slices, self.tail) for m in s.first_layer)]))
        opened = {p: Checkpoint.open(p, allow_pickle=allow_pickle) for p in paths}
        reference = opened[self.reference]
        names = reference.tensor_names()
        layout = Layout.of(reference.path, names)
        if set(layout.towers) - {None}:
            raise RecipeError(f"{self.reference}: slices of other layers need a model with one stack of layers")
        plan = self._tensor_plan(layout, names)
        for out, (_, inputs, _, like) in plan.items():
            for p, name in inputs.items():
                if name not in opened[p].weight_map:
                    raise CheckpointError(f"{p} has no tensor {name} (output {out}): check the slices' layer ranges")
                if opened[p].shape(name) != reference.shape(like):
                    raise CheckpointError(
                        f"{p}: {name} has shape {opened[p].shape(name)}, {self.reference}'s {like} "
                        f"{reference.shape(like)}: these models do not merge"
                    )
        first = self.slices[0].recipe
        work, final, mixed = merge_dtypes(first, list(opened.values()), out_dtype)
        if mixed:
            log.warning("The models are stored in different dtypes (%s): merged in %s", mixed, work)

        def merged(name: str) -> torch.Tensor:
            piece, inputs, info, _ = plan[name]
            recipe = piece.recipe
            base = recipe.base_model
            b = _load(opened[base], inputs[base], dev, work) if base else None
            tensors = [_load(opened[e.model], inputs[e.model], dev, work) for e in recipe.source_entries()]
            return merge_tensor(recipe, recipe.plan(info), name, b, tensors)

        kinds = {like: reference.get(like).dtype for *_, like in plan.values()}
        shapes = {}
        for n, (*_, like) in plan.items():
            shapes[n] = (reference.shape(like), final if kinds[like].is_floating_point else kinds[like])
        config = set_config_dtype(dict(reference.config), final)
        config["num_hidden_layers"] = self.num_layers
        if isinstance(config.get("layer_types"), list):  # each output layer's kind is its reference layer's
            layer_types = config["layer_types"]
            config["layer_types"] = [
                layer_types[s.first_layer.get(self.reference, next(iter(s.first_layer.values()))) + m]
                for s in self.slices
                for m in range(s.length)
            ]
        table = "".join(
            f"| {s.start}–{s.start + s.length - 1} | "
            + ", ".join(f"{Path(p).name} {first}–{first + s.length - 1}" for p, first in s.first_layer.items())
            + " |\n"
            for s in self.slices
        )
        card = f"## Slices\n\n{self.num_layers} layers.\n\n| output layers | sources (layers) |\n|---|---|\n{table}\n"
        log.info("merging %d slices (%s) into %s", len(self.slices), first.merge_method, out_dir)
        return write_streamed(
            out_dir,
            shapes,
            merged,
            list(opened.values()),
            config,
            copy_from=Path(reference.path),
            model_card=model_card_text(self.config.get("name") or "Sliced merge", paths, card, self.to_yaml()),
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
        )

    def _tensor_plan(
        self, layout: Layout, names: list[str]
    ) -> dict[str, tuple[Slice, dict[str, str], TensorInfo, str]]:
        """Output tensor → (its slice, model → the input tensor it reads, its place in the output, the reference's
        tensor of its shape). Layer tensors are renamed by their layer index, after the layer list's prefix."""
        prefix = _layer_prefix(layout, names)
        within = [n[len(f"{prefix}0.") :] for n in names if layout[n].layer == 0]
        plan = {}
        for n in names:
            if layout[n].layer is None:
                owner = self.slices[0] if layout[n].group == "embed" else self.tail
                plan[n] = (owner, {m: n for m in owner.first_layer}, layout[n], n)
        for piece in self.slices:
            for m in range(piece.length):
                o = piece.start + m
                for rest in within:
                    out, like = f"{prefix}{o}.{rest}", f"{prefix}0.{rest}"
                    inputs = {p: f"{prefix}{first + m}.{rest}" for p, first in piece.first_layer.items()}
                    place = dataclasses.replace(layout[like], name=out, layer=o, depth=self.num_layers)
                    plan[out] = (piece, inputs, place, like)
        return plan


def _is_range(span: Any) -> bool:
    return (
        isinstance(span, list) and len(span) == 2 and all(isinstance(x, int) for x in span) and 0 <= span[0] < span[1]
    )


def _layer_prefix(layout: Layout, names: list[str]) -> str:
    """What the layer tensors' names have before their layer index ("model.layers."), read from their places."""
    found = set()
    for n in names:
        layer = layout[n].layer
        if layer is not None:
            m = re.match(rf"(.*?\.)?{layer}\.", n)
            found.add(m.group(1) or "" if m else None)
    if len(found) != 1 or None in found:
        raise RecipeError(
            f"the layer tensors' names have no one prefix before their layer index: {sorted(map(str, found))}"
        )
    return found.pop()
