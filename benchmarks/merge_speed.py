"""Merge speed against the memory-bandwidth limit, measured side by side in one run.

For a generated Llama-shaped model (size settable; default ~300M params) with a base and N sources kept
resident as task vectors, times:
  (a) the limit: plain copies moving the same bytes a merge must move ((N + 1) tensors read + 1 written),
  (b) evomerge materializing each method into a preallocated target (what the search does per candidate),
  (c) mergekit (when installed: `pip install mergekit`) merging the same in-memory tensors with its
      tensor-level API (`mergekit.merge_methods.api.merge_tensors`): no disk I/O on either side.
The first two evomerge calls of each method (torch.compile, bin counts of the resident task vectors, DELLA's
margin codes, made when a (seed, ε) comes a second time) are timed apart as "setup"; the per-candidate time is
the median of the repeats after them.

    python benchmarks/merge_speed.py [--params 300e6] [--dtype float32|bfloat16] [--sources 3] [--device cpu|cuda]
    python benchmarks/merge_speed.py --shape 7b --dtype bfloat16 --device cuda --no-mergekit   # the GPU run
"""

from __future__ import annotations

import argparse
import itertools
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
TARGET = {
    "linear": 2,
    "task_arithmetic": 2,
    "ties": 4,
    "dare_ties": 4,
    "dare_linear": 4,
    "breadcrumbs": 4,
    "della": 4,
    "slerp": 3,
    "model_stock": 3,
}


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
    t = time.perf_counter()
    # warm-up: torch.compile, bin counts of the resident task vectors; DELLA codes its margins when a (seed, ε)
    # comes twice
    for _ in range(2):
        fn()
    sync(device)
    setup = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), setup


def device_busy(fn, device) -> float | None:
    """Seconds the GPU spends in kernels during one call (None on the CPU): against the wall time, how much
    of a candidate is the device's work and how much is the host's (Python, launches, waits)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def mergekit_runner(method, params, base, deltas, n):
    """A callable merging every tensor with mergekit, or None when mergekit is not installed."""
    try:
        from mergekit.merge_methods.api import merge_tensors as mk_merge
    except ImportError:
        return None
    models = [[b + d for d in ds[:n]] for b, ds in zip(base, deltas)]  # mergekit takes whole models
    mk_params = {"t": 0.5} if method == "slerp" else dict(params)

    def run():
        for b, ms in zip(base, models):
            mk_merge([b] + ms, method, parameters=mk_params, base_index=0)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument(
        "--shape",
        choices=["small", "7b"],
        default="small",
        help="7b: Llama-2-7B tensor shapes (hidden 4096, 32 layers), ignoring --params",
    )
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit column even when it is installed")
    ap.add_argument("--mergekit-repeats", type=int, default=1)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = device if device.type == "cuda" else torch.device("cpu")  # a 7B model is drawn where it will live
    g = torch.Generator(device=gen).manual_seed(0)
    shapes = llama_shapes(6.74e9, hidden=4096, inter=11008) if args.shape == "7b" else llama_shapes(args.params)
    base = [torch.randn(s, generator=g, device=gen).to(device=device, dtype=dtype) for s in shapes]
    deltas = [
        [(torch.randn(s, generator=g, device=gen) * 0.01).to(device=device, dtype=dtype) for _ in range(args.sources)]
        for s in shapes
    ]
    out = [torch.empty_like(b) for b in base]
    n_params = sum(b.numel() for b in base)
    model_bytes = sum(b.numel() * b.element_size() for b in base)
    print(
        f"{n_params / 1e6:.0f}M params, {args.dtype}, {args.sources} sources, {len(shapes)} tensors, device {device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"EVOMERGE_COMPILE={os.environ.get('EVOMERGE_COMPILE', 'auto')}"
    )

    # (a) the limit: copy bandwidth (base → target, tensor by tensor), applied to the bytes a merge moves
    def copy_all():
        for o, b in zip(out, base):
            o.copy_(b)

    t_copy, _ = bench(copy_all, device, args.repeats)
    copy_bw = 2 * model_bytes / t_copy
    moved = (args.sources + 2) * model_bytes
    limit = moved / copy_bw
    print(
        f"copy: {copy_bw / 1e9:.1f} GB/s read+write; a {args.sources}-source merge moves {moved / 1e9:.2f} GB → limit "
        f"{limit * 1000:.0f} ms\n"
    )
    print(
        f"{'method':16s} {'ms':>9s} {'GB/s':>7s} {'× limit':>8s} {'target':>9s} {'setup s':>8s} {'mergekit ms':>12s} "
        f"{'speedup':>8s}" + (f" {'GPU busy ms':>12s}" if device.type == "cuda" else "")
    )
    notes = []
    for method in args.methods:
        p = METHODS[method]
        n = 1 if method == "slerp" else args.sources
        gp = {"t": 0.5} if method == "slerp" else {}
        sp = [dict(p) for _ in range(n)] if p else []

        def run(params=sp):
            for i, (b, ds, o) in enumerate(zip(base, deltas, out)):
                merge_deltas(method, b, ds[:n], params, gp, seed=0, key=str(i), out=o)

        t, setup = bench(run, device, args.repeats)
        moved_m = (n + 2) * model_bytes  # n sources + base read, target written
        limit_m = moved_m / copy_bw
        ratio = t / limit_m
        flag = "ok" if ratio <= TARGET[method] else "MISS"
        mk = mergekit_runner(method, p, base, deltas, n) if not args.no_mergekit else None
        mk_col = f"{'—':>12s} {'—':>8s}"
        if mk is not None:
            t_mk, _ = bench(mk, device, args.mergekit_repeats)
            mk_col = f"{t_mk * 1000:12.0f} {t_mk / t:7.0f}×"
        busy = device_busy(run, device)
        busy_col = f" {busy * 1000:12.1f}" if busy is not None else ""
        print(
            f"{method:16s} {t * 1000:9.1f} {moved_m / t / 1e9:7.1f} {ratio:7.1f}× "
            f"{'≤' + str(TARGET[method]) + '× ' + flag:>9s} {setup:8.1f} {mk_col}{busy_col}",
            flush=True,
        )
        if method == "della":  # it also reads each task vector's resident 16-bit margin codes (or rank fractions)
            all_bytes = moved_m + n * n_params * 2
            notes.append(
                f"della also reads its 16-bit margin codes ({n} × 2 bytes an entry): {all_bytes / 1e9:.2f} GB in all, "
                f"{t / (all_bytes / copy_bw):.1f}× the copy time of those bytes"
            )
            calls = itertools.count()

            def run_new_epsilon():  # a search varying ε every candidate: no margin codes, a hash per position
                e = p["epsilon"] + 1e-3 * (next(calls) % 50)
                run([dict(q, epsilon=e) for q in sp])

            t_eps, _ = bench(run_new_epsilon, device, args.repeats)
            notes.append(
                f"della with a new ε every candidate (rank fractions, hashed per candidate): {t_eps * 1000:.1f} ms, "
                f"{t_eps / limit_m:.1f}× the limit"
            )
    for line in notes:
        print(line)
    if device.type == "cuda":
        print(
            f"\nGPU memory: model {model_bytes / 2**30:.1f} GiB; peak allocated "
            f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        )


if __name__ == "__main__":
    main()
