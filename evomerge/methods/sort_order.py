"""Which entries torch's CPU sort puts in a slice of its order, without sorting the tensor.

Why: mergekit keeps, for TIES, the entries at positions [0, k) of `torch.argsort(|δ|.float(), descending=True)`
and, for breadcrumbs, those at [lo, hi) of `torch.sort(|δ|.float())`. Where equal |δ| straddle such a cut —
most 16-bit task vectors, whose |δ| take few distinct values — which of them are kept is decided by the order
the sort leaves equal values in. On the CPU torch sorts (value, index) pairs with libstdc++'s `std::sort`, an
introsort (median-of-three quicksort down to runs of 16, then one insertion sort), which is not stable: that
order depends on the whole tensor. Replaying only the partitions that hold a cut gives the same entries as the
whole sort, in a few vectorized passes (`tests/test_sort_order.py` checks this against torch on tied data).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import fast

RUN = 16  # std::sort leaves runs of at most this many entries to its final insertion sort
LOW = (1 << 32) - 1  # an item is (key << 32) | position: its low 32 bits
PAIR_MIN = 1 << 16  # entries from which a partition's two scans (and its swaps' two halves) run on two threads
POSITIONS = 1 << 20  # positions are written in spans of this many: no n-entry arange kept
WINDOW_BLOCK = 1 << 14  # block of a partition's scans counted to find where its swaps lie (`_swap_window`; < 2¹⁶)
CPU = torch.device("cpu")


_helper: ThreadPoolExecutor | None = None


def _both(size: int, first, second):
    """(first(), second()), on two threads when `size` entries make it pay: numpy releases the GIL in these
    passes, and on two cores the two scans of a partition then take ~0.6 of the time."""
    global _helper
    if size < PAIR_MIN:
        return first(), second()
    if _helper is None:
        _helper = ThreadPoolExecutor(1, thread_name_prefix="evomerge-sort-order")
    later = _helper.submit(second)
    return first(), later.result()


def sorted_slice(absval: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Boolean mask (absval's shape) of the entries that `torch.sort(absval.float(), descending=...)` on the
    CPU places at positions lo ≤ i < hi. `absval` holds finite values ≥ 0."""
    flat = absval.detach().reshape(-1).cpu()
    if flat.dtype == torch.float64:
        flat = flat.float()  # mergekit sorts |δ|.float()
    n = flat.numel()
    # the bit patterns of floats ≥ 0 order as the floats do; ~key reverses the order exactly
    bits = flat.contiguous().view({2: torch.int16, 4: torch.int32}[flat.element_size()]).numpy()
    mask = None
    if n < 2**31 and lo < hi:
        # one array of (key << 32) | position, so each swap of the replay moves both at once
        items = fast.scratch(n, torch.int64, CPU, fast.ITEMS_SLOT).numpy()
        np.copyto(items, bits) if descending else np.invert(bits, out=items, dtype=np.int64)
        items <<= 32
        span = np.arange(min(n, POSITIONS), dtype=np.int64)
        for s in range(0, n, POSITIONS):  # the low 32 bits: keys start at bit 32, positions < 2³¹
            part = items[s : s + POSITIONS]
            part |= span[: part.size] + s
        mask = _slice_mask(items, lo, hi, bits, descending)
    if mask is None:  # the introsort fell back to heapsort on this path (adversarial data): sort for real
        order = torch.sort(flat.float(), descending=descending).indices[lo:hi]
        mask = np.zeros(n, dtype=bool)
        mask[order.numpy()] = True
    return torch.from_numpy(mask).view(absval.shape).to(absval.device)


def _slice_mask(items: np.ndarray, lo: int, hi: int, bits: np.ndarray, descending: bool) -> np.ndarray | None:
    """Mask of the entries a descending `std::sort` of the items' keys places in [lo, hi) (`bits`: the keys
    as the caller gave them, reversed when not `descending`), or None where the sort would switch to heapsort
    (its depth limit, 2·⌊log₂ n⌋ partitions on one path). `items` is worked on in place; a partition makes
    only the swaps of the parts that hold the slice, and stops at a part wholly inside it. Then every key
    strictly between the slice's least and greatest is in it, whatever the order; only the entries equal to
    one of those two need their places, found in the parts that were kept."""
    kept = _replay(items, lo, hi)
    if kept is None:
        return None
    ranges = [(int(part.min()) >> 32, int(part.max()) >> 32) for part in kept]  # items order by key first
    least, greatest = min(r[0] for r in ranges), max(r[1] for r in ranges)
    mask, other = np.empty(bits.size, dtype=bool), fast.kept_masks(bits.size, CPU)[0]  # `other`: kept, idle now
    if descending:
        np.logical_and(np.greater(bits, least, out=mask), np.less(bits, greatest, out=other), out=mask)
    else:  # key = ~bits
        np.logical_and(np.less(bits, ~least, out=mask), np.greater(bits, ~greatest, out=other), out=mask)
    for part, (low, high) in zip(kept, ranges):
        if low == least or high == greatest:  # only the parts at the slice's ends can hold those keys
            key = part >> 32
            mask[part[(key == least) | (key == greatest)] & LOW] = True
    return mask


