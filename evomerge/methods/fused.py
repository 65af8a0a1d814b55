"""One-pass TIES / DARE / breadcrumbs / DELLA merges on resident task vectors, compiled with torch.compile
(inductor: C++/OpenMP on CPU, Triton on GPU; a one-off CPU merge loads the same kernels built ahead of time,
`precompiled`) and the same code run chunk by chunk in eager mode.

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
  row; the ranks depend on δ alone and are kept resident (`row_rank_fractions`). With the seed and ε fixed
  for a search, they become margin codes (`della_inputs`): one stored value per entry against a threshold.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import fast, precompiled, sort_order
from .sparsify import breadcrumbs_window, magnitude_k

log = logging.getLogger(__name__)

M32 = 0xFFFFFFFF
RANDOM_BITS = 24  # random bits per position (DELLA's keep probabilities resolve to 2⁻²⁴)
DENSITY_BITS = 14  # DARE densities are applied on a grid of 2⁻¹⁴ (see density_threshold)
COMPILE_MIN_NUMEL = 1 << 20  # on the CPU, below this compiled code gains little and chunked eager is used
CODED = ("coded", "dare_coded", "listed")  # keep kinds that read a stored value per entry instead of positions


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
    """Keep a position when its random bits fall below this: P(keep) = density rounded to a multiple of
    2⁻¹⁴ (at least one step when density > 0). The grid lets `tabled_kept_l1` read the kept norm of any
    density from a table instead of hashing the tensor again; 6·10⁻⁵ is far below the spread of the number
    of entries a random mask keeps (√(n·d(1−d)), 5·10⁻⁴·n for a 1M-entry tensor)."""
    steps = round(float(density) * (1 << DENSITY_BITS))
    steps = min(max(steps, 1 if density > 0 else 0), 1 << DENSITY_BITS)
    return steps << (RANDOM_BITS - DENSITY_BITS)


@fast.cached_while_unmodified
def _kept_l1_tables(delta: torch.Tensor) -> dict:
    return {}


@fast.cached_while_unmodified
def _dare_codes(delta: torch.Tensor) -> dict:
    return {}


def dare_inputs(deltas: Sequence[torch.Tensor], ip: torch.Tensor) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """Each source's DARE keep kind and resident input: "dare_coded" with the density-grid code of every
    position's random bits (bits >> 10, int16), for task vectors merged eagerly on the CPU (under 1M entries;
    above, compiled code hashes inside its one pass); else "random". A search keeps one seed, so the codes are
    computed once per task vector and seed, and a candidate compares one int16 per entry instead of hashing
    it: the same masks (bits < steps·2¹⁰ exactly when bits >> 10 < steps), at 2 bytes per entry of the
    small tensors. A one-off merge hashes as before."""
    n = len(deltas)
    if fast.in_one_shot() or any(d.device.type != "cpu" or _use_compiled(d.reshape(-1)) for d in deltas):
        return ("random",) * n, []
    if any(d.numel() >= COMPILE_MIN_NUMEL for d in deltas):  # compilation off: large tensors hash as they go
        return ("random",) * n, []
    codes = []
    for i, delta in enumerate(deltas):
        cache, word = _dare_codes(delta), int(ip[i, 2])
        if word not in cache:
            if len(cache) > 2:  # one seed per search; this only bounds other uses
                cache.clear()
            bits = random_bits(_positions(delta.numel(), 0, delta.device), word)
            cache[word] = (bits >> (RANDOM_BITS - DENSITY_BITS)).to(torch.int16)
        codes.append(cache[word])
    return ("dare_coded",) * n, codes


def tabled_kept_l1(
    kind: str, delta: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, rank: torch.Tensor | None = None
) -> float | None:
    """‖δ ⊙ keep‖₁ of a DARE or DELLA mask (fp/ip: this source's row) read from a table, or None when there
    is none. A search keeps one seed, so each position's random bits are fixed and the mask of a density is
    "a fixed per-position value < a threshold on the 2⁻¹⁴ grid" — DARE: its bits; DELLA: u − 2ε·rank
    fraction, for a fixed ε. The kept norm of every threshold is then a prefix sum of |δ| binned by that
    value: built once per task vector, source and ε (fp64 sums kept as fp32, 64–128 KiB), it makes
    mergekit's l1 rescale free instead of a pass over the tensor. DELLA tabulates a (seed, ε) only when it
    comes twice in a row, since a search may vary ε with every candidate. Tensors under 1M entries: None (their
    direct pass is cheap, a table is not small); a one-off merge (`fast.one_shot`) too: each mask is used once,
    and binning every entry costs several direct passes. DELLA's margin codes (kind "coded") give the same table."""
    if kind not in ("random", "rank", "coded") or delta.numel() < COMPILE_MIN_NUMEL or fast.in_one_shot():
        return None
    slope = float(fp[0, 1]) if kind != "random" else 0.0
    key = (kind != "random", int(ip[0, 2]), slope)
    tables = _kept_l1_tables(delta)
    table = tables.get(key)
    if table is None:
        if kind == "rank" and tables.get("last") != key:  # tabulate a (seed, ε) seen twice in a row
            tables["last"] = key
            return None
        if len(tables) > 4:  # one seed (and ε) per search; this only bounds other uses
            tables.clear()
        table = tables[key] = _kept_l1_table(kind, delta, fp, ip, rank)
    grid = 1 << DENSITY_BITS
    if kind == "random":
        step = int(ip[0, 3]) >> (RANDOM_BITS - DENSITY_BITS)
    else:  # p₀'s grid step, read back from the code threshold when coded
        step = (
            int(_code_steps(fp[0, :1].to(torch.float16))) if kind == "coded" else round(float(fp[0, 0]) * grid)
        ) + grid
    return float(table[step])


def _kept_l1_table(
    kind: str, delta: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, rank: torch.Tensor | None
) -> torch.Tensor:
    """[g] = Σ |δ| over the positions a threshold at grid step g keeps (DELLA: g counts from −1)."""
    flat = delta.reshape(-1)
    grid = 1 << DENSITY_BITS
    bins = grid if kind == "random" else 2 * grid
    hist = torch.zeros(bins, dtype=torch.float64, device=flat.device)
    fp_dev, ip_dev = fast.to_device(fp, flat.device), fast.to_device(ip, flat.device)
    for s in range(0, flat.numel(), fast.CHUNK):
        chunk = flat[s : s + fast.CHUNK]
        bits = random_bits(_positions(chunk.numel(), s, flat.device), ip_dev[0, 2]) if kind != "coded" else None
        if kind == "random":
            step = bits >> (RANDOM_BITS - DENSITY_BITS)
        elif kind == "coded":  # steps clamped at −1 (`_encode_margins`): every p₀ ≥ 0 keeps those alike
            step = _code_steps(rank.reshape(-1)[s : s + fast.CHUNK]) + grid
        else:  # the merge keeps v < p₀ with v computed as in `_keep`; p₀ on the grid, so v < p₀ ⇔ ⌊v·2¹⁴⌋ < p₀·2¹⁴
            v = _della_margin(bits, rank.reshape(-1)[s : s + fast.CHUNK], fp_dev, 0)
            step = (torch.floor(v * grid).long() + grid).clamp_(0, bins - 1)
        hist.index_add_(0, step.long(), chunk.abs().double())
    table = torch.cat([hist.new_zeros(1), hist.cumsum(0)]).float()
    fast.return_freed_memory()  # the chunks' temporaries, freed around a long-lived table (measured: 0.3 GB kept)
    return table


def _della_margin(bits: torch.Tensor, fraction: torch.Tensor, fp: torch.Tensor, i: int) -> torch.Tensor:
    """u − 2ε·(rank fraction): DELLA keeps a position when this is below p₀ = density − ε."""
    return bits.to(fp.dtype) * (1.0 / (1 << RANDOM_BITS)) - fraction.to(fp.dtype) * fp[i, 1]


# ---- exact magnitude thresholds ------------------------------------------------------------------
@dataclass(frozen=True)
class MagnitudeIndex:
    """Exact counts of |δ| in bins whose edges are quantiles of a sample of |δ| (fp32 task vectors) or
    every distinct value (16-bit task vectors, which have at most 32768). Depends on δ alone, so a resident
    task vector computes it once; any k-th largest value is then in a known small bin."""

    edges: np.ndarray  # fp32, strictly increasing; bin b holds edges[b-1] ≤ |δ| < edges[b]
    at_or_above: np.ndarray  # int64; [b] = number of entries in bins ≥ b (len = bins + 1, then a 0)
    one_value_bins: bool = False  # bin b ≥ 1 holds only the value edges[b-1]
    patterns: np.ndarray | None = None  # one-value bins: [b-1] = the bit pattern (int16) of bin b's |δ|


def _abs_patterns(x: torch.Tensor) -> torch.Tensor:
    """|x|'s bit patterns (0..32767, int16) for a 16-bit float x: for non-negative floats, pattern order is
    value order."""
    return x.view(torch.int16) & 0x7FFF


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
            per_pattern += torch.bincount(_abs_patterns(flat[s : s + fast.CHUNK]).to(torch.int32), minlength=1 << 15)
        present = per_pattern.nonzero().view(-1)
        edges = present.to(torch.int16).view(delta.dtype).float()
        counts = torch.cat([per_pattern.new_zeros(1), per_pattern[present]])
        patterns = present.to(torch.int16).cpu().numpy()
    else:
        patterns = None
        sample = fast.abs_sample(delta, size=4 * bins)
        edges = torch.unique_consecutive(sample[4::4]).contiguous()
        counts = torch.zeros(edges.numel() + 1, dtype=torch.int64, device=delta.device)
        for s in range(0, flat.numel(), fast.CHUNK):
            a = flat[s : s + fast.CHUNK].abs().float()
            counts += torch.bincount(torch.bucketize(a, edges, right=True), minlength=edges.numel() + 1)
    at_or_above = torch.cat([counts.flip(0).cumsum(0).flip(0), counts.new_zeros(1)])
    return MagnitudeIndex(
        edges.cpu().numpy(), at_or_above.cpu().numpy(), one_value, patterns
    )  # host arrays: a lookup needs no GPU sync


def keep_largest(
    delta: torch.Tensor, ks: Sequence[int], index: MagnitudeIndex | None = None
) -> list[tuple[float, int]]:
    """For each k: (t, cut) such that "|δ| > t, or |δ| == t at a position < cut" holds for exactly the k
    largest entries of δ, ties at the threshold broken by position (first positions first). All ks share
    one pass over δ (breadcrumbs needs two)."""
    flat = delta.reshape(-1)
    n = flat.numel()
    result: list[tuple[float, int] | None] = [(-1.0, 0) if k >= n else (math.inf, 0) if k <= 0 else None for k in ks]
    todo = [i for i, r in enumerate(result) if r is None]
    if not todo:
        return result  # type: ignore[return-value]
    if n <= DIRECT_TOP_K:  # a norm vector or bias: kthvalue on the whole tensor is cheaper than its index
        a = flat.abs().to(fast.work_dtype(flat))
        for i in todo:
            t, cut = fast.kth_largest(a, ks[i])
            result[i] = (float(t), cut)
        return result  # type: ignore[return-value]
    if index is None and fast.in_one_shot():  # used once: an index would cost more than it saves
        a = fast.kept_magnitudes(flat)
        for i in todo:
            t, cut, ties = fast.kth_largest_bracketed(a, ks[i])
            result[i] = (t, cut)
            if ties is not None:
                ties_found(delta)[t] = ties
        return result  # type: ignore[return-value]
    index = index or magnitude_index(delta)
    above, edges = index.at_or_above, index.edges
    bins = []  # (b, lo, hi, need, size) of the bin b holding each k-th largest
    for i in todo:
        j = int(np.searchsorted(-above, -ks[i], side="right")) - 1  # the last bin b with above[b] ≥ k
        lo = float(edges[j - 1]) if j > 0 else -1.0
        hi = float(edges[j]) if j < edges.size else math.inf
        bins.append((j, lo, hi, ks[i] - int(above[j + 1]), int(above[j] - above[j + 1])))
    if index.one_value_bins:  # t is the bin's value; only a cut inside its ties may need a pass
        for i, (j, lo, _, need, size) in zip(todo, bins):
            result[i] = (lo, n if need >= size else _nth_tie(delta, j - 1, int(index.patterns[j - 1]), need, size) + 1)
        return result  # type: ignore[return-value]
    if flat.device.type == "cpu" and fast.HOST_NUMPY:
        for i, found in zip(todo, _nth_in_bins(flat, [(lo, hi, need) for _, lo, hi, need, _ in bins])):
            result[i] = found
        return result  # type: ignore[return-value]
    positions, values = _bin_members(flat, [(lo, hi) for _, lo, hi, _, _ in bins])
    for i, (_, lo, hi, need, _) in zip(todo, bins):
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


@fast.cached_while_unmodified
def ties_found(delta: torch.Tensor) -> dict[float, torch.Tensor]:
    """t → the positions (ascending) of every entry with |δ| == t (in the work dtype), where a selection of δ
    had them at hand: mergekit's tie order then needs no pass over δ to find a cut's ties."""
    return {}


def _nth_in_bins(flat: torch.Tensor, bins: Sequence[tuple[float, float, int]]) -> list[tuple[float, int]]:
    """CPU, fp32/fp64 δ: for each bin lo ≤ |δ| < hi, the (t, cut) keeping its `need` largest members (ties by
    position). The members come from the blocks the counting pass found; one lexsort by (−|δ|, position)
    puts the needth member at index need − 1. In numpy: a few µs an op, where the same in torch's small-tensor
    ops (`_bin_members`, still a GPU's way) cost ~0.5 ms more per task vector and tensor."""
    n = flat.numel()
    bounds = torch.tensor([(lo, hi) for lo, hi, _ in bins], dtype=torch.float32)
    blocks = np.flatnonzero(_block_counts_into(flat, bounds).numpy())
    pos = (blocks[:, None] * BLOCK + np.arange(BLOCK)).ravel()
    if n % BLOCK:  # the last block is partial
        pos = pos[pos < n]
    a = np.abs(flat.detach().numpy()[pos])
    binned = a.astype(np.float32)  # bins are fp32, as counted
    found = []
    for lo, hi, need in bins:
        inside = (binned >= np.float32(lo)) & (binned < np.float32(hi))
        p, v = pos[inside], a[inside]
        m = np.lexsort((p, -v))[need - 1]
        found.append((float(v[m]), int(p[m]) + 1))
    return found


DIRECT_TOP_K = 1 << 14  # `keep_largest` on tensors up to this size: straight from kthvalue (~40 µs at 1K entries)
TIE_STRIDE = 64  # `tie_index` records where every 64th entry of each 16-bit |δ| value lies


@dataclass(frozen=True)
class TieIndex:
    """Where the entries of each |δ| value of a 16-bit task vector lie: the positions of its 1st, 65th,
    129th, ... entries in position order. The nth entry equal to a value is then in the stretch between two
    records, which holds 64 entries of that value (typically ~10⁴ entries in all), instead of anywhere in the
    tensor. 4 bytes per 64 entries: 3 % of a 16-bit task vector."""

    first: np.ndarray  # [v] = index in `positions` of the first record of the vth |δ| value present (the
    # order of `MagnitudeIndex.patterns`); one entry per value present, not per bit pattern: 2¹⁵ int64s each
    # would cost 256 KiB per task vector and tensor, more than a norm vector's whole index
    positions: np.ndarray  # int32 or int64


@fast.cached_while_unmodified
def tie_index(delta: torch.Tensor) -> TieIndex:
    """`TieIndex` of a 16-bit task vector, from a stable sort of |δ|'s patterns a chunk at a time. Depends on δ
    alone, so a resident task vector builds it once (≈0.4 s per 32M entries on 2 cores); 16-bit TIES and
    breadcrumbs need it for nearly every tensor, since their threshold value has ties."""
    flat = delta.reshape(-1)
    patterns = 1 << 15
    index = magnitude_index(delta)  # its bins are the values present, with their counts
    per_pattern = torch.zeros(patterns, dtype=torch.int64)
    per_pattern[torch.from_numpy(index.patterns).long()] = torch.from_numpy(
        index.at_or_above[1:-1] - index.at_or_above[2:]
    )
    per_pattern = per_pattern.to(flat.device)
    records = (per_pattern + TIE_STRIDE - 1) // TIE_STRIDE
    first = records.cumsum(0) - records
    positions = torch.empty(
        int(records.sum()), dtype=torch.int32 if flat.numel() < 2**31 else torch.int64, device=flat.device
    )
    seen = torch.zeros_like(per_pattern)  # entries of each value in the chunks before this one
    every_pattern = torch.arange(patterns, device=flat.device)
    chunk = 4 * fast.CHUNK
    for s in range(0, flat.numel(), chunk):
        piece = _abs_patterns(flat[s : s + chunk])
        order = torch.sort(piece, stable=True).indices  # each value's entries together, in position order
        counts = torch.bincount(piece.to(torch.int32), minlength=patterns)
        done = (seen + TIE_STRIDE - 1) // TIE_STRIDE  # records of each value written before this chunk
        new = (seen + counts + TIE_STRIDE - 1) // TIE_STRIDE - done
        value = torch.repeat_interleave(every_pattern, new)  # one row per record in this chunk
        nth = torch.arange(value.numel(), device=flat.device) - (new.cumsum(0) - new)[value]  # of its value's here
        in_order = (counts.cumsum(0) - counts)[value] + done[value] * TIE_STRIDE - seen[value] + TIE_STRIDE * nth
        positions[first[value] + done[value] + nth] = (order[in_order] + s).to(positions.dtype)
        seen += counts
    fast.return_freed_memory()  # the chunks' temporaries, freed around a long-lived index
    present = first.cpu()[torch.from_numpy(index.patterns).long()]
    return TieIndex(present.to(positions.dtype).numpy(), positions.cpu().numpy())


def _nth_tie(delta: torch.Tensor, value: int, pattern: int, nth: int, total: int) -> int:
    """Position of the nth (1-based, in position order) of the `total` entries of 16-bit δ whose |δ| is the
    `value`th value present (bit pattern `pattern`): a scan between the two `tie_index` records around it."""
    flat = delta.reshape(-1)
    ties = tie_index(delta)
    j = (nth - 1) // TIE_STRIDE  # the last record at or before the nth entry
    record = int(ties.first[value]) + j
    begin = int(ties.positions[record])
    end = int(ties.positions[record + 1]) if (j + 1) * TIE_STRIDE < total else flat.numel()
    stretch, nth = flat[begin:end], nth - j * TIE_STRIDE
    if stretch.numel() > SCAN:  # a rare value's last stretch: counted block by block
        value = float(torch.tensor(pattern, dtype=torch.int16).view(flat.dtype))
        return begin + _nth_position(stretch, value, nth, min(TIE_STRIDE, total - j * TIE_STRIDE))
    if stretch.device.type == "cpu" and fast.HOST_NUMPY:  # numpy: ~15 µs a typical stretch, torch ~70
        return begin + int(np.flatnonzero((stretch.detach().view(torch.int16).numpy() & 0x7FFF) == pattern)[nth - 1])
    return begin + int((_abs_patterns(stretch) == pattern).nonzero()[nth - 1])  # a GPU's scan


def _rows(delta: torch.Tensor) -> torch.Tensor:
    """DELLA's rows: a 1-D tensor is one row, otherwise the first dimension indexes them."""
    return delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)


