"""Each checkpoint tensor's place in its model: tower, layer within the tower, role, depth position.

Read from the architecture's module tree, built once on the meta device from the model's config:
- layers are the elements of the outermost module lists of blocks; each such list is a tower (a decoder-only
  LM has one; T5/BART an encoder and a decoder; Gemma-3 a vision and a text tower), with its own depth;
- roles: `norm` (a normalization module), `attn` (inside an attention module of a layer), `mlp` (the rest of a
  layer: the whole feed-forward sub-layer, MoE experts and router included, with part `experts` / `router`),
  `embed` (an embedding table, or anything before its tower's first layer), `head` (after its tower's last
  layer); `other` for what lies between the towers (a multimodal projector) or is held by a module around the
  layers (BART's logits bias), where the tree does not say which end it acts at;
- checkpoint names become parameters the way transformers converts them (`names.checkpoint_pieces`).
Where the tree cannot be built (a class transformers does not know), names are read by pattern instead, with a
warning naming what could not be placed.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable

import torch

log = logging.getLogger(__name__)

GROUPS = ("embed", "attn", "mlp", "norm", "head", "other")
PARTS = ("experts", "router")  # parts of an MoE feed-forward sub-layer, addressable apart
TOWER_ALIASES = {"language_model": "text", "text_model": "text", "vision_tower": "vision", "vision_model": "vision"}

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer|decoder_layers)\.(\d+)\.")
_RULES = [
    ("norm", re.compile(r"(norm|ln_\d|ln_f|layernorm)", re.I)),
    ("embed", re.compile(r"(embed_tokens|wte|wpe|word_embeddings|embed_positions|embeddings)", re.I)),
    ("head", re.compile(r"(lm_head|output\.weight$|score\.weight$)", re.I)),
    ("attn", re.compile(r"(self_attn|attention|\.attn\.|q_proj|k_proj|v_proj|o_proj|c_attn)", re.I)),
    ("mlp", re.compile(r"(mlp|feed_forward|ffn|gate_proj|up_proj|down_proj|experts)", re.I)),
]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    layer: int | None  # index within its tower; None for tensors outside the repeated blocks
    group: str  # the role: one of GROUPS
    tower: str | None = None  # None in a one-tower model
    depth: int | None = None  # layers in its tower
    part: str | None = None  # "experts" or "router" inside an MoE mlp

    def roles(self) -> set[str]:
        """What a role filter may name to reach this tensor: its role, and its MoE part."""
        return {self.group, self.part} - {None}

    def t(self, num_layers: int | None = None) -> float:
        """Position along its tower's depth in [0, 1] where gradient lists are read, as mergekit 0.1.5 reads
        them: layer i → i/(L−1); every tensor outside the layers (embeddings, and also the final norm and head
        after the last layer) at 0 — `plan_module` reads them with `ConfigReader(t=0)`."""
        n = self.depth if self.depth is not None else num_layers
        if self.layer is None or not n or n <= 1:
            return 0.0
        return self.layer / (n - 1)


def classify(name: str) -> TensorInfo:
    """A tensor's place read from its name alone: the fallback for models whose module tree is unknown."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for group, pattern in _RULES:
        if pattern.search(name):
            return TensorInfo(name, layer, group)
    return TensorInfo(name, layer, "other")


def infer_num_layers(names: list[str]) -> int:
    layers = [info.layer for info in map(classify, names) if info.layer is not None]
    return max(layers) + 1 if layers else 0


