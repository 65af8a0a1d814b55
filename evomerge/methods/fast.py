"""Fast paths shared by the kernels: cache-sized chunked elementwise work, reusable scratch buffers, cached
per-task-vector statistics (‖δ‖₁, Gram matrices) and an exact top-k mask without sorting.

Why: materializing a candidate is pure memory traffic. Doing every source's contribution for one
L2-sized chunk before moving on keeps the output chunk in cache, so the merge reads each input once and
writes the output once; scratch buffers are kept between candidates instead of allocated per call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from typing import Sequence

import numpy as np
import torch

CHUNK = 1 << 18  # 256K elements: 1 MiB of fp32, comfortably inside L2
_local = threading.local()


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate half-precision tensors in fp32; keep fp32/fp64 as they are."""
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused across calls (per thread, dtype, device, slot)."""
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    key = (dtype, str(device), slot)
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype, device=device)
        cache[key] = buf
    return buf[:numel]


HOST_NUMPY = True  # on the CPU, index work runs in numpy (tests switch it off to run the GPU's torch code)
MASK_SLOTS = (71, 72)  # two n-entry masks: the k-th largest selection's, then the tie replay's (`sort_order`)
MAGNITUDE_SLOT = 73  # |δ| for the k-th largest selection of a one-off merge and for the tie replay
ITEMS_SLOT = 74  # the tie replay's (key, position) items
SELECTION_SLOTS = (*MASK_SLOTS, MAGNITUDE_SLOT, ITEMS_SLOT)  # freed when a merge is done (`drop_scratch`)


def kept_magnitudes(flat: torch.Tensor) -> torch.Tensor:
    """|flat| in the work dtype, in this thread's kept MAGNITUDE_SLOT buffer (valid until its next use)."""
    a = scratch(flat.numel(), work_dtype(flat), flat.device, MAGNITUDE_SLOT)
    return torch.abs(flat, out=a) if flat.dtype == a.dtype else a.copy_(flat).abs_()


def kept_masks(n: int, device: torch.device) -> tuple:
    """The two n-entry MASK_SLOTS masks of this thread, as numpy arrays (a CPU `device`)."""
    return tuple(scratch(n, torch.bool, device, slot).numpy() for slot in MASK_SLOTS)


def drop_scratch(*slots: int) -> None:
    """Free this thread's buffers of these slots (made for a one-off job, sized by its largest tensor)."""
    cache = getattr(_local, "buffers", {})
    for key in [k for k in cache if k[2] in slots]:
        del cache[key]


