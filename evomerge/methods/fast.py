"""Fast paths shared by the kernels: cache-sized chunked elementwise work, reusable scratch buffers, cached
per-task-vector statistics (‖δ‖₁, Gram matrices) and an exact top-k mask without sorting.

Why: materializing a candidate is pure memory traffic. Doing every source's contribution for one
L2-sized chunk before moving on keeps the output chunk in cache, so the merge reads each input once and
writes the output once; scratch buffers are kept between candidates instead of allocated per call.
"""
from __future__ import annotations

import threading
import weakref
from typing import Sequence

import torch

CHUNK = 1 << 18  # 256K elements: 1 MiB of fp32, comfortably inside L2
_local = threading.local()


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


def weighted_sum_into(out: torch.Tensor, base: torch.Tensor, deltas: Sequence[torch.Tensor], coeffs: Sequence[float], base_coeff: float = 1.0) -> torch.Tensor:
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


def consensus_into(out: torch.Tensor, base: torch.Tensor, kept: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool, lam: float) -> torch.Tensor:
    """TIES sign election on weighted, sparsified task vectors `kept` (already multiplied by their weight):
    elected = sign(Σ kept) (≥0 → +); sum the agreeing entries; divide by Σ w over them if `normalize`."""
    o, b = out.view(-1), base.reshape(-1)
    ks = [k.reshape(-1) for k in kept]
    n = o.numel()
    m = min(n, CHUNK)
    total_b = scratch(m, torch.float32, out.device, slot=91)
    mixed_b = scratch(m, torch.float32, out.device, slot=92)
    div_b = scratch(m, torch.float32, out.device, slot=93)
    agree_b = scratch(m, torch.bool, out.device, slot=94)
    tmp_b = scratch(m, torch.float32, out.device, slot=95)
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        L = e - s
        total, mixed, div, agree, tmp = total_b[:L], mixed_b[:L], div_b[:L], agree_b[:L], tmp_b[:L]
        total.copy_(ks[0][s:e])
        for k in ks[1:]:
            total.add_(k[s:e])
        torch.ge(total, 0, out=agree)
        elected = total.copy_(agree).mul_(2).sub_(1)  # ±1, reusing the buffer
        mixed.zero_()
        div.zero_()
        for k, w in zip(ks, weights):
            kc = k[s:e]
            # agree ⇔ sign(kc) equals the elected sign; zeros never agree
            torch.sign(kc, out=tmp)
            torch.eq(tmp, elected, out=agree)
            mixed.addcmul_(kc, agree)
            if normalize:
                div.add_(agree, alpha=w)
        if normalize:
            div.masked_fill_(div.eq(0), 1.0)
            mixed.div_(div)
        if lam != 1.0:
            mixed.mul_(lam)
        torch.add(b[s:e], mixed, out=o[s:e])
    return out


def abs_sample(delta: torch.Tensor, size: int = 1 << 16, seed: int = 0) -> torch.Tensor:
    """A sorted random sample of |δ| (fp32): bin edges for `fused.magnitude_index`."""
    flat = delta.reshape(-1)
    g = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randint(0, flat.numel(), (min(size, flat.numel()),), generator=g).to(flat.device)
    return flat[idx].abs().float().sort().values


_l1s: dict[int, tuple] = {}


def delta_l1(delta: torch.Tensor) -> float:
    """‖δ‖₁ (fp64 across chunks) of a task vector, cached while the tensor lives and is unmodified:
    resident task vectors pay for it once, not per candidate."""
    hit = _l1s.get(id(delta))
    if hit is not None and hit[0]() is delta and hit[1] == delta._version:
        return hit[2]
    flat = delta.reshape(-1)
    l1 = float(sum(flat[s : s + CHUNK].abs().sum(dtype=torch.float64) for s in range(0, flat.numel(), CHUNK)))
    key = id(delta)
    _l1s[key] = (weakref.ref(delta, lambda _ref, key=key: _l1s.pop(key, None)), delta._version, l1)
    return l1


def top_k_mask(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly the k largest entries (the reference sparsifiers' top-k). Ties at the
    threshold are broken by position, first positions first, so exactly k survive as with a top-k."""
    n = absval.numel()
    flat = absval.reshape(-1)
    if k >= n or k <= 0:
        return torch.full(absval.shape, k >= n, dtype=torch.bool, device=flat.device)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    t = torch.kthvalue(work, n - k + 1).values
    mask = work >= t
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # ties at the threshold: drop the last `extra` of them
        ties = (work == t).nonzero().view(-1)
        mask[ties[ties.numel() - extra :]] = False
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


_grams: dict[tuple, tuple] = {}


def cached_gram(tensors: Sequence[torch.Tensor]) -> list[list[float]]:
    """`gram`, remembered while the tensors live unmodified: for resident base and task vectors the
    angles are the same for every candidate, so slerp and model stock then cost one weighted sum."""
    key = tuple(id(t) for t in tensors)
    versions = tuple(t._version for t in tensors)
    hit = _grams.get(key)
    if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], tensors)):
        return hit[2]
    g = gram(tensors)
    refs = tuple(weakref.ref(t, lambda _ref, key=key: _grams.pop(key, None)) for t in tensors)
    _grams[key] = (refs, versions, g)
    return g
