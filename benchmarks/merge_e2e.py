"""`evomerge merge` file to file, against `mergekit-yaml` and against reading and writing the same bytes.

Writes a generated Llama-shaped base and N sources (base + noise; `search_memory.make_models`; fp32, or
bf16 with `--dtype bfloat16`: then the configs give no dtype and both tools compute as mergekit does), then for
each method merges them with both command-line tools, each run in a fresh child process (wall time, peak RSS),
interleaved over the repeats (the page cache holds the inputs for both alike). The floor is the time to read every
input file once from the page cache and write one model's bytes: what any streaming merge must move. "start" is
the time to start Python and import torch, which any such command line (mergekit's too) pays besides.

    python benchmarks/merge_e2e.py [--params 100e6] [--sources 3] [--repeats 3] [--methods ties slerp] [--dtype D]
    PYTHONPATH=/path/to/mergekit-0.1.5 python benchmarks/merge_e2e.py   # mergekit side (else evomerge only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_memory import make_models  # noqa: E402

METHODS = {
    "linear": ({"weight": 1.0}, {}),
    "task_arithmetic": ({"weight": 0.5}, {}),
    "ties": ({"weight": 0.5, "density": 0.5}, {}),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.5, "gamma": 0.01}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.5}, {}),
    "slerp": ({}, {"t": 0.4}),
    "model_stock": ({}, {}),
    "della": ({"weight": 0.5, "density": 0.5, "epsilon": 0.1}, {}),
}

# each tool runs in a child that reports its own peak RSS on its last line: VmHWM (KiB), not ru_maxrss, which
# Linux starts at the parent's RSS at the fork (this parent generated the models: ~1.7 GB at 297M parameters)
CHILD = """
import json, sys, time
tool, config, out = sys.argv[1:4]
started = time.perf_counter()
if tool == "evomerge":
    from evomerge.cli import main
    code = main(["merge", config, "--out", out])
else:
    from mergekit.scripts.run_yaml import main
    code = main([config, out, "--no-copy-tokenizer", "--lazy-unpickle"], standalone_mode=False)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": time.perf_counter() - started, "rss_kib": peak, "code": code or 0}))
"""


def config(method: str, base: str, sources: list[str], dtype: str) -> dict:
    per_source, merge_wide = METHODS[method]
    models = sources[:1] if method == "slerp" else sources
    entries = [{"model": m, "parameters": dict(per_source)} for m in models]
    arithmetic = {"dtype": "float32"} if dtype == "float32" else {}  # 16-bit models: as stored, as users merge them
    if method == "linear":  # mergekit averages the base too when it is the base_model: leave base_model out
        return {"merge_method": method, "models": entries, **arithmetic}
    if method in ("slerp", "model_stock"):
        entries = [{"model": base}] + [{"model": m} for m in models]
    merge = {"merge_method": method, "base_model": base, "models": entries, "parameters": merge_wide}
    return {**merge, **arithmetic}


def run(tool: str, config_path: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(config_path), str(out)], capture_output=True, text=True, check=False
    )
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode or not last.startswith("{"):
        raise SystemExit(f"{tool} failed on {config_path.name}:\n{proc.stderr[-2000:]}")
    return json.loads(last)


def floor_seconds(inputs: list[str], out_bytes: int, scratch: Path) -> float:
    """Read every input safetensors file (page cache) and write `out_bytes`: the I/O a streaming merge does."""
    started = time.perf_counter()
    chunk = bytearray(16 << 20)
    for folder in inputs:
        for f in Path(folder).glob("*.safetensors"):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(chunk):
                    pass
    with open(scratch, "wb") as fh:
        left = out_bytes
        while left > 0:
            fh.write(memoryview(chunk)[: min(left, len(chunk))])
            left -= len(chunk)
    elapsed = time.perf_counter() - started
    scratch.unlink()
    return elapsed


def start_seconds() -> float:
    """Wall time of a fresh `python -c "import torch"`."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def largest_tensor_bytes(model: str, itemsize: int) -> int:
    from safetensors import safe_open

    largest = 0
    for f in Path(model).glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():
                shape = fh.get_slice(name).get_shape()
                largest = max(largest, itemsize * math.prod(shape))
    return largest


