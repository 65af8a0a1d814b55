"""Map tensor names to (layer index, group) so recipes can set parameters per layer and per kind of weight.

Groups: embed, attn, mlp, norm, head (and "other" for anything unrecognised). Names follow the common HF
conventions (Llama/Mistral/Qwen `model.layers.N.self_attn...`, GPT-2 `transformer.h.N.attn...`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUPS = ("embed", "attn", "mlp", "norm", "head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|decoder_layers)\.(\d+)\.")
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
    layer: int | None  # None for tensors outside the repeated blocks
    group: str

    def t(self, num_layers: int | None) -> float:
        """Position along the depth in [0, 1] where gradient lists are read, as mergekit 0.1.5 reads them: layer i
        → i/(L−1); every tensor outside the layers (embeddings, and also the final norm and head after the last
        layer) at 0 — `plan_module` reads them with `ConfigReader(t=0)`."""
        if self.layer is None:
            return 0.0
        if not num_layers or num_layers <= 1:
            return 0.0
        return self.layer / (num_layers - 1)


def classify(name: str) -> TensorInfo:
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for group, pattern in _RULES:
        if pattern.search(name):
            return TensorInfo(name, layer, group)
    return TensorInfo(name, layer, "other")


def infer_num_layers(names: list[str]) -> int:
    layers = [info.layer for info in map(classify, names) if info.layer is not None]
    return max(layers) + 1 if layers else 0
