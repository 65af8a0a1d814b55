"""One output vocabulary for models whose tokenizers differ, as mergekit 0.1.5 builds it (`tokenizer_source`).

Why: fine-tunes often add tokens (chat markers, tool tokens) or pad their embedding tables, so row i of one model's
embeddings is not row i of another's. With a tokenizer source — `base`, one of the models, or `union` (every
model's tokens) — mergekit builds the output tokenizer, then gives every model a table over that tokenizer's ids
before merging: a model's own row where it has the token, else one row every model lacking it shares — the
only model that has it, the base's, the average of those that have it, zeros, or what `tokens:` says. The
embedding tables are found from the model itself (transformers' input and output embeddings), not by name.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import RecipeError

log = logging.getLogger(__name__)


@dataclass
class Vocabulary:
    """The output tokenizer, its table size, and for each model (by path) the row of each output id (−1: none)."""

    tokenizer: Any
    size: int  # rows of the output tables (the tokenizer's vocabulary, padded to a multiple when asked)
    rows: dict[str, torch.Tensor]
    base: str | None  # the base model: its row serves a token other models lack (before averaging)
    tokens: dict[str, Any] = field(default_factory=dict)  # `tokens:` overrides (Recipe.tokens)
    vocab: dict[str, int] = field(default_factory=dict)
    original: dict[str, dict[str, int]] = field(default_factory=dict)  # each model's own token → row

    def is_identity(self, table_rows: dict[str, int]) -> bool:
        """Nothing to move: every model keeps its table as it is (same rows, same size) and nothing is forced."""
        identity = torch.arange(self.size)
        return not any(t.force for t in self.tokens.values()) and all(
            table_rows[m] == self.size and torch.equal(r, identity) for m, r in self.rows.items()
        )

    def remap(self, tables: dict[str, torch.Tensor], axis: int) -> dict[str, torch.Tensor]:
        """Each model's table (by path) over the output ids, as mergekit's PermutedVocabulary fills it."""
        models = list(tables)
        views = {m: t.movedim(axis, 0) for m, t in tables.items()}
        shape = next(iter(views.values())).shape[1:]
        dtype = next(iter(views.values())).dtype
        for v in views.values():
            dtype = torch.promote_types(dtype, v.dtype)
        n = len(self.vocab)
        defaults = self._defaults(views, models, shape, dtype)
        out = {}
        for m in models:
            p, view = self.rows[m], views[m]
            new = torch.zeros((self.size, *shape), dtype=dtype)
            own = p[:n] >= 0
            own[self._forced_ids()] = False
            new[:n][own] = view[p[:n][own]].to(dtype)
            for token_id, row in defaults.items():
                if not own[token_id]:
                    new[token_id] = row
            if self.size > n:  # padding rows: the mean of the real ones (mergekit, after Hewitt's vocab expansion)
                new[n:] = torch.mean(new[:n], dim=0)
            out[m] = new.movedim(0, axis)
        return out

    def _forced_ids(self) -> torch.Tensor:
        forced = [self.vocab[t] for t, c in self.tokens.items() if c.force and t in self.vocab]
        return torch.tensor(forced, dtype=torch.long)

    def _defaults(self, views: dict[str, torch.Tensor], models: list[str], shape, dtype) -> dict[int, torch.Tensor]:
        """The shared row of each output id some model lacks (or `tokens:` forces), by mergekit's rules."""
        n = len(self.vocab)
        has = torch.stack([self.rows[m][:n] >= 0 for m in models])  # [models, ids]
        ids = set((~has.all(0)).nonzero().view(-1).tolist()) | set(self._forced_ids().tolist())
        token_of = {i: t for t, i in self.vocab.items()}
        out = {}
        for token_id in sorted(ids):
            token = token_of[token_id]
            cfg = self.tokens.get(token)
            present = [m for k, m in enumerate(models) if has[k, token_id]]
            if cfg is not None:
                out[token_id] = self._configured(cfg, token, token_id, views, shape, dtype)
            elif len(present) == 1:
                out[token_id] = views[present[0]][self.rows[present[0]][token_id]].to(dtype)
            elif not present:
                log.warning("token %r is in none of the models: its embedding is zero", token)
                out[token_id] = torch.zeros(shape, dtype=dtype)
            elif self.base in models and has[models.index(self.base), token_id]:
                out[token_id] = views[self.base][self.rows[self.base][token_id]].to(dtype)
            else:  # in several models, the base not among them: their average
                row = torch.zeros(shape, dtype=dtype)
                for m in present:
                    row = row + views[m][self.rows[m][token_id]]
                out[token_id] = row / len(present)
        return out

    def _configured(self, cfg, token: str, token_id: int, views, shape, dtype) -> torch.Tensor:
        source = cfg.source
        if getattr(source, "kind", None) == "zero":
            return torch.zeros(shape, dtype=dtype)
        model = source if isinstance(source, str) else source.model
        if model not in views:
            raise RecipeError(f"tokens: {token!r} takes its embedding from {model}, which is not among the models")
        if isinstance(source, str):
            row = int(self.rows[model][token_id])
            if row < 0:
                raise RecipeError(f"tokens: {token!r} is not in {model}'s vocabulary; name a token_id or token there")
        else:
            row = source.token_id if source.token_id is not None else self.original[model].get(source.token, -1)
            if not 0 <= row < views[model].shape[0]:
                what = source.token if source.token is not None else source.token_id
                raise RecipeError(f"tokens: {token!r}: {what!r} is not in {model}'s vocabulary")
        return views[model][row].to(dtype)