def row_rank_fractions(delta: torch.Tensor) -> torch.Tensor:
    """rank / (width − 1) of every |δ| within its row (0 = smallest, 1 = largest; ties by position), the
    quantity DELLA's keep probability is linear in. Depends on δ alone, so `della_inputs` computes it once per
    resident task vector and keeps it: 2 bytes per entry (fp16) — the memory DELLA trades for not sorting per
    candidate.
    fp16 rounds a fraction by at most 2⁻¹², so a keep probability d − ε + 2ε·fraction is off by at most
    2ε·2⁻¹² (5·10⁻⁵ at ε = 0.1; mergekit itself computes it in bf16 for bf16 tensors, to ~4·10⁻³). Stored as
    a float, not an integer rank: compiled CPU code widens 16-bit floats with one vector instruction, while
    int16 widening or bit casts cost more than the rest of the DELLA merge."""
    rows = _rows(delta)
    width = rows.shape[1]
    mantissa = {torch.bfloat16: 7, torch.float16: 10}.get(delta.dtype, 23)  # |δ|'s mantissa bits, in fp32
    fractions = torch.empty(rows.shape, dtype=torch.float16, device=delta.device)
    steps = (torch.arange(width, device=delta.device, dtype=torch.float32) / max(width - 1, 1)).expand(
        min(rows.shape[0], 256), -1
    )

    def rank(s: int) -> None:  # a few rows at a time: the sort's scratch stays small
        order = _row_order(rows[s : s + 256].abs().float(), mantissa)
        fractions[s : s + 256] = torch.empty(order.shape, dtype=torch.float32, device=delta.device).scatter_(
            1, order, steps[: order.shape[0]]
        )

    starts = range(0, rows.shape[0], 256)
    if delta.device.type == "cpu" and fast.HOST_NUMPY and len(starts) > 1:  # numpy's sort runs on one core
        with ThreadPoolExecutor(torch.get_num_threads()) as pool:
            list(pool.map(rank, starts))
    else:
        for s in starts:
            rank(s)
    return fractions.view(delta.shape)


