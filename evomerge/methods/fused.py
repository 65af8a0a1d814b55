"""One-pass TIES / DARE / breadcrumbs / DELLA merges on resident task vectors, compiled with torch.compile
(inductor: C++/OpenMP on CPU, Triton on GPU) and the same code run chunk by chunk in eager mode.

Why: done op by op, a TIES or DARE candidate makes ~10 passes over every task vector (masks, copies,
rescale sums, the sign election). Here every source's keep rule is an elementwise predicate, so the whole
merge is one fused loop that reads the base and each task vector once and writes the target once:

- magnitude (TIES) and outlier-window (breadcrumbs) keep rules are exact: "|δ| > t, or |δ| == t and the
  position is before `cut`" keeps exactly k entries, ties broken by position as a top-k would. t and cut
  come from `MagnitudeIndex`, exact bin counts of |δ| computed once per resident task vector, so a
  candidate pays one counting pass, then looks only at the blocks holding the k-th value's bin.
- random (DARE) keep rules use a counter-based hash of (seed, position): no random numbers are stored,
  and the CPU, the GPU, eager and compiled code all draw the same mask.
- rank (DELLA) keep rules compare the same hash with a probability linear in the entry's rank within its
  row; the ranks depend on δ alone and are kept resident (`row_ranks`).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import fast
from .sparsify import breadcrumbs_window, magnitude_k

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF
RANDOM_BITS = 24  # density resolution 2⁻²⁴
COMPILE_MIN_NUMEL = 1 << 20  # below this, compiled code gains little and chunked eager is used


# ---- counter-based random keep (DARE) ------------------------------------------------------------
def seed_word(seed: int) -> int:
    """A well-mixed 32-bit word from a seed (host side, once per source and tensor)."""
    x = int(seed) & M32
    for c in (0x7FEB352D, 0x846CA68B):
        x ^= x >> 16
        x = (x * c) & M32
    return x ^ (x >> 16)


def random_bits(idx: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    """24 uniform bits per position (int32): one round of a 32-bit xorshift-multiply mixer on
    position XOR `seed_word(seed)`. int32 multiplication wraps mod 2³² and the masked arithmetic shifts
    act as logical shifts, so every backend (CPU, GPU, eager, compiled) computes the same bits."""
    if isinstance(word, int):
        word = torch.tensor(word & M32, dtype=torch.int64, device=idx.device)
    x = idx.to(torch.int32) ^ word.to(torch.int32)
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x2C1B3C6D
    x = x ^ ((x >> 16) & 0xFFFF)
    return x & ((1 << RANDOM_BITS) - 1)


def density_threshold(density: float) -> int:
    """Keep a position when its random bits fall below this: P(keep) = density to within 2⁻²⁴."""
    return int(round(float(density) * (1 << RANDOM_BITS)))


# ---- exact magnitude thresholds ------------------------------------------------------------------
@dataclass(frozen=True)
class MagnitudeIndex:
    """Exact counts of |δ| in bins whose edges are quantiles of a sample of |δ| (fp32 task vectors) or
    every distinct value (16-bit task vectors, which have at most 32768). Depends on δ alone, so a resident
    task vector computes it once; any k-th largest value is then in a known small bin."""

    edges: torch.Tensor  # fp32, strictly increasing; bin b holds edges[b-1] ≤ |δ| < edges[b]
    at_or_above: torch.Tensor  # int64; [b] = number of entries in bins ≥ b (len = bins + 1, then a 0)
    one_value_bins: bool = False  # bin b ≥ 1 holds only the value edges[b-1]


@fast.cached_while_unmodified
def magnitude_index(delta: torch.Tensor) -> MagnitudeIndex:
    """`MagnitudeIndex` of a task vector. About one bin per 256 entries (at most 65536): a bin's members
    then touch few blocks, and the index costs 12 bytes per bin, under 5 % of a fp32 task vector."""
    flat = delta.reshape(-1)
    bins = min(1 << 16, max(256, flat.numel() // 256))
    one_value = delta.dtype in (torch.bfloat16, torch.float16)
    if one_value:  # count every |δ| bit pattern: for non-negative floats, pattern order is value order
        per_pattern = torch.zeros(1 << 15, dtype=torch.int64, device=delta.device)
        for s in range(0, flat.numel(), fast.CHUNK):
            per_pattern += torch.bincount(flat[s : s + fast.CHUNK].view(torch.int16).to(torch.int32) & 0x7FFF, minlength=1 << 15)
        present = per_pattern.nonzero().view(-1)
        edges = present.to(torch.int16).view(delta.dtype).float()
        counts = torch.cat([per_pattern.new_zeros(1), per_pattern[present]])
    else:
        sample = fast.abs_sample(delta, size=4 * bins)
        edges = torch.unique_consecutive(sample[4::4]).contiguous()
        counts = torch.zeros(edges.numel() + 1, dtype=torch.int64, device=delta.device)
        for s in range(0, flat.numel(), fast.CHUNK):
            a = flat[s : s + fast.CHUNK].abs().float()
            counts += torch.bincount(torch.bucketize(a, edges, right=True), minlength=edges.numel() + 1)
    at_or_above = torch.cat([counts.flip(0).cumsum(0).flip(0), counts.new_zeros(1)])
    return MagnitudeIndex(edges, at_or_above, one_value)


def keep_largest(delta: torch.Tensor, ks: Sequence[int], index: MagnitudeIndex | None = None) -> list[tuple[float, int]]:
    """For each k: (t, cut) such that "|δ| > t, or |δ| == t at a position < cut" holds for exactly the k
    largest entries of δ, ties at the threshold broken by position (first positions first). All ks share
    one pass over δ (breadcrumbs needs two)."""
    flat = delta.reshape(-1)
    n = flat.numel()
    result: list[tuple[float, int] | None] = [(-1.0, 0) if k >= n else (math.inf, 0) if k <= 0 else None for k in ks]
    todo = [i for i, r in enumerate(result) if r is None]
    if not todo:
        return result  # type: ignore[return-value]
    index = index or magnitude_index(delta)
    above, edges = index.at_or_above, index.edges
    bins = []  # (lo, hi, need, size) of the bin holding each k-th largest
    for i in todo:
        j = int(torch.count_nonzero(above >= ks[i])) - 1  # above is non-increasing
        lo = float(edges[j - 1]) if j > 0 else -1.0
        hi = float(edges[j]) if j < edges.numel() else math.inf
        bins.append((lo, hi, ks[i] - int(above[j + 1]), int(above[j] - above[j + 1])))
    if index.one_value_bins:  # t is the bin's value; only a cut inside its ties may need a pass
        for i, (lo, hi, need, size) in zip(todo, bins):
            result[i] = (lo, n if need >= size else int(_nth_position(flat, lo, hi, need)) + 1)
        return result  # type: ignore[return-value]
    positions, values = _bin_members(flat, [(lo, hi) for lo, hi, _, _ in bins])
    for i, (lo, hi, need, _) in zip(todo, bins):
        inside = (values >= lo) & (values < hi)
        members = positions[inside]
        vals = flat[members].abs()
        vals = vals.to(fast.work_dtype(vals))
        t = vals.kthvalue(vals.numel() - need + 1).values
        ties = members[vals == t]
        ties_needed = need - int(torch.count_nonzero(vals > t))
        cut = n if ties_needed >= ties.numel() else int(ties[ties_needed - 1]) + 1
        result[i] = (float(t), cut)
    return result  # type: ignore[return-value]


def _rows(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's rows: a 1-D tensor is one row, otherwise the first dimension indexes them."""
    return delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)