def main() -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    default = [m for m in METHODS if m != "breadcrumbs_ties"]
    ap.add_argument("--methods", nargs="+", default=default, choices=list(METHODS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--tie-order", action="store_true", help="also time evomerge with tie_order: position (TIES, breadcrumbs)"
    )
    args = ap.parse_args()
    try:
        import mergekit  # noqa: F401

        tools = ["evomerge", "mergekit"]
    except ImportError:
        tools = ["evomerge"]
        print("mergekit is not importable: evomerge only (PYTHONPATH=... to a mergekit 0.1.5 install adds it)")
    root = Path(tempfile.mkdtemp(prefix="merge-e2e-"))
    base, sources, size = make_models(root / "models", args.params, args.sources, args.dtype)
    largest = largest_tensor_bytes(base, 4 if args.dtype == "float32" else 2)
    bound = 2 * size + largest * args.sources
    print(f"{size / 1e6:.0f} MB per model ({args.dtype}), base + {args.sources} sources, {os.cpu_count()} cores")
    print(f"peak RSS target: 2 × model + largest tensor × sources = {bound / 2**20:.0f} MiB")
    times: dict[tuple[str, str], list[float]] = {}
    rss: dict[tuple[str, str], list[float]] = {}
    floors, starts = [], []
    for rep in range(args.repeats):
        starts.append(start_seconds())
        for method in args.methods:
            path = root / f"{method}.yml"
            path.write_text(yaml.safe_dump(config(method, base, sources, args.dtype)))
            used = [base, *sources[: 1 if method == "slerp" else None]]
            floors.append((method, floor_seconds(used, size, root / "scratch.bin")))
            by_position = root / f"{method}-position.yml"
            by_position.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "tie_order": "position"}))
            ties = args.tie_order and method in ("ties", "breadcrumbs_ties")
            order = tools + (["position"] if ties else [])
            for tool in order if rep % 2 == 0 else reversed(order):
                out = root / f"out-{tool}-{method}"
                r = run("evomerge", by_position, out) if tool == "position" else run(tool, path, out)
                subprocess.run(["rm", "-rf", str(out)], check=True)
                times.setdefault((method, tool), []).append(r["seconds"])
                rss.setdefault((method, tool), []).append(r["rss_kib"] / 1024)
            print(f"  repeat {rep + 1}/{args.repeats}: {method} done", flush=True)
    floor = {m: statistics.median(s for k, s in floors if k == m) for m in args.methods}
    start = statistics.median(starts)
    head = "| method | evomerge s | × floor | × (floor + start) | peak RSS MB |"
    head += " tie_order: position s |" if args.tie_order else ""
    if "mergekit" in tools:
        head += " mergekit s | peak RSS MB | mergekit / evomerge |"
    print(f"\nmedian of {args.repeats}; floor = read the inputs + write one model from the page cache;")
    print(f"start = python -c 'import torch': {start:.2f} s (median)\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for m in args.methods:
        e = statistics.median(times[(m, "evomerge")])
        peak = statistics.median(rss[(m, "evomerge")])
        row = f"| {m} | {e:.2f} | {e / floor[m]:.1f}× ({floor[m]:.2f} s) | {e / (floor[m] + start):.1f}× | {peak:.0f} |"
        if args.tie_order:
            row += f" {statistics.median(times[(m, 'position')]):.2f} |" if (m, "position") in times else " – |"
        if "mergekit" in tools:
            k = statistics.median(times[(m, "mergekit")])
            row += f" {k:.2f} | {statistics.median(rss[(m, 'mergekit')]):.0f} | {k / e:.2f}× |"
        print(row)
    subprocess.run(["rm", "-rf", str(root)], check=True)


if __name__ == "__main__":
    main()