def _replay(items: np.ndarray, lo: int, hi: int) -> list[np.ndarray] | None:
    """The items the sort places in [lo, hi), as views of `items` and arrays of the final runs, or None where
    the introsort would turn to heapsort."""
    n = items.size
    kept: list[np.ndarray] = []
    todo = [(0, n, 2 * (n.bit_length() - 1))]
    while todo:
        first, last, depth = todo.pop()
        if last - first <= RUN:  # the final insertion sort: stable within the run
            run = items[first:last]
            order = np.argsort(-(run >> 32), kind="stable")
            kept.append(run[order[max(lo, first) - first : min(hi, last) - first]])
            continue
        if depth == 0:
            return None
        cut, left, right = _partition(items[first:last])
        left += first
        right += first
        parts = [(first, first + cut, left, right), (first + cut, last, right, left)]  # (a, b, moved in, moved out)
        needed = [p for p in parts if p[0] < p[1] and not (hi <= p[0] or p[1] <= lo)]
        if len(needed) == 2:  # both parts hold some of the slice: the whole swap
            from_right, from_left = _both(left.size, lambda: items[right], lambda: items[left])
            _both(left.size, lambda: items.__setitem__(left, from_right), lambda: items.__setitem__(right, from_left))
        elif needed:  # one part: only its entries need their new values
            _, _, into, out_of = needed[0]
            items[into] = items[out_of]
        for a, b, _, _ in needed:
            if lo <= a and b <= hi:  # wholly inside: kept, whatever its order within
                kept.append(items[a:b])
            else:
                todo.append((a, b, depth - 1))
    return kept


def _partition(items: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """libstdc++'s `__unguarded_partition_pivot` on the items' keys: the median of (1, middle, last) is swapped
    to 0 (in place), then two scans swap the entries on the wrong side of it. Scanning from the left stops at
    keys ≤ pivot, from the right at keys ≥ pivot; the i-th swap exchanges the i-th stop of each scan while they
    have not crossed. Returns the cut (where the left scan stopped last) and the swapped positions, left and
    right, without making the swaps: the caller makes only those of the parts it needs."""
    last = items.size
    a, b, c = 1, last // 2, last - 1
    va, vb, vc = int(items[a]) >> 32, int(items[b]) >> 32, int(items[c]) >> 32
    if va > vb:
        pick = b if vb > vc else (c if va > vc else a)
    else:
        pick = a if va > vc else (c if vb > vc else b)
    items[0], items[pick] = items[pick], items[0]
    pivot = int(items[0]) >> 32
    stops, stops_right = fast.kept_masks(last, CPU)  # the k-th largest selection's, idle now
    _both(  # stops[i]: the left scan stops at i; stops_right[i]: the right one does (the pivot stops it at 0)
        last,
        lambda: np.less_equal(items[1:], (pivot << 32) | LOW, out=stops[1:]),
        lambda: np.greater_equal(items, pivot << 32, out=stops_right),
    )
    stops[0] = False
    left_end, right_start = _swap_window(stops, stops_right)
    while True:
        left, right = _both(
            last,
            lambda: np.flatnonzero(stops[:left_end]),
            lambda: _plus(np.flatnonzero(stops_right[right_start:]), right_start)[::-1],
        )
        lo, hi = 0, min(left.size, right.size)  # swaps happen while left[i] < right[i]: find the first i without
        while lo < hi:
            mid = (lo + hi) // 2
            if left[mid] < right[mid]:
                lo = mid + 1
            else:
                hi = mid
        swaps = lo
        if (swaps < left.size or left_end == last) and (swaps < right.size or right_start == 0):
            break
        left_end, right_start = last, 0  # the window missed a stop it needs (rare): the whole scans
    cut = min(int(left[swaps]) if swaps < left.size else last, int(right[swaps - 1]) if swaps else last)
    return cut, left[:swaps], right[:swaps]


def _swap_window(stops: np.ndarray, stops_right: np.ndarray) -> tuple[int, int]:
    """(left_end, right_start): the left scan's swapped stops lie before left_end, the right scan's at or after
    right_start, so only those are listed — about half of each scan's stops. From block counts: with A(p) the
    left stops before p and B(p) the right stops at or after p, the i-th left stop L is swapped iff
    A(L + 1) ≤ B(L + 1), and A − B only grows; so swapped left stops lie before the first block edge where
    A > B, and the swapped right stops at or after the edge before it. One block more on the left holds the
    stop where the left scan ends; the caller checks that it was listed."""
    last = stops.size
    blocks = last // WINDOW_BLOCK
    if blocks < 8:
        return last, 0
    per_block = [  # summed in uint16, which holds a block's count: the default int64 sum widens every entry first
        s[: blocks * WINDOW_BLOCK].view(np.uint8).reshape(blocks, WINDOW_BLOCK).sum(axis=1, dtype=np.uint16)
        for s in (stops, stops_right)
    ]
    before = np.concatenate(([0], np.cumsum(per_block[0], dtype=np.int64)))  # A at each block edge
    right_total = int(per_block[1].sum(dtype=np.int64)) + np.count_nonzero(stops_right[blocks * WINDOW_BLOCK :])
    at_or_after = right_total - np.concatenate(([0], np.cumsum(per_block[1], dtype=np.int64)))  # B at each edge
    first = int(np.searchsorted(before - at_or_after, 0, side="right"))  # the first edge where A > B (≥ 1)
    return min(last, (first + 1) * WINDOW_BLOCK), (first - 1) * WINDOW_BLOCK


def _plus(positions: np.ndarray, offset: int) -> np.ndarray:
    positions += offset  # in place: at the first partition this array has up to n/2 entries
    return positions