NARROW_ROW_BITS = 11  # fp32 rows up to 2¹¹ wide sort on 32-bit keys: wider ones would have too many runs to reorder


def _row_order(magnitudes: torch.Tensor, mantissa_bits: int = 23) -> torch.Tensor:
    """Each row's positions in ascending order of its (non-negative fp32) values, ties by position. On the CPU
    numpy sorts unique integer keys (the value's bits, then the position), so its unstable SIMD sort keeps ties
    by position. 32-bit keys (5–9 ns per entry) hold a value's top 32 − b bits and the position (rows of
    ≤ 2ᵇ entries): all of 16-bit task vectors' values up to 2¹⁷ (bf16) or 2¹⁴ (fp16) wide (`mantissa_bits`: 7
    or 10; their low bits are zero); in narrow fp32 rows, the few values that share those top bits are put in
    order again (`_reorder_runs`: ~1 % of the entries 1024 wide; ~14 % 2816 wide and most 4096 wide, too many).
    Other rows take 64-bit keys, the whole value (13–19 ns); torch's stable row sort takes 38–54."""
    width = magnitudes.shape[1]
    bits = max(1, (width - 1).bit_length())
    if magnitudes.device.type != "cpu" or not fast.HOST_NUMPY:
        return magnitudes.sort(dim=1, stable=True).indices
    values = magnitudes.numpy().view(np.int32)
    exact = bits - 1 <= 23 - mantissa_bits  # the value bits a 32-bit key drops are zero
    if not exact and bits > NARROW_ROW_BITS:
        keys = values.astype(np.int64)
        keys <<= bits
    else:
        keys = (values >> (bits - 1)).astype(np.uint32)
        keys <<= bits
    keys |= np.arange(width, dtype=keys.dtype)
    keys.sort(axis=1)
    if keys.dtype == np.uint32 and not exact:
        _reorder_runs(keys, values, bits)
    keys &= keys.dtype.type((1 << bits) - 1)
    return torch.from_numpy(keys.astype(np.int64, copy=False))


