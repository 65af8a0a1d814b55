"""Folding a layer path into an ordinary checkpoint.

A step's scale s_k multiplies the residual stream entering it. A pre-norm layer reads the stream only through
norms, which are invariant to its scale, so the written model can carry the stream divided by c_k = s_1 ⋯ s_k
after step k: the weights that write into the stream at step k (attention and MLP output projections) are
multiplied by 1/c_k, and every norm sees the same direction as in memory. Exact up to the norms' ε (it only
matters where the stream's mean square is near ε, e.g. an untrained model's embedding). Which modules write
into the stream, and that a layer folds exactly, is measured on the model itself (`residual_writers`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RecipeError
from .layer_path import (
    LayerPaths,
    PathRecipe,
    check_participants,
    fold_factors,
    layer_list_name,
    load_participants,
)
from .layers import Layout

log = logging.getLogger(__name__)


# ---- which weights write into the residual stream ---------------------------------------------------
def residual_writers(model: torch.nn.Module, list_name: str) -> dict[int, list[str]]:
    """Per layer, the submodules whose outputs add up to the layer's update of the residual stream, measured on a
    probe input: their parameters scale that update. Raises RecipeError where a layer does not fold exactly."""
    layers = list(model.get_submodule(list_name))
    seen: dict[int, dict[str, Any]] = {i: {"outputs": {}} for i in range(len(layers))}
    hooks = []

    def on_layer(i):
        def pre(module, args, kwargs):
            seen[i]["args"], seen[i]["kwargs"] = args, dict(kwargs)

        def post(module, args, kwargs, output):
            seen[i]["out"] = output[0] if isinstance(output, tuple) else output

        return pre, post

    for i, layer in enumerate(layers):
        pre, post = on_layer(i)
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.register_forward_hook(post, with_kwargs=True))
        for name, sub in layer.named_modules():
            if name and any(True for _ in sub.parameters(recurse=False)):
                hooks.append(sub.register_forward_hook(_record(seen[i]["outputs"], name)))
    probe = torch.arange(1, 9, device=next(model.parameters()).device)[None] % model.config.vocab_size
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        return {i: _writers_of(layers[i], seen[i], f"{type(model).__name__} layer {i}") for i in range(len(layers))}


def _record(store: dict, name: str):
    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            store[name] = (args, output)

    return hook


def _writers_of(layer: torch.nn.Module, seen: dict[str, Any], where: str) -> list[str]:
    """The modules whose outputs add up to the layer's update, checked to fold exactly: with their parameters
    times ½ the layer maps x to what it maps 2x to, halved (norm ε aside, which only keeps a norm finite at 0)."""
    args, kwargs = seen["args"], seen["kwargs"]
    x = args[0] if args else kwargs["hidden_states"]
    update = seen["out"] - x
    candidates = [n for n, (_, out) in seen["outputs"].items() if out.shape == update.shape]
    tol = 1e-4 * float(update.abs().max()) + 1e-7
    for size in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            if float((sum(seen["outputs"][n][1] for n in subset) - update).abs().max()) <= tol:
                if _folds_exactly(layer, subset, x, args, kwargs):
                    return list(subset)
                raise RecipeError(
                    f"{where}: scaling its input is not undone by scaling {list(subset)} (not a pre-norm layer?); "
                    "residual-stream scales cannot be folded into its weights"
                )
    raise RecipeError(
        f"{where}: its update of the residual stream is not the sum of some of its modules' outputs "
        f"(looked at {candidates}); residual-stream scales cannot be folded into its weights"
    )


def _folds_exactly(layer: torch.nn.Module, writers: tuple[str, ...], x, args, kwargs) -> bool:
    def run(params: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        call_args, call_kwargs = ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
        out = torch.func.functional_call(layer, params, call_args, call_kwargs)
        return out[0] if isinstance(out, tuple) else out

    halved = {f"{w}.{n}": p * 0.5 for w in writers for n, p in layer.get_submodule(w).named_parameters(recurse=False)}
    with _without_norm_epsilon(layer):
        doubled_then_halved = run({}, x * 2.0) * 0.5
        folded = run(halved, x)
    scale = float(doubled_then_halved.abs().max())
    return bool(torch.allclose(folded, doubled_then_halved, rtol=1e-4, atol=1e-5 * scale + 1e-9))


@contextlib.contextmanager
def _without_norm_epsilon(layer: torch.nn.Module):
    """Norms' ε set to 0 for a while (RMSNorm's `variance_epsilon`, LayerNorm's `eps`)."""
    saved = [
        (m, attr, getattr(m, attr))
        for m in layer.modules()
        for attr in ("variance_epsilon", "eps", "epsilon")
        if isinstance(getattr(m, attr, None), float)
    ]
    try:
        for m, attr, _ in saved:
            setattr(m, attr, 0.0)
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