class Layout:
    """The TensorInfo of each tensor of one model's checkpoint, and the depth of each of its towers."""

    def __init__(self, infos: dict[str, TensorInfo]) -> None:
        self.infos = infos
        self.towers: dict[str | None, int] = {}
        for info in infos.values():
            if info.layer is not None:
                self.towers[info.tower] = max(self.towers.get(info.tower, 0), info.layer + 1)

    def __getitem__(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        return info if info is not None else classify(name)

    @property
    def num_layers(self) -> int:
        """The deepest tower's depth (a one-tower model's number of layers)."""
        return max(self.towers.values(), default=0)

    @classmethod
    def by_name(cls, names: Iterable[str], depth: int | None = None) -> "Layout":
        """Places read from names alone (the fallback), in a model of `depth` layers (default: as the names say)."""
        names = list(names)
        depth = depth or infer_num_layers(names)
        return cls({n: TensorInfo(n, i.layer, i.group, depth=depth) for n, i in zip(names, map(classify, names))})

    @classmethod
    def of(cls, model_dir: str | os.PathLike, names: Iterable[str]) -> "Layout":
        """The layout of the checkpoint in `model_dir` (its tensors `names`), from its architecture's tree."""
        names = list(names)
        config = os.path.join(os.path.realpath(model_dir), "config.json")
        structure = _structure(os.path.dirname(config), os.stat(config).st_mtime_ns if os.path.exists(config) else 0)
        if structure is None:
            return cls.by_name(names)
        unplaced = [n for n in names if n not in structure]
        if unplaced:
            log.warning(
                "%s: %d tensor(s) not found in the model's module tree, placed by name: %s",
                model_dir,
                len(unplaced),
                ", ".join(unplaced[:5]) + (" …" if len(unplaced) > 5 else ""),
            )
        fallback = cls.by_name(unplaced).infos if unplaced else {}
        return cls({n: structure[n] if n in structure else fallback[n] for n in names})


@functools.lru_cache(maxsize=16)
def _structure(model_dir: str, config_mtime: int) -> dict[str, TensorInfo] | None:
    """(Cached per model directory and config version.)"""
    model = skeleton(model_dir)
    if model is None:
        return None
    from .names import checkpoint_pieces

    try:
        places = tree_places(model)
        pieces = checkpoint_pieces(model, views=False)
        return {disk: _renamed(places[piece.param], disk) for disk, piece in pieces.items()}
    except Exception as e:  # noqa: BLE001 — as when the tree cannot be built: fall back to names, and say so
        return _fall_back(model_dir, "read", e)


def _fall_back(model_dir: str, what: str, e: Exception) -> None:
    first = str(e).splitlines()[0] if str(e) else ""
    log.warning(
        "%s: the module tree could not be %s (%s: %s); layers and roles are read from tensor names",
        model_dir,
        what,
        type(e).__name__,
        first,
    )


def _renamed(info: TensorInfo, name: str) -> TensorInfo:
    return TensorInfo(name, info.layer, info.group, info.tower, info.depth, info.part)


def skeleton(model_dir: str) -> torch.nn.Module | None:
    """The model's architecture on the meta device (no memory, no weights), or None with a warning."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            if model_class is not None:
                return model_class._from_config(config)
            from .evaluate.heads import auto_class, model_head

            head = model_head(model_dir)  # no class named: the head its model type has, else the bare model
            return (auto_class(head) if head else transformers.AutoModel).from_config(config)
    except Exception as e:  # noqa: BLE001 — any failure means: fall back to names, and say so
        return _fall_back(model_dir, "built", e)


def tree_places(model: torch.nn.Module) -> dict[str, TensorInfo]:
    """Every state-dict entry of `model` (in-memory names) → its TensorInfo, from the module tree alone."""
    modules = dict(model.named_modules())
    lists = [p for p, m in modules.items() if _is_block_list(m)]
    towers = [p for p in lists if not any(p.startswith(q + ".") for q in lists)]
    names, roots = _tower_names(towers)
    state = list(model.state_dict())
    layer_rows = {t: [i for i, n in enumerate(state) if n.startswith(t + ".")] for t in towers}
    places = {}
    for row, name in enumerate(state):
        owner_path = name.rpartition(".")[0]
        owner = modules[owner_path]
        tower = next((t for t in towers if name.startswith(t + ".")), None)
        if tower is not None:
            index, _, rest = name[len(tower) + 1 :].partition(".")
            layer_path = f"{tower}.{index}"
            chain = [modules[p] for p in _paths_between(layer_path, owner_path)]
            group = "norm" if _is_norm(owner) else "attn" if any(map(_is_attention, chain)) else "mlp"
            part = _moe_part(modules, layer_path, owner_path) if group == "mlp" else None
            places[name] = TensorInfo(name, int(index), group, names[tower], len(modules[tower]), part)
            continue
        root_tower = next((t for t, r in roots.items() if name.startswith(r + ".")), None)
        rows = layer_rows[root_tower] if root_tower else [r for t in towers for r in layer_rows[t]]
        if _is_norm(owner):
            group = "norm"
        elif any(t.startswith(owner_path + ".") or not owner_path for t in towers):
            group = "other"  # held by a module around the layers (a logits bias): the tree does not say where it acts
        elif isinstance(owner, torch.nn.Embedding) or (rows and row < rows[0]):
            group = "embed"
        elif not rows or row > rows[-1]:
            group = "head"
        else:
            group = "other"
        depth = len(modules[root_tower]) if root_tower else None
        places[name] = TensorInfo(name, None, group, names.get(root_tower), depth)
    return places


def _is_block_list(m: torch.nn.Module) -> bool:
    """A list of blocks: a module list whose elements are modules of modules (not bare linears or tables)."""
    return isinstance(m, torch.nn.ModuleList) and len(m) > 0 and all(any(True for _ in x.children()) for x in m)


def _tower_names(towers: list[str]) -> tuple[dict[str | None, str | None], dict[str, str]]:
    """Each tower list → its name (None when there is one) and its root: the module holding the tower, its
    embeddings and final norm (the first path component where the towers' paths part)."""
    if len(towers) <= 1:
        return {None: None, **{t: None for t in towers}}, {t: t.rpartition(".")[0] for t in towers}
    parts = [t.split(".") for t in towers]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    raw = [p[common] for p in parts]
    aliased = [TOWER_ALIASES.get(r, r) for r in raw]
    labels = aliased if len(set(aliased)) == len(aliased) else raw
    names = {None: None, **dict(zip(towers, labels))}
    return names, {t: ".".join(p[: common + 1]) for t, p in zip(towers, parts)}


def _paths_between(top: str, bottom: str) -> list[str]:
    """Module paths strictly below `top` down to `bottom` inclusive."""
    if bottom == top:
        return []
    rest = bottom[len(top) + 1 :].split(".")
    return [".".join([top, *rest[: i + 1]]) for i in range(len(rest))]


def _is_norm(m: torch.nn.Module) -> bool:
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, torch.nn.modules.batchnorm._BatchNorm)
    return isinstance(m, norms) or type(m).__name__.lower().endswith("norm")


def _is_attention(m: torch.nn.Module) -> bool:
    return re.search(r"attention|attn", type(m).__name__, re.I) is not None


def _moe_part(modules: dict[str, torch.nn.Module], layer_path: str, owner_path: str) -> str | None:
    """`experts` inside an experts module (fused, or a list of expert MLPs beside a router), `router` for the
    module whose outputs score those experts; None for the rest of the feed-forward sub-layer."""
    chain = _paths_between(layer_path, owner_path)
    for path in chain:
        if "expert" in type(modules[path]).__name__.lower() and "shared" not in type(modules[path]).__name__.lower():
            return "experts"
    if "router" in type(modules[owner_path]).__name__.lower():
        return "router"
    for path in chain:  # a list of identical MLPs whose sibling has one output per element: experts and router
        parent = modules[path.rpartition(".")[0]]
        if isinstance(modules[path], torch.nn.ModuleList) and len(modules[path]) > 1:
            if any(_scores(c, len(modules[path])) for c in parent.children()):
                return "experts"
    owner = modules[owner_path]
    parent = modules[owner_path.rpartition(".")[0]]
    for sibling in parent.children():
        if sibling is not owner and isinstance(sibling, torch.nn.ModuleList) and _scores(owner, len(sibling)):
            return "router"
    return None


def _scores(m: torch.nn.Module, n: int) -> bool:
    weight = getattr(m, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == n and n > 1