def _reorder_runs(keys: np.ndarray, values: np.ndarray, bits: int) -> None:
    """Row-sorted keys (value's top bits, then position) put in the order of whole values (`values`, int32
    bits) where neighbours share their top bits. Such a run is in position order, so a stable sort by
    (run, whole value) keeps equal values by position. Found from the neighbour pairs alone, without sorting."""
    rows, width = keys.shape
    top = keys >> bits
    pairs = np.flatnonzero(top[:, 1:] == top[:, :-1])  # j, j + 1 share their top bits: row·(width − 1) + j
    if not pairs.size:
        return
    pairs += pairs // (width - 1)  # flat indices into keys, ascending
    starts = np.empty(pairs.size, dtype=bool)  # a pair that does not continue the one before starts a run
    starts[0] = True
    np.not_equal(pairs[1:], pairs[:-1] + 1, out=starts[1:])
    run = np.cumsum(starts)
    ends = np.flatnonzero(np.append(starts[1:], True))  # each run's last pair: its right entry ends the run
    members, run = np.insert(pairs, ends + 1, pairs[ends] + 1), np.insert(run, ends + 1, run[ends])
    flat = keys.reshape(-1)
    found = flat[members]
    positions = (found & np.uint32((1 << bits) - 1)).astype(np.int64)
    whole = values.reshape(-1)[members - members % width + positions]
    flat[members] = found[np.argsort((run.astype(np.int64) << 31) | whole, kind="stable")]


@fast.cached_while_unmodified
def _della_state(delta: torch.Tensor) -> dict:
    return {"values": None, "coded_for": None, "last": None, "given_up": False}


def della_inputs(
    deltas: Sequence[torch.Tensor], fp: torch.Tensor, ip: torch.Tensor
) -> tuple[tuple[str, ...], list[torch.Tensor]]:
    """Each source's DELLA keep kind and resident input: "rank" with its rank fractions, or "coded" with
    margin codes. Why: a search keeps one seed, so each position's random bits are fixed, and with a fixed ε
    the margin u − 2ε·fraction that DELLA compares with p₀ is fixed too. When a source's (seed, ε) comes
    twice in a row, its fractions are turned, in place, into the grid step of that margin (`_encode_margins`);
    a candidate then compares one stored value per entry instead of hashing every position (measured on
    3 × 32M bf16: 45 → 29 ms). Same memory, same masks. A later (seed, ε) needs the fractions back, a
    row sort (~1.2 s per 32M entries): that task vector then keeps its fractions for good. Coded sources'
    fp[i, 0] is rewritten to their code threshold (`margin_code`; a density of 1 keeps every code)."""
    kinds, values = [], []
    for i, delta in enumerate(deltas):
        state, key = _della_state(delta), (int(ip[i, 2]), float(fp[i, 1]))
        step = round(float(fp[i, 0]) * (1 << DENSITY_BITS))  # p₀ on its grid; ≥ 2¹⁴: density 1, all kept
        if step < 0:
            raise ValueError(f"DELLA: density − epsilon must not be negative (source {i}: p₀ = {float(fp[i, 0])})")
        if step < 1 << DENSITY_BITS:
            if state["coded_for"] not in (None, key):  # codes for another ε: sort again, and stay with fractions
                state.update(values=None, coded_for=None, given_up=True)
            if (
                state["values"] is not None
                and state["coded_for"] is None
                and state["last"] == key
                and not state["given_up"]
            ):
                _encode_margins(state["values"], key[0], fp[i : i + 1])
                state["coded_for"] = key
            state["last"] = key
        if state["values"] is None:
            state["values"] = row_rank_fractions(delta)
        coded = state["coded_for"] is not None
        if coded:
            fp[i, 0] = margin_code(step) if step < 1 << DENSITY_BITS else math.inf
        kinds.append("coded" if coded else "rank")
        values.append(state["values"])
    return tuple(kinds), values


def margin_code(step: int) -> float:
    """The value of the fp16 whose bit pattern is step + 1 (step ≥ −1): for non-negative fp16s, pattern
    order is value order, so comparing these values compares the steps — exactly, with no integer
    conversion in the kernel (16-bit integer loads compile to scalar code on the CPU)."""
    return float(torch.tensor(step + 1, dtype=torch.int16).view(torch.float16))


def _encode_margins(fractions: torch.Tensor, word: int, fp: torch.Tensor) -> None:
    """Overwrite rank fractions with `margin_code(⌊(u − slope·fraction)·2¹⁴⌋)` per position, the margin
    computed as the merge computes it (`_della_margin`, slope fp[0, 1], in fp's dtype). The floor is clamped
    at −1: p₀ ≥ 0 on its grid, so every lower step is kept alike."""
    flat = fractions.view(-1)
    row = fast.to_device(fp.clone(), flat.device)
    word_t = torch.tensor(word, dtype=torch.int64, device=flat.device)
    for s in range(0, flat.numel(), fast.CHUNK):
        piece = flat[s : s + fast.CHUNK]
        margin = _della_margin(random_bits(_positions(piece.numel(), s, flat.device), word_t), piece, row, 0)
        steps = torch.floor(margin * (1 << DENSITY_BITS)).clamp_(min=-1) + 1
        piece.copy_(steps.to(torch.int16).view(torch.float16))


def _code_steps(codes: torch.Tensor) -> torch.Tensor:
    """The margin grid steps (≥ −1, int64) that `_encode_margins` stored as codes."""
    return codes.contiguous().view(torch.int16).long() - 1


BLOCK = 32  # positions are collected from the blocks of this size that hold any bin member


