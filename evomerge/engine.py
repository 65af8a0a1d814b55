"""The merge engine: keeps the base and the task vectors resident on one device and writes each candidate
recipe straight into a target model's parameters, with no disk I/O and no new model per candidate.
`write_merged` is the streaming counterpart for `evomerge merge`: one tensor at a time, to disk.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    chat_template_of,
    check_compatible,
    check_finite,
    check_output_dir,
    write_model_dir,
)
from .evaluate.heads import auto_class, load_model, model_head
from .layers import Layout
from .methods import get_method, kernels, merge_deltas, merge_tensors
from .methods.fast import SELECTION_SLOTS, drop_scratch, gram_of_rows, one_shot, return_freed_memory, scratch
from .methods.fused import weighted_sum_into
from .methods.registry import resolve_params
from .names import checkpoint_views
from .recipe import Recipe, RecipeError, TensorPlan
from .vocabulary import Vocabulary, build_vocabulary, set_vocab_size, vocabulary_tables

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


UNMAP_EVERY = 256 << 20  # bytes read through the models' memory maps between unmapping them


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise RecipeError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}") from None


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def _key(path: str) -> str:
    return os.path.realpath(path)


class Engine:
    """Resident base + task vectors δᵢ = θᵢ − θ_base for a fixed set of sources.

    Memory: base + one δ per source (δ may be kept in bf16 with `delta_dtype` to halve it, at the cost of
    rounding the task vectors) + the target model: (sources + 2) × model size."""

    def __init__(
        self,
        base_path: str | os.PathLike,
        source_paths: Sequence[str | os.PathLike],
        device: str | None = "cpu",
        dtype: str | torch.dtype = torch.float32,
        delta_dtype: str | torch.dtype | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = parse_dtype(dtype)
        self.delta_dtype = parse_dtype(delta_dtype) if delta_dtype else self.dtype
        self.base_ckpt = Checkpoint.open(base_path, allow_pickle=allow_pickle)
        self.source_ckpts = [Checkpoint.open(p, allow_pickle=allow_pickle) for p in source_paths]
        check_compatible(self.base_ckpt, self.source_ckpts)
        self.base_path = str(base_path)
        self.source_paths = [str(p) for p in source_paths]
        self.names = self.base_ckpt.tensor_names()
        self.layout = Layout.of(base_path, self.names)
        self.head = model_head(base_path) or "causal_lm"  # the class the target model is built as
        self.num_layers = self.layout.num_layers
        self.base: dict[str, torch.Tensor] = {}
        self.deltas: dict[str, list[torch.Tensor]] = {}
        # one checkpoint at a time, closed when read: a memory-mapped file counts towards RSS while it is
        # mapped, so reading all at once would peak at twice the resident size
        for name in self.names:
            self.base[name] = _load(self.base_ckpt, name, self.device, self.dtype)
            self.deltas[name] = []
        self.base_ckpt.close()
        for ckpt in self.source_ckpts:
            for name in self.names:
                source = _load(ckpt, name, self.device, self.dtype)
                self.deltas[name].append((source - self.base[name]).to(self.delta_dtype))
                del source
                if ckpt.mapped_bytes >= UNMAP_EVERY:  # a source's mapped pages are RSS until unmapped: the last
                    ckpt.close()  # source would otherwise peak at base + all task vectors + a whole source
            ckpt.close()
        return_freed_memory()
        self._plans: dict[tuple, list[TensorPlan]] = {}

    def source_index(self, recipe: Recipe) -> list[int]:
        """Positions of the recipe's sources among the engine's resident ones."""
        if recipe.base_model is not None and _key(recipe.base_model) != _key(self.base_path):
            raise RecipeError(f"recipe base_model {recipe.base_model} is not the engine's base {self.base_path}")
        keys = [_key(p) for p in self.source_paths]
        index = []
        for entry in recipe.source_entries():
            try:
                index.append(keys.index(_key(entry.model)))
            except ValueError:
                raise RecipeError(
                    f"recipe model {entry.model} is not among the engine's sources {self.source_paths}"
                ) from None
        return index

    def materialize(self, recipe: Recipe, target: Mapping[str, torch.Tensor]) -> None:
        """Write the recipe's merge of every tensor into `target` (e.g. from `bind`) in place."""
        index = self.source_index(recipe)
        recipe.check_towers(self.layout)
        for name in self.names:
            plan = recipe.plan(self.layout[name])
            deltas = [self.deltas[name][i] for i in index]
            out = target[name] if target[name].is_contiguous() else torch.empty_like(self.base[name])
            with torch.no_grad():
                merge_deltas(
                    plan.method,
                    self.base[name],
                    deltas,
                    plan.source_params,
                    plan.global_params,
                    seed=recipe.seed,
                    key=name,
                    out=out,
                    base_weight=plan.base_weight,
                    tie_order=recipe.tie_order,
                )
                if out is not target[name]:  # a transposed view of a converted parameter
                    target[name].copy_(out)

    def merged(self, recipe: Recipe) -> dict[str, torch.Tensor]:
        """Fresh tensors for every name (tests and one-off use; the search uses `materialize`)."""
        target = {n: torch.empty_like(t) for n, t in self.base.items()}
        self.materialize(recipe, target)
        return target

    def bind(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Map checkpoint tensor names to the model's parameter storage, for in-place writes: each name to the
        parameter, or the part of one, that transformers loads it into (`names.checkpoint_views`)."""
        state = checkpoint_views(model)
        missing = [n for n in self.names if n not in state]
        if missing:
            raise CheckpointError(
                f"{type(model).__name__} has no parameter(s) {missing[:3]} from {self.base_ckpt.path}"
            )
        target = {}
        for n in self.names:
            t = state[n]
            if tuple(t.shape) != tuple(self.base[n].shape):
                raise CheckpointError(
                    f"model parameter {n} has shape {list(t.shape)}, checkpoint {list(self.base[n].shape)}"
                )
            target[n] = t
        return target

    def load_target_model(self, dtype: str | torch.dtype | None = None) -> torch.nn.Module:
        """One resident model to write candidates into (the base's architecture and config), holding the base.

        Built from the config with initialization skipped and filled from the resident base tensors, not
        read from the base's files again: `from_pretrained` maps the safetensors file and touches it, so
        the search's peak memory would be the engine plus 1.2 models before the first candidate. Falls
        back to `from_pretrained` when the model has weights the checkpoint does not cover."""
        dtype = parse_dtype(dtype or self.dtype)
        model = self._model_from_resident_base(dtype)
        if model is None:
            model = load_model(self.base_path, self.head, dtype=dtype).to(self.device)
        return model.eval()

    def _model_from_resident_base(self, dtype: torch.dtype) -> torch.nn.Module | None:
        """The base model built from its config and `self.base`, or None where that cannot be done (an older
        transformers without `no_init_weights`, or weights the checkpoint does not cover)."""
        from transformers import AutoConfig, GenerationConfig

        try:
            from transformers.initialization import no_init_weights
        except ImportError:
            return None
        with no_init_weights(), torch.device(self.device):
            model = auto_class(self.head).from_config(AutoConfig.from_pretrained(self.base_path), dtype=dtype)
        target = self.bind(model)
        filled = Counter()  # elements written per storage (a fused parameter takes several checkpoint tensors)
        for t in target.values():
            filled[t.untyped_storage().data_ptr()] += t.numel()
        if not all(filled[t.untyped_storage().data_ptr()] >= t.numel() for t in model.state_dict().values()):
            log.info(
                "%s has weights the checkpoint does not cover; loading it with from_pretrained", type(model).__name__
            )
            return None
        with torch.no_grad():
            for name, t in target.items():
                t.copy_(self.base[name])
        try:
            model.generation_config = GenerationConfig.from_pretrained(self.base_path)
        except OSError:  # no generation_config.json: the model's defaults
            pass
        return model


def _load(ckpt: Checkpoint, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = ckpt.get(name)
    check_finite(name, t, ckpt.weight_map[name])
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device)


def model_card(recipe: Recipe, extra: str = "") -> str:
    """The model card of a parameter-space merge."""
    uses_base = any(get_method(m).needs_base for m in {recipe.merge_method} | {r.method for r in recipe.method_rules})
    models = ([recipe.base_model] if recipe.base_model and uses_base else []) + [
        m.model for m in recipe.models if not (uses_base and m.model == recipe.base_model)
    ]
    methods = f" (per-group methods: {sorted({r.method for r in recipe.method_rules})})" if recipe.method_rules else ""
    extra = f"Merged with evomerge using `{recipe.merge_method}`{methods}.\n\n{extra}"
    return model_card_text(recipe.name or "Merged model", models, extra, recipe.to_yaml())


def model_card_text(title: str, models: list[str], body: str, recipe_yaml: str) -> str:
    """HF model card: front matter naming the merged models, a body, and the recipe that reproduces the merge."""
    import yaml

    front = yaml.safe_dump(
        {"library_name": "transformers", "tags": ["merge", "evomerge"], "base_model": models}, sort_keys=False
    )
    return f"---\n{front}---\n\n# {title}\n\n{body}## Recipe\n\n```yaml\n{recipe_yaml}```\n"


def write_merged(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    device: str | None = "cpu",
    out_dtype: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    card_extra: str = "",
) -> Path:
    """Merge a recipe tensor by tensor (peak memory ~ one tensor per model + one shard) into an HF model dir."""
    check_output_dir(out_dir, overwrite)
    dev = resolve_device(device)
    sources = [Checkpoint.open(m.model, allow_pickle=allow_pickle) for m in recipe.source_entries()]
    base = Checkpoint.open(recipe.base_model, allow_pickle=allow_pickle) if recipe.base_model else None
    reference = base or sources[0]
    # the models by the names the recipe gives them (the vocabulary's keys), base first
    paths = ([recipe.base_model] if base is not None else []) + [m.model for m in recipe.source_entries()]
    models = dict(zip(paths, [c for c in (base, *sources) if c is not None]))
    vocabulary, tables = _vocabulary(recipe, reference, paths)
    check_compatible(reference, [s for s in sources if s is not reference], vocabulary_tables=tables)
    names = reference.tensor_names()
    remapped = {  # tables whose rows move to the output vocabulary's ids (not when every model's already match)
        n: axis
        for n, axis in (tables or {}).items()
        if not vocabulary.is_identity({p: c.shape(n)[axis] for p, c in models.items()})
    }
    # scalar settings read the same everywhere: places from names then, without building the architecture
    layout = Layout.of(reference.path, names) if recipe.reads_structure() else Layout.by_name(names)
    recipe.check_towers(layout)
    for note in recipe.mergekit_readings(layout):
        log.warning("%s", note)

    def merged(name: str) -> torch.Tensor:
        b = _load(base, name, dev, work) if base is not None else None
        tensors = [_load(s, name, dev, work) for s in sources]
        if name in remapped:
            rows = vocabulary.remap(dict(zip(paths, [t for t in (b, *tensors) if t is not None])), remapped[name])
            b = rows[recipe.base_model] if base is not None else None
            tensors = [rows[m.model] for m in recipe.source_entries()]
        return merge_tensor(recipe, recipe.plan(layout[name]), name, b, tensors)

    floats = {n: reference.get(n).is_floating_point() for n in names}
    # no dtype given: task vectors and output in the sources' dtype, as mergekit computes and writes them (a bf16
    # model stays bf16; TIES ranks the same rounded |δ|); sums still accumulate in float32. Models stored in
    # different dtypes are merged in the one that holds them all (bf16 + fp16 → fp32, as torch promotes them)
    work, final, mixed = merge_dtypes(recipe, [base, *sources] if base is not None else sources, out_dtype)
    if mixed:
        note = (
            f"The models are stored in different dtypes ({mixed}): merged in {_name(work)}, written in {_name(final)}"
        )
        log.warning("%s", note)
        card_extra = f"{card_extra}{note}.\n\n"
    shapes = {n: (reference.shape(n), final if floats[n] else reference.get(n).dtype) for n in names}
    config = set_config_dtype(dict(reference.config), final)
    if vocabulary is not None:  # as mergekit: the tables have one row per output token (padded), whatever they had
        for n, axis in tables.items():
            shapes[n] = (tuple(vocabulary.size if i == axis else d for i, d in enumerate(shapes[n][0])), shapes[n][1])
        set_vocab_size(config, vocabulary.size)
    template = recipe.chat_template
    if template == "auto":  # as mergekit: the template most of the models have (none: the tokenizer's own)
        found = [t.strip() for t in map(chat_template_of, [c.path for c in (base, *sources) if c is not None]) if t]
        template = Counter(found).most_common(1)[0][0] if found else None
    log.info("merging %d tensors (%s) into %s", len(names), recipe.merge_method, out_dir)
    return write_streamed(
        out_dir,
        shapes,
        merged,
        list(models.values()),
        config,
        copy_from=reference.path,
        model_card=model_card(recipe, card_extra),
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        chat_template=template,
        tokenizer=vocabulary.tokenizer if vocabulary is not None else None,
    )


def write_streamed(
    out_dir: str | os.PathLike,
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    merged: Callable[[str], torch.Tensor],
    inputs: list[Checkpoint],
    config: dict[str, Any],
    **write_options: Any,
) -> Path:
    """An HF model directory whose tensors `merged(name)` makes one at a time from `inputs`: each task vector is
    merged once (no statistics kept for later candidates). The inputs' memory maps are dropped once UNMAP_EVERY
    bytes were read through them: the pages read stay in the RSS while a map is open (every model whole, were
    they kept), and opening a map per tensor cost 0.5 s in a 297M task-arithmetic merge (4 models: 660 opens and
    unmaps) whose arithmetic took 1.5 s."""

    def produce(name: str) -> torch.Tensor:
        try:
            return merged(name)
        finally:
            if sum(c.mapped_bytes for c in inputs) >= UNMAP_EVERY:
                for c in inputs:
                    c.close()

    entries = sum(math.prod(shape) for shape, dtype in shapes.values() if dtype.is_floating_point)
    try:
        with one_shot(entries):
            return write_model_dir(out_dir, shapes, produce, config, **write_options)
    finally:
        drop_scratch(DELTA_SLOT, *SELECTION_SLOTS)


def merge_tensor(
    recipe: Recipe, plan: TensorPlan, name: str, b: torch.Tensor | None, tensors: list[torch.Tensor]
) -> torch.Tensor:
    """One output tensor of a file-to-file merge from its inputs (`b`: the base's, None without a base), by the
    cheapest route its method has: entrywise methods a chunk of the task vectors at a time, the others whole."""
    first = b if b is not None else tensors[0]
    if not first.is_floating_point():
        return first
    spec = get_method(plan.method)
    with torch.no_grad():
        if b is None:
            if spec.needs_base:
                raise RecipeError(f"{plan.method} needs base_model")
            if spec.family != "linear":
                return merge_tensors(plan.method, tensors, plan.source_params, plan.global_params)
            weights = [p.get("weight", plan.global_params.get("weight")) for p in plan.source_params]
            if any(w is None for w in weights):
                raise RecipeError(f"linear: every model needs a weight (tensor {name})")
            return kernels.linear(tensors, weights, normalize=bool(plan.global_params.get("normalize", True)))
        if spec.family == "linear" or (spec.family == "task_arithmetic" and spec.sparsification is None):
            return _chunk_by_chunk(plan, b, tensors)  # entry by entry: no whole task vector needed
        if spec.family == "slerp" or (spec.family == "model_stock" and not plan.global_params.get("filter_wise")):
            return _two_passes(plan, b, tensors)
        deltas = [row.view(b.shape) for row in _task_vectors(b, tensors)]
        return merge_deltas(
            plan.method,
            b,
            deltas,
            plan.source_params,
            plan.global_params,
            seed=recipe.seed,
            key=name,
            base_weight=plan.base_weight,
            tie_order=recipe.tie_order,
        )


ELEMENTWISE_CHUNK = 1 << 22  # entries of the task vectors an entrywise merge holds at a time
DELTA_SLOT = 200  # the `fast.scratch` slot of a file-to-file merge's task vectors


def _delta_chunks(base: torch.Tensor, tensors: list[torch.Tensor]):
    """(start, end, task vectors of those entries) over the flattened tensors, ELEMENTWISE_CHUNK entries at a time
    (`_task_vectors`: valid until the next chunk)."""
    b, flats = base.reshape(-1), [t.reshape(-1) for t in tensors]
    for s in range(0, b.numel(), ELEMENTWISE_CHUNK):
        e = min(b.numel(), s + ELEMENTWISE_CHUNK)
        yield s, e, list(_task_vectors(b[s:e], [f[s:e] for f in flats]))


def _task_vectors(base: torch.Tensor, tensors: list[torch.Tensor], lead: int = 0) -> torch.Tensor:
    """The task vectors θᵢ − base of one tensor, flattened, as the last rows of a [lead + k, n] matrix in a buffer
    reused from tensor to tensor (valid until the next call; the first `lead` rows are the caller's): fresh
    memory per tensor costs its page faults every time."""
    b = base.reshape(-1)
    n = b.numel()
    rows = scratch((lead + len(tensors)) * n, b.dtype, b.device, slot=DELTA_SLOT).view(lead + len(tensors), n)
    for row, t in zip(rows[lead:], tensors):
        torch.sub(t.reshape(-1), b, out=row)
    return rows


def _chunk_by_chunk(plan: TensorPlan, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A merge whose every entry depends on the same entries of its inputs alone (linear, task arithmetic), with
    the task vectors made a chunk at a time: the same arithmetic as whole ones, without allocating a tensor-sized
    task vector per source (their allocation was most of such a one-off merge: 297M parameters, 3 sources)."""
    out = torch.empty_like(base)
    b, o = base.reshape(-1), out.view(-1)
    params, weight = plan.source_params, plan.base_weight
    for s, e, deltas in _delta_chunks(base, tensors):
        merge_deltas(plan.method, b[s:e], deltas, params, plan.global_params, out=o[s:e], base_weight=weight)
    return out


def _two_passes(plan: TensorPlan, base: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """SLERP and Model Stock: the Gram matrix their coefficients come from (base and δ for SLERP, the δs for Model
    Stock), then the weighted sum. The task vectors are made ELEMENTWISE_CHUNK entries at a time into one reused
    matrix (its Gram matrix one matrix product per chunk, the fp32 sum one matrix-vector product); a tensor of one
    chunk keeps them for the sum, a larger one makes them again (an embedding's whole task vectors would be fresh
    memory the size of the sources' tables)."""
    spec = get_method(plan.method)
    slerp = spec.family == "slerp"
    tensors = tensors[:1] if slerp else tensors
    b, flats = base.reshape(-1), [t.reshape(-1) for t in tensors]
    n = b.numel()
    spans = [(s, min(n, s + ELEMENTWISE_CHUNK)) for s in range(0, max(n, 1), ELEMENTWISE_CHUNK)]

    def rows_of(s: int, e: int) -> torch.Tensor:  # [b,] δ₁ … δₖ over entries s..e
        rows = _task_vectors(b[s:e], [f[s:e] for f in flats], lead=int(slerp))
        if slerp:
            rows[0].copy_(b[s:e])
        return rows

    g = torch.zeros((), dtype=torch.float64)
    for s, e in spans:
        rows = rows_of(s, e)
        g = g + gram_of_rows(rows)
    if slerp:
        _, params = resolve_params(spec, 1, [{}], dict(plan.global_params))
        base_coeff, s1 = kernels.slerp_delta_coefficients(float(params["t"]), g.tolist())
        coeffs = [s1]
    else:
        base_coeff, coeffs = 1.0, kernels.model_stock_coefficients(g.tolist())
    out = torch.empty_like(base)
    o = out.view(-1)
    wide = out.dtype in (torch.float32, torch.float64)
    c = torch.tensor(coeffs, dtype=out.dtype, device=out.device) if wide else None
    for s, e in spans:
        deltas = (rows if len(spans) == 1 else rows_of(s, e))[int(slerp) :]
        if wide:
            torch.addmv(b[s:e], deltas.T, c, beta=base_coeff, out=o[s:e])
        else:  # 16-bit: accumulated in fp32
            weighted_sum_into(o[s:e], b[s:e], list(deltas), coeffs, base_coeff=base_coeff)
    return out


def _vocabulary(
    recipe: Recipe, reference: Checkpoint, models: list[str]
) -> tuple[Vocabulary | None, dict[str, int] | None]:
    """The output vocabulary over `models` (base first) a tokenizer source asks for (mergekit builds one whenever
    it is given), and the reference's token-indexed tables (name → vocabulary axis)."""
    if recipe.tokenizer_source is None:
        return None, None
    tables = vocabulary_tables(reference.path, reference.tensor_names())
    if tables is None:
        raise RecipeError(
            f"{reference.path}: its architecture could not be built, so its embedding tables are unknown; a "
            "tokenizer_source maps them onto one vocabulary (leave it out to keep the base's tokenizer)"
        )
    source = recipe.tokenizer_source
    vocabulary = build_vocabulary(recipe.base_model, models, source, recipe.tokens, recipe.pad_to_multiple_of)
    return vocabulary, tables


def merge_dtypes(
    recipe: Recipe, checkpoints: list[Checkpoint], out_dtype: str | None
) -> tuple[torch.dtype, torch.dtype, str]:
    """The dtype of the arithmetic and of the output (`dtype`, else the one the models are stored in: mergekit keeps
    bf16 models bf16), and each model's dtype when they differ."""
    stored, mixed = stored_dtype(checkpoints)
    work = parse_dtype(recipe.dtype or stored)
    return work, parse_dtype(out_dtype or recipe.out_dtype or recipe.dtype or stored), mixed


def stored_dtype(checkpoints: list[Checkpoint]) -> tuple[torch.dtype, str]:
    """The dtype that holds every checkpoint's floating-point tensors, and each checkpoint's dtype when they differ
    ("" when they agree)."""
    dtypes = {Path(c.path).name: c.float_dtype() or torch.float32 for c in checkpoints}
    common = functools.reduce(torch.promote_types, dtypes.values())
    mixed = len(set(dtypes.values())) > 1
    return common, ", ".join(f"{name} {_name(d)}" for name, d in dtypes.items()) if mixed else ""


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def set_config_dtype(config: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """A written model's config names the dtype of its weights (under the key it has: `dtype` or `torch_dtype`)."""
    name = _name(dtype)
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = name
    return config
