"""Merge speed against the memory-bandwidth limit, measured side by side in one run.

For a generated Llama-shaped model (size settable; default ~300M params) with a base and N sources kept
resident as task vectors, times:
  (a) the limit: plain copies moving the same bytes a merge must move ((N + 1) tensors read + 1 written),
  (b) evomerge materializing each method into a preallocated target (what the search does per candidate).
The mergekit comparison the speed issue asks for is not built yet (see the issue notes).

    python benchmarks/merge_speed.py [--params 300e6] [--dtype float32|bfloat16] [--sources 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from evomerge.methods import merge_deltas  # noqa: E402

METHODS = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 0.5},
    "ties": {"weight": 0.5, "density": 0.5},
    "dare_ties": {"weight": 0.5, "density": 0.5},
    "dare_linear": {"weight": 0.5, "density": 0.5},
    "breadcrumbs": {"weight": 0.5, "density": 0.5, "gamma": 0.01},
    "della": {"weight": 0.5, "density": 0.5, "epsilon": 0.1},
    "slerp": {},
    "model_stock": {},
}
TARGET = {"linear": 2, "task_arithmetic": 2, "ties": 4, "dare_ties": 4, "dare_linear": 4, "breadcrumbs": 4, "della": 4, "slerp": 3, "model_stock": 3}


def llama_shapes(params: float, hidden: int = 1024, inter: int = 2816, vocab: int = 32000) -> list[tuple[int, ...]]:
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, int((params - 2 * vocab * hidden) // per_layer))
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, repeats):
    fn()  # warm-up (and torch.compile, where used)
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = llama_shapes(args.params)
    base = [torch.randn(s, generator=g, dtype=torch.float32).to(device=device, dtype=dtype) for s in shapes]
    deltas = [[(torch.randn(s, generator=g) * 0.01).to(device=device, dtype=dtype) for _ in range(args.sources)] for s in shapes]
    out = [torch.empty_like(b) for b in base]
    n_params = sum(b.numel() for b in base)
    model_bytes = sum(b.numel() * b.element_size() for b in base)
    print(f"{n_params / 1e6:.0f}M params, {args.dtype}, {args.sources} sources, {len(shapes)} tensors, device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    # (a) the limit: copy bandwidth, applied to the bytes a merge moves
    src = [torch.empty_like(b).copy_(b) for b in base]

    def copy_all():
        for o, s in zip(out, src):
            o.copy_(s)

    t_copy = bench(copy_all, device, args.repeats)
    copy_bw = 2 * model_bytes / t_copy
    moved = (args.sources + 2) * model_bytes
    limit = moved / copy_bw
    print(f"copy: {copy_bw / 1e9:.1f} GB/s read+write; a {args.sources}-source merge moves {moved / 1e9:.2f} GB → limit {limit * 1000:.0f} ms\n")
    print(f"{'method':16s} {'ms':>9s} {'GB/s':>7s} {'× limit':>8s} {'target':>9s}")
    for method in args.methods:
        p = METHODS[method]
        n = 1 if method == "slerp" else args.sources
        gp = {"t": 0.5} if method == "slerp" else {}
        sp = [dict(p) for _ in range(n)] if p else []

        def run():
            for i, (b, ds, o) in enumerate(zip(base, deltas, out)):
                merge_deltas(method, b, ds[:n], sp, gp, seed=0, key=str(i), out=o)

        t = bench(run, device, args.repeats)
        moved_m = (n + 2) * model_bytes  # n sources + base read, target written
        limit_m = moved_m / copy_bw
        ratio = t / limit_m
        flag = "ok" if ratio <= TARGET[method] else "MISS"
        print(f"{method:16s} {t * 1000:9.0f} {moved_m / t / 1e9:7.1f} {ratio:7.1f}× {'≤' + str(TARGET[method]) + '× ' + flag:>9s}")


if __name__ == "__main__":
    main()