def _bin_members(flat: torch.Tensor, ranges: Sequence[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (ascending) and fp32 |δ| of the entries inside any range lo ≤ |δ| < hi. One counting pass
    per block (a reduction: no mask is written), then only the few blocks holding members are looked at."""
    bounds = fast.to_device(torch.tensor(list(ranges), dtype=torch.float32), flat.device)  # bins are fp32, as counted
    blocks = _block_counts_into(flat, bounds).nonzero().view(-1)
    pos = (blocks.view(-1, 1) * BLOCK + torch.arange(BLOCK, device=flat.device)).view(-1)
    if flat.numel() % BLOCK:  # the last block is partial
        pos = pos[pos < flat.numel()]
    a = flat[pos].abs().float()
    inside = _in_ranges(a, bounds)
    return pos[inside], a[inside]


SCAN = 1 << 22  # entries per step of `_nth_position`'s scan on the CPU (a multiple of BLOCK)


def _nth_position(flat: torch.Tensor, value: float, nth: int, total: int) -> int:
    """Position of the nth (1-based, in position order) of the `total` entries with |δ| == value (a value
    of flat's 16-bit dtype). Counts chunk by chunk from the nearer end and stops in the chunk holding it: a
    quarter of a pass on average instead of a whole one (`_nth_tie` uses it for a rare value's long last
    stretch). A GPU counts the whole tensor at once: each chunk would cost a wait for it."""
    bounds = fast.to_device(torch.tensor([value], dtype=flat.dtype), flat.device)
    scan = SCAN if flat.device.type == "cpu" else max(flat.numel(), 1)
    from_back = nth > total / 2
    want = total - nth + 1 if from_back else nth  # counted from the end the scan starts at
    starts = range(0, flat.numel(), scan)
    seen = 0
    for start in reversed(starts) if from_back else starts:
        seg = flat[start : start + scan]
        counts = _block_counts_into(seg, bounds, part_of=flat)
        found = total if len(starts) == 1 else int(counts.sum())
        if seen + found >= want:
            k = want - seen if not from_back else found - (want - seen) + 1  # in position order within seg
            return start + _kth_member(seg, counts, k, bounds)
        seen += found
    raise ValueError(f"fewer than {want} entries equal to {value}")


def _kth_member(seg: torch.Tensor, counts: torch.Tensor, k: int, bounds: torch.Tensor) -> int:
    """Position in `seg` of its kth (1-based) entry inside the ranges, from its per-BLOCK counts: the
    block by a search of the running counts, then that block's entries."""
    before = counts.cumsum(0)
    b = torch.searchsorted(before, k)  # the first block whose running count reaches k
    idx = b * BLOCK + torch.arange(BLOCK, device=seg.device)
    hits = _members(seg[idx.clamp(max=seg.numel() - 1)], bounds) & (idx < seg.numel())
    rest = k - (before[b] - counts[b])  # how many of the block's hits to count
    return int(idx[torch.searchsorted(hits.cumsum(0), rest.view(1))])


def _members(x: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Which entries have |x| in a range of `bounds`: rows (lo, hi) in fp32 for lo ≤ |x| < hi, or one value of
    x's dtype for |x| equal to it (a 16-bit bin holds one value; one compare in 16 bits is the cheaper test)."""
    if bounds.dim() == 1:
        return x.abs() == bounds[0]
    return _in_ranges(x.abs().float(), bounds)


def _in_ranges(a: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    inside = (a >= bounds[0, 0]) & (a < bounds[0, 1])
    for r in range(1, bounds.shape[0]):
        inside = inside | ((a >= bounds[r, 0]) & (a < bounds[r, 1]))
    return inside


def _block_counts_into(flat: torch.Tensor, bounds: torch.Tensor, part_of: torch.Tensor | None = None) -> torch.Tensor:
    """Per BLOCK of flat (the last one may be partial), how many entries are `_members` of bounds (a
    reduction pass). `part_of`: the tensor `flat` is a piece of, which decides compiled or eager as it would
    for the whole."""
    n = flat.numel()
    full = n - n % BLOCK
    counts = fast.scratch(-(-n // BLOCK), torch.int64, flat.device, slot=70)
    if full < n:
        counts[-1] = _members(flat[full:], bounds).sum()
    whole = counts[: full // BLOCK]
    if (
        full == 0
        or _compiled_call(
            flat if part_of is None else part_of,
            ("block_counts", flat.dtype, flat.device.type, tuple(bounds.shape), bounds.dtype),
            _block_counts,
            flat[:full],
            bounds,
            whole,
        )
        is not EAGER
    ):
        return counts
    for s in range(0, full, fast.CHUNK):  # CHUNK is a multiple of BLOCK
        e = min(full, s + fast.CHUNK)
        _block_counts(flat[s:e], bounds, whole[s // BLOCK : e // BLOCK])
    return counts


def _block_counts(flat: torch.Tensor, bounds: torch.Tensor, counts: torch.Tensor) -> None:
    # summed as fp32 ones (exact up to 2²⁴ ≥ BLOCK): compiled CPU code reduces floats twice as fast as integers
    counts.copy_(torch.where(_members(flat.view(-1, BLOCK), bounds), 1.0, 0.0).sum(dim=1))


# ---- the fused merge -------------------------------------------------------------------------------
def _keep(
    kind: str,
    a: torch.Tensor,
    idx: torch.Tensor,
    fp: torch.Tensor,
    ip: torch.Tensor,
    i: int,
    rank: torch.Tensor | None = None,
) -> torch.Tensor:
    """Source i's keep predicate. kind: magnitude (TIES), window (breadcrumbs), random (DARE), rank or coded
    (DELLA), listed (a stored mask).
    fp[i] = (t_keep, t_drop, scale, weight) — for "rank" the first two are (p₀, slope) of the keep
    probability p₀ + slope·(rank fraction); ip[i] = (cut_keep, cut_drop, seed word, random threshold)."""
    if kind == "random":
        return random_bits(idx, ip[i, 2]) < ip[i, 3]
    if kind == "dare_coded":  # DARE with its codes (`dare_inputs`): the threshold on the same grid
        return rank < (ip[i, 3] >> (RANDOM_BITS - DENSITY_BITS))
    if kind == "rank":
        return _della_margin(random_bits(idx, ip[i, 2]), rank, fp, i) < fp[i, 0]
    if kind == "coded":  # DELLA with margin codes (`della_inputs`): fp[i, 0] is the code threshold
        return rank.to(fp.dtype) < fp[i, 0]
    if kind == "listed":  # the keep mask itself (`merge_at`)
        return rank
    keep = (a > fp[i, 0]) | ((a == fp[i, 0]) & (idx < ip[i, 0]))
    if kind == "window":  # minus the top outliers
        keep = keep & ~((a > fp[i, 1]) | ((a == fp[i, 1]) & (idx < ip[i, 1])))
    return keep


def _positions(n: int, offset: int, device: torch.device) -> torch.Tensor:
    """Flat positions offset..offset+n−1, in int32 when they fit (half the integer work of int64)."""
    return torch.arange(n, device=device, dtype=torch.int32 if offset + n < 2**31 else torch.int64) + offset


def _merge_body(
    out,
    base,
    deltas,
    fp,
    ip,
    lam,
    ranks,
    offset: int,
    kinds: tuple[str, ...],
    consensus: bool,
    normalize: bool,
    work: torch.dtype,
) -> None:
    """out = base + merged change, elementwise over flat (chunks of) tensors starting at `offset`, source i
    kept by rule kinds[i]; arithmetic in `work` (fp32, or fp64 for fp64 models)."""
    idx = _positions(base.numel(), offset, base.device) if set(kinds) - set(CODED) else None
    kept = []
    for i, d in enumerate(deltas):
        x = d.to(work)
        kept.append(
            torch.where(_keep(kinds[i], x.abs(), idx, fp, ip, i, ranks[i] if ranks else None), x * fp[i, 2], 0.0)
        )
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


def _kept_l1_body(deltas, fp, ip, ranks, offset: int, kinds: tuple[str, ...]) -> torch.Tensor:
    idx = _positions(deltas[0].numel(), offset, deltas[0].device) if set(kinds) - set(CODED) else None
    kept, whole = [], []
    for i, d in enumerate(deltas):
        a = d.to(fast.work_dtype(d)).abs()
        keep = _keep(kinds[i], a, idx, fp, ip, i, ranks[i] if ranks else None)
        kept.append(torch.where(keep, a, 0.0).sum(dtype=torch.float64))
        whole.append(a.sum(dtype=torch.float64))
    return torch.stack(kept + whole)


# ---- compiled or eager --------------------------------------------------------------------------
def compile_mode() -> str:
    """EVOMERGE_COMPILE: 'auto' (default: compile tensors ≥ 1M entries on the CPU, every tensor on a GPU,
    where the eager code's ~40 kernel launches cost more than a small tensor's work), 'on' (all), 'off'
    (never)."""
    mode = os.environ.get("EVOMERGE_COMPILE", "auto").lower()
    return {"1": "on", "true": "on", "0": "off", "false": "off"}.get(mode, mode)


_compile_failed = False


def _compiling_allowed() -> bool:
    return not _compile_failed and compile_mode() != "off"


MANY_CANDIDATES = 100  # a search this long compiles small tensors' kernels too (see expect_candidates)
_expected_candidates = 1


def expect_candidates(n: int) -> None:
    """Say how many candidates this process will merge. A long search on the CPU then compiles the kernels of
    tensors under 1M entries too: compiling costs ~20 s once (~5 s from inductor's disk cache), eager kernels
    ~0.25 s more per candidate on the demo model (1.8M parameters, 3 sources), so it pays from ~100 candidates."""
    global _expected_candidates
    _expected_candidates = max(1, int(n))


ONE_SHOT_COMPILE_MIN = 50_000_000  # entries a one-off CPU merge must write before compiling pays (see below)


def _use_compiled(t: torch.Tensor) -> bool:
    """Compiled code for `t`? On the CPU a one-off merge (`fast.one_shot`) compiles only when it writes at least
    ONE_SHOT_COMPILE_MIN entries: its kernels are built ahead of time once (`precompiled`, ~7 s per variant,
    then loaded in milliseconds), and the compiled TIES/DARE pass saves ~70–85 ns per entry over the eager one
    (16M entries, 3 sources: 20 vs 92 ns, 3 vs 88 ns)."""
    if not _compiling_allowed():
        return False
    if compile_mode() == "on" or t.device.type != "cpu":
        return True
    if fast.in_one_shot():
        return t.numel() >= COMPILE_MIN_NUMEL and fast.one_shot_entries() >= ONE_SHOT_COMPILE_MIN
    many = _expected_candidates >= MANY_CANDIDATES and t.numel() > 1
    return t.numel() >= COMPILE_MIN_NUMEL or many


def _compile(fn):
    """Every variant (method kind, source count, dtypes) of one body function shares dynamo's cache for that
    function's code, so its recompile limit (default 8) must cover them all."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, 0) < 256:
            setattr(dynamo_config, name, 256)
    if getattr(dynamo_config, "accumulated_recompile_limit", 1 << 30) < 4096:
        dynamo_config.accumulated_recompile_limit = 4096
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"post_grad_custom_post_pass": _cache_key_pass()})


@functools.lru_cache(maxsize=None)
def _cache_key_pass():
    """A graph pass that does nothing but name `_tile_by_16bit_lanes` in inductor's on-disk cache key, so
    kernels generated without it (an earlier evomerge, or a plain torch.compile of the same graph) are not
    served in its place."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class TilingVersion(CustomGraphPass):
        def __call__(self, graph) -> None:
            pass

        def uuid(self) -> str:
            return "evomerge-16bit-lane-tiling-1"

    return TilingVersion()


def _merge_kernel(kinds: tuple[str, ...], consensus: bool, normalize: bool, work: torch.dtype) -> Callable:
    return functools.partial(_merge_body, offset=0, kinds=kinds, consensus=consensus, normalize=normalize, work=work)


def _fallback(err: Exception) -> None:
    global _compile_failed
    _compile_failed = True
    log.warning("torch.compile failed (%s); merging with the eager kernels from now on", err)


EAGER = object()  # `_compiled_call`'s answer when the caller should run its eager code


_ran: set = set()  # (key, ahead of time) of compiled kernels that have run: their code exists (for every size)
_dynamo_kernels: dict[tuple, Callable] = {}  # torch.compile'd kernel bodies by key
AHEAD_OF_TIME = True  # one-off CPU merges run kernels compiled ahead of time (`precompiled`), not through dynamo
_aot_failed: set = set()  # keys whose ahead-of-time build failed: they run through dynamo


def _compiled_call(t: torch.Tensor, key: tuple, body: Callable, *args: Any, reuse_for_small: bool = False) -> Any:
    """body(*args) compiled, when compiled code is in use for tensors like `t`; EAGER when it is not (mode,
    size) or the compiler failed — a broken toolchain must not stop a merge, so that only warns, once. `key`
    names body's variant (one compiled kernel per key). `reuse_for_small`: a tensor below the size that pays
    for compiling still runs code compiled already for a larger one — a fused merge is ~100 eager ops of ~4 µs
    each, one compiled call ~80 µs."""
    use = _use_compiled(t)
    if not use and not (reuse_for_small and t.numel() > 1 and _compiling_allowed()):
        return EAGER  # (one entry: inductor specializes sizes 0 and 1, so it would compile again)
    ran = (key, _ahead_of_time(t, key))  # (a small tensor reuses only the kind of code that ran: no new build)
    if not use and ran not in _ran:
        return EAGER
    try:
        result = _run_compiled(t, key, body, args)
    except Exception as err:
        _fallback(err)
        return EAGER
    _ran.add(ran)
    return result


def _ahead_of_time(t: torch.Tensor, key: tuple) -> bool:
    return AHEAD_OF_TIME and t.device.type == "cpu" and fast.in_one_shot() and key not in _aot_failed


def _run_compiled(t: torch.Tensor, key: tuple, body: Callable, args: tuple) -> Any:
    tiling = _tile_by_16bit_lanes if t.device.type == "cpu" else contextlib.nullcontext
    if _ahead_of_time(t, key):
        try:
            return precompiled.call(key, body, args, compiling=tiling)
        except Exception as err:  # an export this torch cannot do: the same kernel through dynamo
            _aot_failed.add(key)
            log.info("no ahead-of-time kernel for %s (%s); compiling it with torch.compile", key[0], err)
    if key not in _dynamo_kernels:
        _dynamo_kernels[key] = _compile(body)
    with tiling():
        return _dynamo_kernels[key](*(_unviewed(a) for a in args))


def _unviewed(arg: Any) -> Any:
    """A tensor argument (or list of them) as a plain tensor on the same memory, not a view: dynamo guards on
    a view's base, so the flattened views of matrices and of vectors would compile the same kernel twice
    (~1 s each time, even from inductor's cache)."""
    if isinstance(arg, (list, tuple)):
        return type(arg)(_unviewed(a) for a in arg)
    if not isinstance(arg, torch.Tensor) or arg._base is None:
        return arg
    plain = torch.empty(0, dtype=arg.dtype, device=arg.device)
    return plain.set_(arg.untyped_storage(), arg.storage_offset(), arg.shape, arg.stride())


@contextlib.contextmanager
def _tile_by_16bit_lanes():
    """While our kernels compile: inductor's CPU code generator tiles a fused loop by 16-bit lanes only when
    every loop body in it touches one 16-bit float type. Ours always have fp32-only bodies too (the sign
    election's sums), so bf16 merges were tiled by fp32 lanes, and each bf16 load and store became a
    partial-vector copy through memory: 16-bit TIES ran 3–4× slower than fp32 for that alone. Here the
    tiling follows the 16-bit dtype when one body has it (fp32 bodies then run on two fp32 vectors, as in
    any bf16 kernel). Only the tiling choice changes, not the arithmetic; on a torch without these
    internals it does nothing."""
    try:
        from torch._inductor.codegen import cpp
    except ImportError:
        yield
        return
    select, lowp_of = (
        getattr(getattr(cpp, "TilingSelect", None), "select_tiling", None),
        getattr(cpp, "get_loop_body_lowp_fp", None),
    )
    if select is None or lowp_of is None or not hasattr(cpp, "_get_loop_body"):
        yield
        return

    def select_tiling(self, fn_list, var_sizes_list):
        lowp = {lowp_of(body)[0] for body in cpp._get_loop_body(fn_list)} - {None}
        if not lowp or not lowp <= {torch.bfloat16, torch.float16}:
            return select(self, fn_list, var_sizes_list)
        dtype = min(lowp, key=str)  # bf16 and fp16 vectors have the same lane count
        cpp.get_loop_body_lowp_fp = lambda body: (dtype, lowp_of(body)[1])
        try:
            return select(self, fn_list, var_sizes_list)
        finally:
            cpp.get_loop_body_lowp_fp = lowp_of

    cpp.TilingSelect.select_tiling = select_tiling
    try:
        with warnings.catch_warnings():  # "bf16 and fp16 are mixed": expected here (bf16 δ, fp16 rank fractions)
            warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
            yield
    finally:
        cpp.TilingSelect.select_tiling = select


def source_params(
    kind: str,
    deltas: Sequence[torch.Tensor],
    densities: Sequence[float],
    gammas: Sequence[float],
    seeds: Sequence[int],
    work: torch.dtype,
    epsilons: Sequence[float] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp, ip): per-source float and int parameter rows for `_keep` (scale and weight left at 1), on the
    host: callers read and adjust them there, and `merge_into` / `kept_and_whole_l1` move them to the device."""
    fp, ip = [], []
    for delta, d, g, seed in zip(deltas, densities, gammas, seeds):
        n = delta.numel()
        t_keep, cut_keep, t_drop, cut_drop, threshold = -1.0, 0, math.inf, 0, 1 << RANDOM_BITS
        if kind == "random":
            threshold = density_threshold(min(d, 1.0))
        elif kind == "rank":  # DELLA: keep probability d − ε + 2ε·rank/(width − 1) along each row
            eps = epsilons[len(fp)]  # p₀ = d − ε on the density grid (see tabled_kept_l1)
            t_keep, t_drop = (
                (round((d - eps) * (1 << DENSITY_BITS)) / (1 << DENSITY_BITS), 2 * eps) if d < 1.0 else (2.0, 0.0)
            )
        elif d < 1.0:
            if kind == "magnitude":
                keep_top, drop_top = magnitude_k(n, d), 0
            else:
                keep_top, drop_top = breadcrumbs_window(n, d, g)
            (t_keep, cut_keep), (t_drop, cut_drop) = keep_largest(delta, [keep_top, drop_top])
        fp.append([t_keep, t_drop, 1.0, 1.0])
        ip.append([cut_keep, cut_drop, seed_word(seed), threshold])
    return torch.tensor(fp, dtype=work), torch.tensor(ip, dtype=torch.int64)


def where_mergekit_keeps_others(
    kind: str,
    deltas: Sequence[torch.Tensor],
    densities: Sequence[float],
    gammas: Sequence[float],
    fp: torch.Tensor,
    ip: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """The positions where TIES ("magnitude") or breadcrumbs ("window") as mergekit keeps them differ from
    each source's (t, cut) rule, and every source's keep mask there; None where they agree everywhere. The
    merge is elementwise, so a tensor merged by the rules is right but at these positions (`merge_at`): the
    tied entries of a straddled cut (`_straddled`) that mergekit's sort order keeps and the rule does not,
    or the other way round — a few per tensor in fp32, a few % of a 16-bit one. The entries exchanged have
    equal |δ|, so what a source keeps weighs the same by either choice: an l1 rescale is the rules' (up to fp32
    rounding for fp64 task vectors, whose |δ| mergekit sorts in fp32)."""
    flats = [d.reshape(-1) for d in deltas]

    def by_rule(i: int, at: torch.Tensor) -> torch.Tensor:  # source i's (t, cut) rule at flat positions `at`
        return _keep(kind, flats[i][at].abs().to(fp.dtype), at, fp, ip, i)

    wanted, differing = {}, []
    for i, (delta, density) in enumerate(zip(deltas, densities)):
        cuts = [(float(fp[i, 0]), int(ip[i, 0]))] + ([(float(fp[i, 1]), int(ip[i, 1]))] if kind == "window" else [])
        cuts = [(t, cut) for t, cut in cuts if 0.0 <= t < math.inf]  # not "keep all" (−1) or "keep none" (∞)
        found = ties_found(delta)
        if density >= 1.0 or not cuts or not _straddled(flats[i], cuts, found):
            continue
        absval = fast.kept_magnitudes(flats[i])  # keep_largest's buffer, idle now
        wanted[i] = _mergekit_mask(kind, absval, density, gammas[i])
        ties = [found[t] if t in found else (absval == t).nonzero().view(-1) for t, _ in cuts]
        tied = ties[0] if len(ties) == 1 else torch.cat(ties).unique()
        differing.append(tied[wanted[i][tied] != by_rule(i, tied)])
    if not wanted:
        return None
    if not fast.in_one_shot():  # a search's engine: its buffers sized by this tensor are not kept
        fast.drop_scratch(*fast.SELECTION_SLOTS)
    positions = torch.cat(differing).unique()
    if positions.numel() == 0:
        return None
    return positions, [wanted[i][positions] if i in wanted else by_rule(i, positions) for i in range(len(flats))]


def _straddled(flat: torch.Tensor, cuts: Sequence[tuple[float, int]], found: dict[float, torch.Tensor]) -> bool:
    """Whether a source's cut falls inside a run of equal |δ| — most 16-bit task vectors, and fp32 ones whose
    |δ| are quantized by the weights' own rounding: then its (t, cut) rule, which keeps the first positions of
    the run, cannot say which of them mergekit keeps. `found`: ties the selection found (`ties_found`)."""
    if flat.dtype == torch.float64:  # mergekit sorts |δ|.float(): new ties may appear
        return True
    for t, cut in cuts:
        if t in found:
            ties = found[t]
            if ties.numel() and int(ties[-1]) >= cut:
                return True
        elif cut < flat.numel() and bool((flat[cut:].abs() == t).any()):
            return True
    return False


def _mergekit_mask(kind: str, absval: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The entries mergekit keeps of a flat |δ|, from its sort order (`sort_order.sorted_slice`): TIES the first
    k of a descending sort, breadcrumbs a window of an ascending one."""
    n = absval.numel()
    if kind == "magnitude":
        return sort_order.sorted_slice(absval, 0, magnitude_k(n, density), descending=True)
    keep_top, drop_top = breadcrumbs_window(n, density, gamma)
    return sort_order.sorted_slice(absval, n - keep_top, n - drop_top, descending=False)


def _per_source(kind: str | Sequence[str], n: int) -> tuple[str, ...]:
    return (kind,) * n if isinstance(kind, str) else tuple(kind)


def kept_and_whole_l1(
    kind: str | Sequence[str],
    deltas: Sequence[torch.Tensor],
    fp: torch.Tensor,
    ip: torch.Tensor,
    ranks: Sequence[torch.Tensor] = (),
) -> tuple[list[float], list[float]]:
    """(‖δᵢ ⊙ keepᵢ‖₁, ‖δᵢ‖₁) for each source (row i of fp/ip is δᵢ's; kind: one for all or one per source), in
    one pass: mergekit's l1 rescale. ‖δ‖₁ on its own (`fast.delta_l1`, kept for a search's resident task
    vectors) would cost a one-off merge a pass more."""
    ds = [d.reshape(-1) for d in deltas]
    rs = [r.reshape(-1) for r in ranks]
    kinds = _per_source(kind, len(ds))
    fp, ip = fast.to_device(fp, ds[0].device), fast.to_device(ip, ds[0].device)
    key = ("kept_l1", kinds, ds[0].dtype, ds[0].device.type)
    body = functools.partial(_kept_l1_body, offset=0, kinds=kinds)
    l1 = _compiled_call(ds[0], key, body, ds, fp, ip, rs, reuse_for_small=True)
    if l1 is EAGER:
        n = ds[0].numel()
        l1 = sum(
            (
                _kept_l1_body(
                    [d[s : s + fast.CHUNK] for d in ds], fp, ip, [r[s : s + fast.CHUNK] for r in rs], s, kinds
                )
                for s in range(0, n, fast.CHUNK)
            ),
            torch.zeros(2 * len(ds), dtype=torch.float64, device=ds[0].device),
        )
    l1 = l1.tolist()
    return l1[: len(ds)], l1[len(ds) :]


def _on_device(device: torch.device, work: torch.dtype, lam: float, fp: torch.Tensor, ip: torch.Tensor):
    """The fused merge's scalar inputs on the merge's device: λ in the work dtype, the source parameter rows."""
    return (
        fast.to_device(torch.tensor(float(lam), dtype=work), device),
        fast.to_device(fp, device),
        fast.to_device(ip, device),
    )


def merge_into(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    kind: str | Sequence[str],
    fp: torch.Tensor,
    ip: torch.Tensor,
    lam: float,
    consensus: bool,
    normalize: bool,
    ranks: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Run the fused merge (kind: one keep rule for all sources or one per source): compiled over whole
    tensors, or eager chunk by chunk (same arithmetic)."""
    o, b = out.view(-1), base.reshape(-1)
    ds = [d.reshape(-1) for d in deltas]
    rs = [r.reshape(-1) for r in ranks]
    kinds = _per_source(kind, len(ds))
    work = fast.work_dtype(base)
    lam_t, fp, ip = _on_device(base.device, work, lam, fp, ip)
    key = ("merge", kinds, consensus, normalize, work, tuple(d.dtype for d in ds) + (b.dtype, o.dtype), b.device.type)
    body = _merge_kernel(kinds, consensus, normalize, work)
    if _compiled_call(b, key, body, o, b, ds, fp, ip, lam_t, rs, reuse_for_small=True) is not EAGER:
        return out
    for s in range(0, b.numel(), fast.CHUNK):
        e = min(b.numel(), s + fast.CHUNK)
        _merge_body(
            o[s:e],
            b[s:e],
            [d[s:e] for d in ds],
            fp,
            ip,
            lam_t,
            [r[s:e] for r in rs],
            s,
            kinds,
            consensus,
            normalize,
            work,
        )
    return out


def merge_at(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    positions: torch.Tensor,
    masks: Sequence[torch.Tensor],
    fp: torch.Tensor,
    ip: torch.Tensor,
    lam: float,
    consensus: bool,
    normalize: bool,
) -> torch.Tensor:
    """Merge `out` again at these flat positions, each source keeping what its mask there says (the fused
    merge's arithmetic, eager, on the gathered entries): `where_mergekit_keeps_others`'s fix of a merge."""
    o, b = out.view(-1), base.reshape(-1)
    work = fast.work_dtype(base)
    lam_t, fp, ip = _on_device(base.device, work, lam, fp, ip)
    part = torch.empty(positions.numel(), dtype=o.dtype, device=o.device)
    gathered = [d.reshape(-1)[positions] for d in deltas]
    _merge_body(
        part,
        b[positions],
        gathered,
        fp,
        ip,
        lam_t,
        list(masks),
        0,
        ("listed",) * len(deltas),
        consensus,
        normalize,
        work,
    )
    o[positions] = part
    return out


# ---- the weighted sum (linear, task arithmetic, slerp, model stock) --------------------------------
def _weighted_sum_body(out, base, deltas, coeffs, work: torch.dtype) -> None:
    acc = base.to(work) * coeffs[len(deltas)]  # the base's coefficient comes last
    for i, d in enumerate(deltas):
        acc = acc + d.to(work) * coeffs[i]
    out.copy_(acc)


def weighted_sum_into(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    base_coeff: float = 1.0,
) -> torch.Tensor:
    """out = base_coeff·base + Σ cᵢ·δᵢ in one fused pass when compiled (fp32 accumulation for 16-bit
    tensors without a round trip through a scratch buffer); `fast.weighted_sum_into` otherwise."""
    b = base.reshape(-1)
    # a one-off merge (`evomerge merge`) runs the plain sum eagerly: fusing saves nothing measurable on one pass
    # (297M fp32 task arithmetic with a precompiled kernel: 3.36 s, eager 3.50 s) and the first one builds it
    one_off = fast.in_one_shot() and compile_mode() != "on"
    if _use_compiled(b) and not one_off:  # the tensors below are only needed for compiled code
        work = fast.work_dtype(base)
        c = fast.to_device(torch.tensor([float(x) for x in coeffs] + [float(base_coeff)], dtype=work), base.device)
        ds = [d.reshape(-1) for d in deltas]
        key = ("weighted_sum", len(ds), work, tuple(d.dtype for d in ds) + (b.dtype, out.dtype), b.device.type)
        body = functools.partial(_weighted_sum_body, work=work)
        if _compiled_call(b, key, body, out.view(-1), b, ds, c) is not EAGER:
            return out
    return fast.weighted_sum_into(out, base, deltas, coeffs, base_coeff)