@fast.cached_while_unmodified
def row_ranks(delta: torch.Tensor) -> torch.Tensor:
    """Rank of every |δ| within its row (0 = smallest; ties by position), as DELLA samples by it; read them
    with `rank_values`. Depends on δ alone, so it is computed once per resident task vector and kept: 2 bytes
    per entry when rows are at most 32768 wide, else 4 — the memory DELLA trades for not sorting per
    candidate."""
    rows = _rows(delta)
    dtype = torch.int16 if rows.shape[1] <= 1 << 15 else torch.int32
    ranks = torch.empty(rows.shape, dtype=dtype, device=delta.device)
    steps = torch.arange(rows.shape[1], device=delta.device).to(dtype).expand(min(rows.shape[0], 256), -1)
    for s in range(0, rows.shape[0], 256):  # a few rows at a time: the sort's scratch stays small
        order = rows[s : s + 256].abs().float().sort(dim=1, stable=True).indices
        ranks[s : s + 256].scatter_(1, order, steps[: order.shape[0]])
    ranks = ranks.view(delta.shape)
    return ranks.view(torch.bfloat16) if dtype == torch.int16 else ranks  # bf16: see rank_values


BLOCK = 256  # positions are collected from the blocks of this size that hold any bin member


def _bin_members(flat: torch.Tensor, ranges: Sequence[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (ascending) and fp32 |δ| of the entries inside any range lo ≤ |δ| < hi. One counting pass
    per block (a reduction: no mask is written), then only the few blocks holding members are looked at."""
    n = flat.numel()
    bounds = torch.tensor(list(ranges), dtype=torch.float32, device=flat.device)  # bins are fp32, as counted
    full = n - n % BLOCK
    counts = _block_counts_into(flat, bounds, full)
    blocks = counts.nonzero().view(-1)
    pos = (blocks.view(-1, 1) * BLOCK + torch.arange(BLOCK, device=flat.device)).view(-1)
    pos = torch.cat([pos, torch.arange(full, n, device=flat.device)])
    a = flat[pos].abs().float()
    inside = _in_ranges(a, bounds)
    return pos[inside], a[inside]


def _nth_position(flat: torch.Tensor, lo: float, hi: float, nth: int) -> int:
    """Position of the nth (1-based, in position order) entry with lo ≤ |δ| < hi."""
    n = flat.numel()
    full = n - n % BLOCK
    counts = _block_counts_into(flat, torch.tensor([(lo, hi)], dtype=torch.float32, device=flat.device), full)
    before = counts.cumsum(0)
    b = int(torch.count_nonzero(before < nth))  # the block holding it (or the tail when b == blocks)
    start = b * BLOCK
    seen = int(before[b - 1]) if b > 0 else 0
    a = flat[start : min(n, start + BLOCK) if b < full // BLOCK else n].abs().float()
    hits = ((a >= lo) & (a < hi)).nonzero().view(-1)
    return start + int(hits[nth - seen - 1])


def _in_ranges(a: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    inside = (a >= bounds[0, 0]) & (a < bounds[0, 1])
    for r in range(1, bounds.shape[0]):
        inside = inside | ((a >= bounds[r, 0]) & (a < bounds[r, 1]))
    return inside


def _block_counts_into(flat: torch.Tensor, bounds: torch.Tensor, full: int) -> torch.Tensor:
    """Per BLOCK of flat[:full], how many entries lie in any of the ranges (a reduction pass)."""
    counts = fast.scratch(full // BLOCK, torch.int64, flat.device, slot=70)
    if full == 0 or _compiled_call(flat, lambda: _compiled_block_counts(flat.dtype, flat.device.type, bounds.shape[0]), flat[:full], bounds, counts) is not EAGER:
        return counts
    for s in range(0, full, fast.CHUNK):  # CHUNK is a multiple of BLOCK
        e = min(full, s + fast.CHUNK)
        _block_counts(flat[s:e], bounds, counts[s // BLOCK : e // BLOCK])
    return counts


def _block_counts(flat: torch.Tensor, bounds: torch.Tensor, counts: torch.Tensor) -> None:
    counts.copy_(_in_ranges(flat.abs().float().view(-1, BLOCK), bounds).sum(dim=1))


# ---- the fused merge -------------------------------------------------------------------------------
def _keep(kind: str, a: torch.Tensor, idx: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, i: int, rank: torch.Tensor | None = None) -> torch.Tensor:
    """Source i's keep predicate. kind: magnitude (TIES), window (breadcrumbs), random (DARE), rank (DELLA).
    fp[i] = (t_keep, t_drop, scale, weight) — for "rank" the first two are (p₀, slope) of the keep
    probability p₀ + slope·rank; ip[i] = (cut_keep, cut_drop, seed word, random threshold)."""
    if kind == "random":
        return random_bits(idx, ip[i, 2]) < ip[i, 3]
    if kind == "rank":
        u = random_bits(idx, ip[i, 2]).to(fp.dtype) * (1.0 / (1 << RANDOM_BITS))
        return u < fp[i, 0] + rank_values(rank).to(fp.dtype) * fp[i, 1]
    keep = (a > fp[i, 0]) | ((a == fp[i, 0]) & (idx < ip[i, 0]))
    if kind == "window":  # minus the top outliers
        keep = keep & ~((a > fp[i, 1]) | ((a == fp[i, 1]) & (idx < ip[i, 1])))
    return keep


def rank_values(stored: torch.Tensor) -> torch.Tensor:
    """The int32 ranks of a `row_ranks` result. int16 ranks are stored as bf16 bit patterns: widening bf16
    to fp32 is a 16-bit shift that compiled CPU code vectorizes (int16 → int32 it does not, 6× slower),
    and the fp32 bits are then exactly rank << 16."""
    if stored.dtype != torch.bfloat16:
        return stored
    return stored.float().view(torch.int32) >> 16


def _positions(n: int, offset: int, device: torch.device) -> torch.Tensor:
    """Flat positions offset..offset+n−1, in int32 when they fit (half the integer work of int64)."""
    return torch.arange(n, device=device, dtype=torch.int32 if offset + n < 2**31 else torch.int64) + offset


def _merge_body(out, base, deltas, fp, ip, lam, ranks, offset: int, kind: str, consensus: bool, normalize: bool, work: torch.dtype) -> None:
    """out = base + merged change, elementwise over flat (chunks of) tensors starting at `offset`;
    arithmetic in `work` (fp32, or fp64 for fp64 models)."""
    idx = _positions(base.numel(), offset, base.device)
    kept = []
    for i, d in enumerate(deltas):
        x = d.to(work)
        kept.append(torch.where(_keep(kind, x.abs(), idx, fp, ip, i, ranks[i] if ranks else None), x * fp[i, 2], 0.0))
    total = kept[0]
    for k in kept[1:]:
        total = total + k
    if consensus:  # TIES sign election: sum the entries agreeing with sign(Σ), zeros never agree
        positive = total >= 0
        mixed = torch.zeros_like(total)
        div = torch.zeros_like(total)
        for i, k in enumerate(kept):
            agree = torch.where(positive, k > 0, k < 0)
            mixed = mixed + torch.where(agree, k, 0.0)
            div = div + torch.where(agree, fp[i, 3], 0.0)
        if normalize:
            mixed = mixed / torch.where(div == 0, 1.0, div)
        total = mixed * lam
    out.copy_(base.to(work) + total)


def _kept_l1_body(delta, fp, ip, rank, offset: int, kind: str) -> torch.Tensor:
    idx = _positions(delta.numel(), offset, delta.device)
    x = delta.to(fast.work_dtype(delta))
    return torch.where(_keep(kind, x.abs(), idx, fp, ip, 0, rank), x.abs(), 0.0).sum(dtype=torch.float64)


# ---- compiled or eager --------------------------------------------------------------------------
def compile_mode() -> str:
    """EVOMERGE_COMPILE: 'auto' (default: compile tensors ≥ 1M entries), 'on' (all), 'off' (never)."""
    mode = os.environ.get("EVOMERGE_COMPILE", "auto").lower()
    return {"1": "on", "true": "on", "0": "off", "false": "off"}.get(mode, mode)


_compile_failed = False


def _use_compiled(t: torch.Tensor) -> bool:
    mode = compile_mode()
    if _compile_failed or mode == "off":
        return False
    return mode == "on" or t.numel() >= COMPILE_MIN_NUMEL


def _compile(fn):
    """Every variant (method kind, source count, dtypes) of one body function shares dynamo's cache for that
    function's code, so its recompile limit (default 8) must cover them all."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, 0) < 256:
            setattr(dynamo_config, name, 256)
    if getattr(dynamo_config, "accumulated_recompile_limit", 1 << 30) < 4096:
        dynamo_config.accumulated_recompile_limit = 4096
    return torch.compile(fn, dynamic=True, fullgraph=True)


@functools.lru_cache(maxsize=None)
def _compiled_merge(kind: str, n: int, consensus: bool, normalize: bool, work: torch.dtype, dtypes: tuple, device: str):
    return _compile(functools.partial(_merge_body, offset=0, kind=kind, consensus=consensus, normalize=normalize, work=work))


@functools.lru_cache(maxsize=None)
def _compiled_kept_l1(kind: str, dtype: torch.dtype, device: str):
    return _compile(functools.partial(_kept_l1_body, offset=0, kind=kind))


@functools.lru_cache(maxsize=None)
def _compiled_block_counts(dtype: torch.dtype, device: str, n_ranges: int):
    return _compile(_block_counts)


def _fallback(err: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    log.warning("torch.compile failed (%s); merging with the eager kernels from now on", err)


EAGER = object()  # `_compiled_call`'s answer when the caller should run its eager code


def _compiled_call(t: torch.Tensor, compiled: Callable[[], Callable], *args: Any) -> Any:
    """compiled()(*args) when compiled code is in use for tensors like `t`; EAGER when it is not (mode,
    size) or the compiler failed — a broken toolchain must not stop a merge, so that only warns, once."""
    if not _use_compiled(t):
        return EAGER
    try:
        return compiled()(*args)
    except Exception as err:
        _fallback(err)
        return EAGER


def source_params(kind: str, deltas: Sequence[torch.Tensor], densities: Sequence[float], gammas: Sequence[float], seeds: Sequence[int], work: torch.dtype, epsilons: Sequence[float] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp, ip): per-source float and int parameter rows for `_keep` (scale and weight left at 1)."""
    fp, ip = [], []
    for delta, d, g, seed in zip(deltas, densities, gammas, seeds):
        n = delta.numel()
        t_keep, cut_keep, t_drop, cut_drop, threshold = -1.0, 0, math.inf, 0, 1 << RANDOM_BITS
        if kind == "random":
            threshold = density_threshold(min(d, 1.0))
        elif kind == "rank":  # DELLA: keep probability d − ε + rank·2ε/(width − 1) along each row
            width = _rows(delta).shape[1]
            eps = epsilons[len(fp)]
            t_keep, t_drop = (d - eps, 2 * eps / max(width - 1, 1)) if d < 1.0 else (2.0, 0.0)
        elif d < 1.0:
            if kind == "magnitude":
                keep_top, drop_top = magnitude_k(n, d), 0
            else:
                keep_top, drop_top = breadcrumbs_window(n, d, g)
            (t_keep, cut_keep), (t_drop, cut_drop) = keep_largest(delta, [keep_top, drop_top])
        fp.append([t_keep, t_drop, 1.0, 1.0])
        ip.append([cut_keep, cut_drop, seed_word(seed), threshold])
    device = deltas[0].device
    return torch.tensor(fp, dtype=work, device=device), torch.tensor(ip, dtype=torch.int64, device=device)


def kept_l1(kind: str, delta: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, rank: torch.Tensor | None = None) -> float:
    """‖δ ⊙ keep‖₁ for one source (fp/ip hold that source's row only): mergekit's l1 rescale."""
    flat = delta.reshape(-1)
    rank = rank.reshape(-1) if rank is not None else None
    l1 = _compiled_call(flat, lambda: _compiled_kept_l1(kind, flat.dtype, flat.device.type), flat, fp, ip, rank)
    if l1 is not EAGER:
        return float(l1)
    return float(sum(_kept_l1_body(flat[s : s + fast.CHUNK], fp, ip, rank[s : s + fast.CHUNK] if rank is not None else None, s, kind) for s in range(0, flat.numel(), fast.CHUNK)))


def merge_into(out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor], kind: str, fp: torch.Tensor, ip: torch.Tensor, lam: float, consensus: bool, normalize: bool, ranks: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Run the fused merge: compiled over whole tensors, or eager chunk by chunk (same arithmetic)."""
    o, b = out.view(-1), base.reshape(-1)
    ds = [d.reshape(-1) for d in deltas]
    rs = [r.reshape(-1) for r in ranks]
    work = fast.work_dtype(base)
    lam_t = torch.tensor(float(lam), dtype=work, device=base.device)
    variant = (kind, len(ds), consensus, normalize, work, tuple(d.dtype for d in ds) + (b.dtype, o.dtype), b.device.type)
    if _compiled_call(b, lambda: _compiled_merge(*variant), o, b, ds, fp, ip, lam_t, rs) is not EAGER:
        return out
    for s in range(0, b.numel(), fast.CHUNK):
        e = min(b.numel(), s + fast.CHUNK)
        _merge_body(o[s:e], b[s:e], [d[s:e] for d in ds], fp, ip, lam_t, [r[s:e] for r in rs], s, kind, consensus, normalize, work)
    return out


# ---- the weighted sum (linear, task arithmetic, slerp, model stock) --------------------------------
def _weighted_sum_body(out, base, deltas, coeffs, base_coeff, work: torch.dtype) -> None:
    acc = base.to(work) * base_coeff
    for i, d in enumerate(deltas):
        acc = acc + d.to(work) * coeffs[i]
    out.copy_(acc)


@functools.lru_cache(maxsize=None)
def _compiled_weighted_sum(n: int, work: torch.dtype, dtypes: tuple, device: str):
    return _compile(functools.partial(_weighted_sum_body, work=work))


def weighted_sum_into(out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor], coeffs: Sequence[float], base_coeff: float = 1.0) -> torch.Tensor:
    """out = base_coeff·base + Σ cᵢ·δᵢ in one fused pass when compiled (fp32 accumulation for 16-bit
    tensors without a round trip through a scratch buffer); `fast.weighted_sum_into` otherwise."""
    b = base.reshape(-1)
    if _use_compiled(b):  # the tensors below are only needed for compiled code
        work = fast.work_dtype(base)
        c = torch.tensor([float(x) for x in coeffs] or [0.0], dtype=work, device=base.device)
        bc = torch.tensor(float(base_coeff), dtype=work, device=base.device)
        ds = [d.reshape(-1) for d in deltas]
        variant = (len(ds), work, tuple(d.dtype for d in ds) + (b.dtype, out.dtype), b.device.type)
        if _compiled_call(b, lambda: _compiled_weighted_sum(*variant), out.view(-1), b, ds, c, bc) is not EAGER:
            return out
    return fast.weighted_sum_into(out, base, deltas, coeffs, base_coeff)
