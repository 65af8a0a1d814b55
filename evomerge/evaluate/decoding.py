"""The KV cache of the native evaluator's greedy decoding: grown per step, or preallocated and stepped by a graph.

- `dynamic`: transformers' dynamic cache, one position longer per step. On a CPU a step's time is the merged
  model's matrix products, and this is as fast as the others (benchmarks/search_throughput.py).
- `static`: a transformers `StaticCache` preallocated once for the resident model — batch size × (longest prompt
  + new tokens) — and reset per batch (a merge that produced NaN leaves nothing behind). Every decode step then has
  the same shapes: a short batch is filled up to the batch size with copies of its first row, whose outputs are
  dropped, and the step's inputs are written into preallocated tensors.
- `graphs`: `static` with the decode step compiled once by `torch.compile` in its reduce-overhead mode: on CUDA the
  step runs as one CUDA graph, without the kernel-launch and Python overhead that dominate a GPU's decode steps of
  a model evaluated at small batches. The prefill (one forward per batch, shapes varying) runs eagerly.

The default is `graphs` on CUDA for models transformers can compile with a static cache, `dynamic` elsewhere. A
search whose candidates change the model's layers (layer paths) decodes `dynamic`: a static cache has one slot
list per layer of the model it was made for, and a compiled step one graph per module structure.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

DECODERS = ("dynamic", "static", "graphs")
ATTRIBUTE = "_evomerge_static_decoder"  # where a model keeps its static decoder (goes with the model)


def default_decoder(model: torch.nn.Module, device: torch.device) -> str:
    return "graphs" if device.type == "cuda" and getattr(model, "_can_compile_fullgraph", False) else "dynamic"


class Growing:
    """One batch decoded with transformers' dynamic cache (made per batch: batches may run in parallel threads)."""

    def __init__(self, model: torch.nn.Module, cache_arg: str, last_logits: dict[str, int]) -> None:
        self.model, self.cache_arg, self.last_logits = model, cache_arg, last_logits

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        """Prefill left-padded prompts (positions counted from each row's first token); the last position's logits."""
        n, self.width = input_ids.shape
        self.mask = attention_mask.new_ones((n, self.width + steps))  # grown as a view, not reallocated
        self.mask[:, : self.width] = attention_mask
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=True, **self.last_logits
        )
        self.past, self.pos, self.k = getattr(out, self.cache_arg), pos[:, -1:], 0
        return out.logits[:, -1]

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        self.k += 1
        self.pos = self.pos + 1
        out = self.model(
            input_ids=nxt[:, None],
            attention_mask=self.mask[:, : self.width + self.k],
            position_ids=self.pos,
            use_cache=True,
            **{self.cache_arg: self.past},
        )
        self.past = getattr(out, self.cache_arg)
        return out.logits[:, -1]


class Static:
    """Batches decoded one after another in one preallocated static cache (see the module docstring). One per
    model (`for_model`): the search's, select's and test's evaluators of one resident model take turns with it."""

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        cache_arg: str,
        last_logits: dict[str, int],
        rows: int,
        max_len: int,
        compiled: bool,
    ) -> "Static":
        """The model's decoder when it holds `rows` × `max_len`, else a new one (the old one's memory goes)."""
        have = getattr(model, ATTRIBUTE, None)
        if have is None or have.compiled != compiled or have.ids.shape[0] < rows or have.mask.shape[1] < max_len:
            setattr(model, ATTRIBUTE, None)  # the old cache's memory is free before the new one is taken
            have = cls(model, cache_arg, last_logits, rows, max_len, compiled)
            setattr(model, ATTRIBUTE, have)
        return have

    def __init__(
        self,
        model: torch.nn.Module,
        cache_arg: str,
        last_logits: dict[str, int],
        batch_size: int,
        max_len: int,
        compiled: bool,
    ) -> None:
        from transformers import StaticCache

        device = next(model.parameters()).device
        self.model, self.cache_arg, self.last_logits, self.compiled = model, cache_arg, last_logits, compiled
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.mask = torch.ones((batch_size, max_len), dtype=torch.long, device=device)
        self.ids = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((batch_size, 1), dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)  # the cache slot of the next token
        self.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False) if compiled else model
        self.n, self.stepped = 0, False

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        (self.n, width), rows, max_len = input_ids.shape, self.ids.shape[0], self.mask.shape[1]
        if self.n > rows or width + steps > max_len:
            raise ValueError(f"a batch of {self.n}×({width}+{steps}) does not fit the {rows}×{max_len} cache")
        if self.n < rows:  # filled up with copies of the first row: every step has one shape
            fill = rows - self.n
            input_ids = torch.cat([input_ids, input_ids[:1].expand(fill, -1)])
            attention_mask = torch.cat([attention_mask, attention_mask[:1].expand(fill, -1)])
        self.cache.reset()
        self.mask[:, :width] = attention_mask
        self.mask[:, width:] = 1  # slots after a row's current position are hidden by the causal mask
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=pos,
            cache_position=torch.arange(width, device=self.at.device),
            use_cache=True,
            **{self.cache_arg: self.cache},
            **self.last_logits,
        )
        self.pos.copy_(pos[:, -1:])
        self.at.fill_(width)
        return out.logits[: self.n, -1]

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        self.ids[: self.n, 0] = nxt  # filler rows repeat their last token: their outputs are dropped
        self.pos += 1
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been read
        inputs = {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.pos}
        inputs.update(cache_position=self.at, use_cache=True, **{self.cache_arg: self.cache})
        try:
            out: Any = self.forward(**inputs)
        except Exception as e:  # torch.compile fails on what it cannot trace: the first step says so
            if not self.compiled or self.stepped:
                raise
            log.warning("the decode step could not be compiled (%s); decoding with a static cache, uncompiled", e)
            self.forward, self.compiled = self.model, False
            out = self.forward(**inputs)
        self.stepped = True
        self.at += 1
        return out.logits[: self.n, -1]
