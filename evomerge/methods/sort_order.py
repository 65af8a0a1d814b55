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


_scratch: dict[str, np.ndarray] = {}  # work arrays kept between calls: a fresh one costs its page faults each time


def _buffer(name: str, dtype, n: int) -> np.ndarray:
    """A kept work array of at least n entries (the one named "arange" holds 0, 1, 2, …)."""
    buf = _scratch.get(name)
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = _scratch[name] = np.arange(n, dtype=dtype) if name == "arange" else np.empty(n, dtype=dtype)
    return buf[:n]


def sorted_slice(absval: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Boolean mask (absval's shape) of the entries that `torch.sort(absval.float(), descending=...)` on the
    CPU places at positions lo ≤ i < hi. `absval` holds finite values ≥ 0."""
    flat = absval.detach().reshape(-1).cpu()
    if flat.dtype == torch.float64:
        flat = flat.float()  # mergekit sorts |δ|.float()
    n = flat.numel()
    # the bit patterns of floats ≥ 0 order as the floats do; ~key reverses the order exactly
    bits = flat.contiguous().view({2: torch.int16, 4: torch.int32}[flat.element_size()]).numpy()
    key = _buffer(f"key{bits.dtype}", bits.dtype, n)
    np.copyto(key, bits) if descending else np.invert(bits, out=key)
    index = np.int32 if n < 2**31 else np.int64
    pos = _buffer("positions", index, n)
    np.copyto(pos, _buffer("arange", index, n))
    mask = _slice_mask(key, pos, lo, hi)
    if mask is None:  # the introsort fell back to heapsort on this path (adversarial data): sort for real
        order = torch.sort(flat.float(), descending=descending).indices[lo:hi]
        mask = np.zeros(n, dtype=bool)
        mask[order.numpy()] = True
    return torch.from_numpy(mask).view(absval.shape).to(absval.device)


def _slice_mask(v: np.ndarray, pos: np.ndarray, lo: int, hi: int) -> np.ndarray | None:
    """Mask of the entries a descending `std::sort` of (v, position) places in [lo, hi), or None where the
    sort would switch to heapsort (its depth limit, 2·⌊log₂ n⌋ partitions on one path). v and pos are worked
    on in place; each partition makes only the swaps of the parts that hold lo or hi, and a part wholly inside
    the slice is marked, whatever its order within."""
    n = v.size
    mask = np.zeros(n, dtype=bool)
    todo = [(0, n, 2 * (n.bit_length() - 1))]
    while todo:
        first, last, depth = todo.pop()
        if last - first <= RUN:  # the final insertion sort: stable within the run
            run = np.argsort(-v[first:last].astype(np.int64), kind="stable")
            mask[pos[first:last][run[max(lo, first) - first : min(hi, last) - first]]] = True
            continue
        if depth == 0:
            return None
        cut, left, right = _partition(v[first:last], pos[first:last])
        left, right = left + first, right + first
        parts = [(first, first + cut, left, right), (first + cut, last, right, left)]  # (a, b, moved in, moved out)
        needed = [p for p in parts if not (hi <= p[0] or p[1] <= lo)]
        for a, b, into, out_of in needed:
            if lo <= a and b <= hi:  # wholly inside: marked as it is after the swaps
                mask[pos[a:b]] = True
                mask[pos[into]] = False
                mask[pos[out_of]] = True
        descend = [p for p in needed if not (lo <= p[0] and p[1] <= hi)]
        if len(descend) == 2:  # both parts hold a boundary: the whole swap
            v_l, v_r, p_l, p_r = v[left], v[right], pos[left], pos[right]
            v[left], v[right], pos[left], pos[right] = v_r, v_l, p_r, p_l
        elif descend:  # one part: only its entries need their new values
            _, _, into, out_of = descend[0]
            v[into], pos[into] = v[out_of], pos[out_of]
        todo += [(a, b, depth - 1) for a, b, _, _ in descend]
    return mask


def _partition(v: np.ndarray, pos: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """libstdc++'s `__unguarded_partition_pivot` on v: the median of (1, middle, last) is swapped to 0 (in place,
    pos alike), then two scans swap the entries on the wrong side of it. Scanning from the left stops at entries
    ≤ pivot, from the right at entries ≥ pivot; the i-th swap exchanges the i-th stop of each scan while they have
    not crossed. Returns the cut (where the left scan stopped last) and the swapped positions, left and right,
    without making the swaps: the caller builds only the parts it needs."""
    last = v.size
    a, b, c = 1, last // 2, last - 1
    va, vb, vc = v[a], v[b], v[c]
    if va > vb:
        pick = b if vb > vc else (c if va > vc else a)
    else:
        pick = a if va > vc else (c if vb > vc else b)
    v[0], v[pick] = v[pick], v[0]
    pos[0], pos[pick] = pos[pick], pos[0]
    pivot = v[0]
    left = np.flatnonzero(v[1:] <= pivot) + 1
    right = np.flatnonzero(v >= pivot)[::-1]  # the pivot itself stops it at 0
    lo, hi = 0, min(left.size, right.size)  # swaps happen while left[i] < right[i]: find the first i without
    while lo < hi:
        mid = (lo + hi) // 2
        if left[mid] < right[mid]:
            lo = mid + 1
        else:
            hi = mid
    swaps = lo
    cut = min(int(left[swaps]) if swaps < left.size else last, int(right[swaps - 1]) if swaps else last)
    return cut, left[:swaps], right[:swaps]
