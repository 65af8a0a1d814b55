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

import numpy as np
import torch

RUN = 16  # std::sort leaves runs of at most this many entries to its final insertion sort


def sorted_slice(absval: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Boolean mask (absval's shape) of the entries that `torch.sort(absval.float(), descending=...)` on the
    CPU places at positions lo ≤ i < hi. `absval` holds finite values ≥ 0."""
    flat = absval.detach().reshape(-1).cpu()
    if flat.dtype == torch.float64:
        flat = flat.float()  # mergekit sorts |δ|.float()
    # the bit patterns of floats ≥ 0 order as the floats do; ~key reverses the order exactly
    key = flat.contiguous().view({2: torch.int16, 4: torch.int32}[flat.element_size()]).numpy()
    key = key.copy() if descending else np.invert(key)
    mask = _slice_mask(key, lo, hi)
    if mask is None:  # the introsort fell back to heapsort on this path (adversarial data): sort for real
        order = torch.sort(flat.float(), descending=descending).indices[lo:hi]
        mask = np.zeros(flat.numel(), dtype=bool)
        mask[order.numpy()] = True
    return torch.from_numpy(mask).view(absval.shape).to(absval.device)


def _slice_mask(v: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """Mask of the entries a descending `std::sort` of (v, position) places in [lo, hi), or None where the
    sort would switch to heapsort (its depth limit, 2·⌊log₂ n⌋ partitions on one path)."""
    n = v.size
    pos = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    mask = np.zeros(n, dtype=bool)
    todo = [(0, n, 2 * (n.bit_length() - 1))]
    while todo:
        first, last, depth = todo.pop()
        if hi <= first or last <= lo:
            continue
        if lo <= first and last <= hi:  # wholly inside the slice, whatever its order within
            mask[pos[first:last]] = True
            continue
        if last - first <= RUN:  # the final insertion sort: stable within the run
            run = np.argsort(-v[first:last].astype(np.int64), kind="stable")
            mask[pos[first:last][run[max(lo, first) - first : min(hi, last) - first]]] = True
            continue
        if depth == 0:
            return None
        cut = _partition(v, pos, first, last)
        todo.append((first, cut, depth - 1))
        todo.append((cut, last, depth - 1))
    return mask


def _partition(v: np.ndarray, pos: np.ndarray, first: int, last: int) -> int:
    """libstdc++'s `__unguarded_partition_pivot` on v[first:last] in place (pos moved alike): the median of
    (first+1, middle, last−1) is swapped to `first`, then two scans swap the entries on the wrong side of it.
    Scanning from the left stops at entries ≤ pivot, from the right at entries ≥ pivot; the i-th swap exchanges
    the i-th stop of each scan while they have not crossed. Returns where the left scan stopped last: the cut."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    va, vb, vc = v[a], v[b], v[c]
    if va > vb:
        pick = b if vb > vc else (c if va > vc else a)
    else:
        pick = a if va > vc else (c if vb > vc else b)
    v[first], v[pick] = v[pick], v[first]
    pos[first], pos[pick] = pos[pick], pos[first]
    pivot = v[first]
    left = np.flatnonzero(v[first + 1 : last] <= pivot) + (first + 1)
    right = np.flatnonzero(v[first:last] >= pivot)[::-1] + first  # the pivot itself stops it at `first`
    lo, hi = 0, min(left.size, right.size)  # swaps happen while left[i] < right[i]: find the first i without
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] < right[mid]:
            lo = mid + 1
        else:
            hi = mid
    swaps = lo
    cut = min(int(left[swaps]) if swaps < left.size else last, int(right[swaps - 1]) if swaps else last)
    if swaps:
        li, ri = left[:swaps], right[:swaps]
        v[li], v[ri] = v[ri], v[li].copy()
        pos[li], pos[ri] = pos[ri], pos[li].copy()
    return cut