def build_vocabulary(
    base: str | None,
    models: list[str],
    source: str,
    tokens: dict[str, Any] | None = None,
    pad_to_multiple_of: int | None = None,
) -> Vocabulary:
    """mergekit's `build_tokenizer`: the output tokenizer for `source` ("base", "union" or a model path) with the
    `tokens:` keys added, and each model's row for every output id. `models` are every model merged, base included.
    mergekit walks the models in a set's order, which can change between runs when several models bring tokens
    the base lacks; here: the base first, then the models as listed."""
    from transformers import AutoTokenizer

    first = base or models[0]  # whose tokenizer the output starts from
    order = [first] + [m for m in dict.fromkeys(models) if m != first]
    tokenizers = {first: _stripped(first)}
    for m in order[1:]:
        tokenizers[m] = AutoTokenizer.from_pretrained(m)
    if source == "base":
        out = tokenizers[first]
    elif source == "union":
        out = _union(tokenizers[first], tokenizers)
    else:
        out = AutoTokenizer.from_pretrained(source)
    existing = set(out.get_vocab())
    for token in tokens or {}:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RecipeError(f"tokenizer_source {source}: the output tokenizer's ids are not 0..{len(vocab) - 1}")
    rows = {}
    for m in order:
        own = tokenizers[m].get_vocab()
        limit = vocab_size_of(m) or len(own)
        r = torch.full((len(vocab),), -1, dtype=torch.long)
        for token, new_id in vocab.items():
            old_id = own.get(token)
            if old_id is not None and old_id < limit:
                r[new_id] = old_id
        rows[m] = r
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    return Vocabulary(
        out, size, rows, base, dict(tokens or {}), vocab, {m: t.get_vocab() for m, t in tokenizers.items()}
    )


def vocab_size_of(model: str) -> int | None:
    """The vocabulary size a model's config gives (top level, else its text model's)."""
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def set_vocab_size(config: dict[str, Any], size: int) -> None:
    """Write `size` where the config keeps its vocabulary size."""
    if "vocab_size" in config or "vocab_size" not in (config.get("text_config") or {}):
        config["vocab_size"] = size
    else:
        config["text_config"]["vocab_size"] = size


def _stripped(model: str) -> Any:
    """The base's tokenizer without the tokens whose ids its embeddings do not hold (mergekit's
    `get_stripped_tokenizer`: BPE tokenizers only)."""
    import tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, use_fast=True)
    limit = vocab_size_of(model) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= limit}
    if not unused:
        return tok
    spec = json.loads(tok._tokenizer.to_str()) if getattr(tok, "is_fast", False) else None
    if spec is None or spec["model"]["type"] != "BPE":
        raise RecipeError(
            f"{model}: its tokenizer has ids beyond the model's vocab_size and is not a fast BPE tokenizer; mergekit "
            "cannot strip those either"
        )
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < limit]
    for t in unused:
        spec["model"]["vocab"].pop(t, None)
    spec["model"]["merges"] = [
        m for m in spec["model"]["merges"] if not set(m.split(" ") if isinstance(m, str) else m) & unused
    ]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return tok


def _union(base_tok: Any, tokenizers: dict[str, Any]) -> Any:
    """mergekit's `build_union_tokenizer`: the base's tokenizer with every other model's tokens (within its
    vocab_size) added, plain tokens first, then the added tokens with the settings they first came with. mergekit
    adds them in the order a fast tokenizer's `get_vocab()` dict lists them — a hash map's, which changes from
    process to process — so the ids of new tokens differ between its runs; here they come in each model's own
    id order."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        limit = vocab_size_of(model) or tok.vocab_size
        for token, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if i < limit:
                plain.setdefault(token, None)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= limit:
                continue
            if info.content in added and added[info.content] != info:
                log.warning("token %r is added with different settings by the models; the first is used", info.content)
            added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as tmp:  # a copy of the base's tokenizer, as mergekit makes it
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def vocabulary_tables(model_dir: str | os.PathLike, names: Iterable[str]) -> dict[str, int] | None:
    """Of the checkpoint's tensors `names`, the token-indexed tables (input and output embeddings, an output bias)
    → their vocabulary axis, read from the model's own `get_input_embeddings` / `get_output_embeddings`; None
    when the architecture cannot be built."""
    from .layers import skeleton
    from .names import checkpoint_pieces

    model = skeleton(str(model_dir))
    if model is None:
        return None
    size = vocab_size_of(str(model_dir))
    modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    tables = {id(p) for m in modules for p in m.parameters() if p.dim() and p.shape[0] == size}
    named = {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in tables}
    stored = set(names)  # a tied table is stored once
    pieces = checkpoint_pieces(model, views=False)
    return {disk: 0 for disk, piece in pieces.items() if piece.param in named and disk in stored}
