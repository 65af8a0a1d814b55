"""Checkpoint tensor names ↔ a loaded model's parameters.

transformers 5 converts some checkpoints while loading them (its conversion mapping): it renames prefixes
(Gemma-3's `language_model.model.*` → `model.language_model.*`, ViT's `attention.attention.query` → `q_proj`),
and fuses MoE experts (Mixtral's `experts.N.w1/w3` → one `gate_up_proj` tensor). A merge is computed per
checkpoint tensor, as mergekit computes it, so the search writes each result into the part of a parameter that
tensor became: here, a view. The mapping is transformers' own (`revert_weight_conversion`, what `save_pretrained`
writes), read off by converting index tensors, never by guessing from names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class Piece:
    """Where a checkpoint tensor lives in a loaded model: a parameter (or buffer), whole or a strided view of it."""

    param: str
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None  # (shape, strides, offset); None: the whole


def checkpoint_pieces(model: torch.nn.Module, views: bool = True) -> dict[str, Piece]:
    """Every tensor name a checkpoint of `model` holds → its piece of the model (the model may be on meta).
    `views=False`: which parameter only, without following the elements through the conversion (a fused MoE
    parameter's probe holds one int32 per element for a moment: gigabytes for a large MoE)."""
    shells = {n: torch.empty_like(t, device="meta") for n, t in model.state_dict().items()}
    renamed = _revert(model, shells)
    by_shell = {id(t): n for n, t in shells.items()}
    pieces = {disk: Piece(by_shell[id(t)]) for disk, t in renamed.items() if id(t) in by_shell}
    kept = {id(t) for t in renamed.values()}
    cut: dict[tuple, list[tuple]] = {}  # the same converter on the same shape cuts the same views
    for name, shell in shells.items():
        if id(shell) in kept:
            continue
        key = (re.sub(r"\d+", "#", name), tuple(shell.shape))
        if views and key not in cut:
            cut[key] = [_strides(t) for t in _revert(model, {name: _index(shell)}).values()]
        outputs = list(_revert(model, {name: shell}))
        for disk, view in zip(outputs, cut[key] if views else [None] * len(outputs), strict=True):
            pieces[disk] = Piece(name, view)
    return pieces


def checkpoint_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor name a checkpoint of `model` holds → a writable view of the model's storage holding it."""
    state = {n: t.data if isinstance(t, torch.nn.Parameter) else t for n, t in model.state_dict(keep_vars=True).items()}
    views = {}
    for disk, piece in checkpoint_pieces(model).items():
        t = state[piece.param]
        if piece.view is None:
            views[disk] = t
        else:
            shape, strides, offset = piece.view
            views[disk] = t.as_strided(shape, strides, t.storage_offset() + offset)
    return views


def _revert(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4 loads checkpoint names as they are
        return dict(state)

    return revert_weight_conversion(model, dict(state))


def _index(t: torch.Tensor) -> torch.Tensor:
    """Each element's flat position, to be followed through a conversion (int32 when it fits: half the memory of
    a fused MoE parameter's probe)."""
    return torch.arange(t.numel(), dtype=torch.int32 if t.numel() < 2**31 else torch.int64).reshape(t.shape)


def _strides(index: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(shape, strides, offset) of the view whose elements are the positions in `index`; refuses any other map."""
    flat = index.reshape(-1).long()
    shape = tuple(index.shape)
    strides = []
    for d, size in enumerate(shape):
        step = [0] * len(shape)
        step[d] = 1 if size > 1 else 0
        strides.append(int(index[tuple(step)].item() - flat[0].item()) if size > 1 else 1)
    offset = int(flat[0])
    expected = torch.arange(int(flat.max()) + 1).as_strided(shape, strides, offset) if flat.numel() else flat
    if not torch.equal(expected.reshape(-1), flat):
        raise CheckpointError(
            f"transformers loads a checkpoint tensor of shape {list(shape)} into a parameter in a way evomerge cannot "
            "write in place (not a strided view of it)"
        )
    return shape, tuple(strides), offset