# ---- writing a path as an ordinary checkpoint --------------------------------------------------------
def write_path(
    recipe: PathRecipe,
    out_dir: str | os.PathLike,
    device: str | None = "cpu",
    out_dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a layer path as an HF model directory that `AutoModelForCausalLM` loads without custom code."""
    from .checkpoint import Checkpoint, check_output_dir, write_model_dir
    from .engine import model_card_text, parse_dtype, resolve_device, set_config_dtype

    check_output_dir(out_dir, overwrite)
    final = parse_dtype(out_dtype or recipe.dtype)
    models = load_participants(recipe, resolve_device(device), recipe.dtype)
    labels = [p.label for p in recipe.models]
    paths = LayerPaths(models, labels, int(recipe.embed_model), recipe.head)
    steps = recipe.steps()
    paths.use(steps)
    factors = fold_factors(steps)
    writers = writers_of_scaled(models, paths.list_name, steps)
    e = int(recipe.embed_model)
    home = recipe.models[e].directory()
    names = Checkpoint.open(home).tensor_names()
    layout = Layout.of(home, names)
    states = [m.state_dict() for m in models]
    prefix = paths.list_name + "."
    tensors: dict[str, tuple[int, torch.Tensor | None, float]] = {}
    for n in names:  # outside the layers: embeddings from embed_model, final norm and head from head_model
        if not n.startswith(prefix):
            owner = e if layout[n].group == "embed" else recipe.head
            tensors[n] = (owner, states[owner][n], recipe.tensor_scale.get(n, 1.0))
    for k, (p, layer, _) in enumerate(steps):
        own = f"{prefix}{layer}."
        scaled = {f"{w}." for w in writers.get((p, layer), [])}
        for n in names:
            if n.startswith(own):
                rest = n[len(own) :]
                factor = factors[k] if any(rest.startswith(w) for w in scaled) else 1.0
                if n not in states[p]:
                    raise CheckpointError(f"{labels[p]} has no parameter {n} in memory; cannot write the path")
                out = f"{prefix}{k}.{rest}"
                tensors[out] = (p, states[p][n], factor * recipe.tensor_scale.get(out, 1.0))
    unknown = sorted(set(recipe.tensor_scale) - set(tensors))
    if unknown:
        raise RecipeError(f"tensor_scale names tensors the written model does not have: {unknown[:3]}")

    def produce(name: str) -> torch.Tensor:
        _, t, factor = tensors[name]
        # a copy even when unscaled: a layer used twice must not be one storage under two names in a shard
        return t * factor if factor != 1.0 and t.is_floating_point() else t.clone()

    config = set_config_dtype(models[e].config.to_dict(), final)
    config["num_hidden_layers"] = len(steps)
    if getattr(paths.host.config, "layer_types", None) is not None:
        config["layer_types"] = paths.host.config.layer_types
    shapes = {n: (tuple(t.shape), final if t.is_floating_point() else t.dtype) for n, (_, t, _) in tensors.items()}
    path_text = "".join(f"| {k} | {labels[p]} | {layer} | {s:g} |\n" for k, (p, layer, s) in enumerate(steps))
    card = (
        f"## Layer path\n\n{len(steps)} layers; embedding from {labels[e]}, final norm and head from "
        f"{labels[recipe.head]}. Residual-stream scales are folded into the output projections.\n\n"
        "| step | model | layer | scale |\n|---|---|---|---|\n"
        f"{path_text}\n"
    )
    if recipe.tensor_scale:
        card += f"{len(recipe.tensor_scale)} tensors are written scaled (mergekit passthrough's `scale`).\n\n"
    log.info("writing a %d-step layer path into %s", len(steps), out_dir)
    return write_model_dir(
        out_dir,
        shapes,
        produce,
        config,
        copy_from=Path(home),
        model_card=model_card_text(
            recipe.name or "Layer-path merge", [p.directory() for p in recipe.models], card, recipe.to_yaml()
        ),
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
    )


def writers_of_scaled(
    models: list[torch.nn.Module], list_name: str, steps, measured: dict[int, dict[int, list[str]]] | None = None
) -> dict[tuple[int, int], list[str]]:
    """(participant, layer) → its residual-stream writers, for the participants of steps whose factor is not 1;
    `measured` keeps each participant's measurement for the next call."""
    measured = {} if measured is None else measured
    scaled = sorted({p for (p, _, _), f in zip(steps, fold_factors(steps)) if f != 1.0})
    for p in scaled:
        if p not in measured:
            measured[p] = residual_writers(models[p], list_name)
    return {(p, layer): names for p in scaled for layer, names in measured[p].items()}


def path_to_mergekit(
    recipe: PathRecipe,
    models: list[torch.nn.Module] | None = None,
    measured: dict[int, dict[int, list[str]]] | None = None,
) -> dict[str, Any]:
    """The recipe as mergekit passthrough slices. A scaled path needs the weights its scales fold into, measured on
    its participants: `models` when resident (a search), else loaded here."""
    steps = recipe.steps()
    if all(f == 1.0 for f in fold_factors(steps)) or any(p.model is None for p in recipe.models):
        return recipe.to_mergekit({})  # nothing to measure, or an error that needs no model
    if models is None:
        models = load_participants(recipe)
        check_participants(models, [p.label for p in recipe.models])
    list_name = layer_list_name(models[int(recipe.embed_model)])
    return recipe.to_mergekit(writers_of_scaled(models, list_name, steps, measured))