def weighted_sum_into(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    coeffs: Sequence[float],
    base_coeff: float = 1.0,
) -> torch.Tensor:
    """out = base_coeff·base + Σ cᵢ·δᵢ, chunk by chunk (fp32 accumulation for half-precision outputs)."""
    o, b = out.view(-1), base.reshape(-1)
    ds = [d.reshape(-1) for d in deltas]
    n = o.numel()
    direct = out.dtype in (torch.float32, torch.float64)
    acc_buf = None if direct else scratch(min(n, CHUNK), torch.float32, out.device, slot=90)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        acc = o[s:e] if direct else acc_buf[: e - s]
        if base_coeff == 1.0:
            acc.copy_(b[s:e])
        else:
            torch.mul(b[s:e], base_coeff, out=acc)
        for d, c in zip(ds, coeffs):
            if c != 0.0:
                acc.add_(d[s:e], alpha=c)
        if not direct:
            o[s:e].copy_(acc)
    return out


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor (per-call parameters) on `device` without waiting for it: a pageable
    host-to-GPU copy synchronizes the stream, so the GPU would idle while Python plans the next tensor;
    from pinned memory the copy is queued like a kernel."""
    if device.type == "cpu":
        return values
    return values.pin_memory().to(device, non_blocking=True)


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS: glibc keeps them otherwise (small temporaries interleaved with
    long-lived allocations pin its heap), and they would count as resident for the whole search."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def abs_sample(delta: torch.Tensor, size: int = 1 << 16, seed: int = 0) -> torch.Tensor:
    """A sorted random sample of |δ| (fp32): bin edges for `fused.magnitude_index`."""
    flat = delta.reshape(-1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, flat.numel(), (min(size, flat.numel()),), generator=g).to(flat.device)
    return flat[idx].abs().float().sort().values


def cached_while_unmodified(fn):
    """Remember fn(tensor or tensors) while those tensors live and are unmodified: statistics of resident
    base and task vectors (‖δ‖₁, Gram matrices, bin counts, ranks) are the same for every candidate, so
    they are paid for once. Entries go when a tensor is freed; an in-place change is a miss."""
    cache: dict[tuple, tuple] = {}

    @functools.wraps(fn)
    def cached(arg):
        tensors = tuple(arg) if isinstance(arg, (list, tuple)) else (arg,)
        key = tuple(id(t) for t in tensors)
        versions = tuple(t._version for t in tensors)
        hit = cache.get(key)
        if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
            return hit[2]
        value = fn(arg)
        refs = tuple(weakref.ref(t, lambda _ref, key=key: cache.pop(key, None)) for t in tensors)
        cache[key] = (refs, versions, value)
        return value

    return cached


@cached_while_unmodified
def delta_l1(delta: torch.Tensor) -> float:
    """‖δ‖₁ (fp64 across chunks) of a task vector."""
    flat = delta.reshape(-1)
    return float(sum(flat[s : s + CHUNK].abs().sum(dtype=torch.float64) for s in range(0, flat.numel(), CHUNK)))


@contextlib.contextmanager
def one_shot(entries: int = 0):
    """Mark merges whose task vectors are each used once (`evomerge merge`, file to file): statistics a search
    keeps to reuse across candidates (bin counts of |δ|) cost more than they save there, so selections are made
    directly (`kth_largest_bracketed`) — with the same result. `entries`: how many the whole merge writes (the
    fused kernels are compiled only when that many repay compiling them, see `fused`)."""
    prev = getattr(_local, "one_shot", False), getattr(_local, "one_shot_entries", 0)
    _local.one_shot, _local.one_shot_entries = True, entries
    try:
        yield
    finally:
        _local.one_shot, _local.one_shot_entries = prev


def in_one_shot() -> bool:
    return getattr(_local, "one_shot", False)


def one_shot_entries() -> int:
    return getattr(_local, "one_shot_entries", 0)


def kth_largest_bracketed(a: torch.Tensor, k: int, sample: int = 1 << 16) -> tuple[float, int, torch.Tensor | None]:
    """`kth_largest` in a few cheap passes instead of a selection over all of `a`: a seeded sample brackets the
    k-th largest value between two of its quantiles (4 standard errors apart), one pass counts the entries
    above the bracket and collects those inside it, and the k-th is selected among those few. Falls back to
    `kth_largest` when the bracket misses (rare: ≈ 6·10⁻⁵). Also returns, found on the way, the positions
    (ascending) of every entry equal to t — None after a fallback."""
    n = a.numel()
    g = torch.Generator(device="cpu").manual_seed(n * 31 + k)
    picks = a[torch.randint(0, n, (min(sample, n),), generator=g).to(a.device)].cpu().numpy()
    m = picks.size
    q = 1.0 - k / n
    spread = 4.0 * math.sqrt(m * q * (1.0 - q)) + 1.0
    ranks = (max(0, int(q * m - spread)), min(m - 1, int(q * m + spread)))
    lo, hi = np.partition(picks, ranks)[list(ranks)].tolist()  # two quantiles: a selection, not a sort (~0.6×)
    above, band = _above_and_within(a, lo, hi)
    need = k - above
    if need < 1 or need > band.numel():
        t, cut = kth_largest(a, k)
        return float(t), cut, None
    values = a[band]
    t = values.kthvalue(band.numel() - need + 1).values
    ties = band[values == t]  # all of them (lo ≤ t ≤ hi), positions ascending: ties broken by position
    return float(t), int(ties[need - int(torch.count_nonzero(values > t)) - 1]) + 1, ties


def _above_and_within(a: torch.Tensor, lo: float, hi: float) -> tuple[int, torch.Tensor]:
    """(#entries > hi, the positions of those in [lo, hi]) of a flat tensor. On the CPU in numpy, into a kept
    mask: torch's comparisons allocate a fresh mask each and its nonzero is ~3× slower."""
    if a.device.type != "cpu" or not HOST_NUMPY:
        return int(torch.count_nonzero(a > hi)), ((a >= lo) & (a <= hi)).nonzero().view(-1)
    values = a.numpy()
    mask, below_hi = kept_masks(a.numel(), a.device)
    above = np.count_nonzero(np.greater(values, hi, out=mask))
    np.logical_and(np.greater_equal(values, lo, out=mask), np.less_equal(values, hi, out=below_hi), out=mask)
    return above, torch.from_numpy(np.flatnonzero(mask))


def kth_largest(a: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """(t, cut) for a flat non-negative `a` and 0 < k < a.numel(): the k largest entries are those > t and
    those == t at positions < cut — ties at the threshold broken by position, first positions first."""
    t = a.kthvalue(a.numel() - k + 1).values
    above = int(torch.count_nonzero(a > t))
    return t, int((a == t).nonzero()[k - above - 1]) + 1


def top_k_mask(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries (the reference sparsifiers' top-k). Ties at the
    threshold are broken by position, first positions first, so exactly k survive as with a top-k."""
    n = absval.numel()
    flat = absval.reshape(-1)
    if k >= n or k <= 0:
        return torch.full(absval.shape, k >= n, dtype=torch.bool, device=flat.device)
    work = flat.to(work_dtype(flat))
    t, cut = kth_largest(work, k)
    mask = work >= t
    mask[cut:] = work[cut:] > t  # ties after the cut are dropped
    return mask.view(absval.shape)


def gram(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """All pairwise dot products ⟨xᵢ, xⱼ⟩ in one chunked pass (fp32 per chunk, fp64 across chunks)."""
    flats = [t.reshape(-1) for t in tensors]
    n, k = flats[0].numel(), len(flats)
    acc = [[0.0] * k for _ in range(k)]
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        chunk = [f[s:e].float() for f in flats]
        for i in range(k):
            for j in range(i, k):
                acc[i][j] += float(torch.dot(chunk[i], chunk[j]))
    for i in range(k):
        for j in range(i):
            acc[i][j] = acc[j][i]
    return acc


def gram_of_rows(rows: torch.Tensor) -> torch.Tensor:
    """`gram` of the rows of one [k, n] matrix, as a [k, k] fp64 tensor on the CPU: a matrix product per chunk
    instead of k(k+1)/2 dot products (fp32 per chunk, fp64 across chunks, as `gram`)."""
    k, n = rows.shape
    acc = torch.zeros(k, k, dtype=torch.float64, device=rows.device)
    for s in range(0, n, CHUNK):
        part = rows[:, s : s + CHUNK].float()
        acc += (part @ part.T).double()
    return acc.cpu()


@cached_while_unmodified
def cached_gram(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """`gram` of resident tensors: for base and task vectors the angles are the same for every candidate,
    so slerp and model stock then cost one weighted sum."""
    return gram(tensors)
