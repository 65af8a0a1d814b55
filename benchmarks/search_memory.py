"""Peak memory of a search process against the design bound (sources + 2) × model size.

Writes a generated Llama-shaped base and N sources (base + noise) as HF safetensors directories, then, in a
fresh child process per setting, does what a search does: loads the engine (base + resident task vectors),
loads the one target model, materializes a few TIES / DARE-TIES / task-arithmetic candidates into it and
runs a forward pass. Prints RSS above the process's baseline once torch, transformers and the inductor
compiler are imported (their code, a fixed cost, is shown apart), in model sizes: after the engine and
the target model are loaded (the weights: what grows with the model), and the peak (the weights plus the
kernels' compilation and the forward pass's working memory, which do not; shown apart as "working").
The bound is (sources + 2) × model for both settings: fp32 task vectors' weights are that bound exactly, so
only bf16 task vectors (the trade-off that halves their share) leave room for the working memory.

    python benchmarks/search_memory.py [--params 100e6] [--sources 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries a parent's RSS at the fork into its
    child's ru_maxrss, so a child of the process that generated the models reported at least that."""
    return rss_mb("VmHWM")


def make_models(root: Path, params: float, sources: int, dtype: str = "float32") -> tuple[str, list[str], int]:
    """A generated Llama base and sources (base + noise of 10⁻³), saved in `dtype`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, vocab = 1024, 2816, 32000
    layers = max(1, int((params - 2 * vocab * hidden) // (4 * hidden * hidden + 3 * hidden * inter)))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    paths = []
    for i in range(sources + 1):
        if i:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        path = root / f"m{i}"
        model.save_pretrained(path, state_dict={k: v.to(getattr(torch, dtype)) for k, v in model.state_dict().items()})
        paths.append(str(path))
    size = sum(p.numel() for p in model.parameters()) * getattr(torch, dtype).itemsize
    return paths[0], paths[1:], size


def child(base: str, sources: list[str], delta_dtype: str | None) -> None:
    import torch

    from evomerge.engine import Engine
    from evomerge.recipe import Recipe

    before_imports = rss_mb()
    import torch._inductor.compile_fx  # noqa: F401  (what the first compiled merge imports)
    from transformers import LlamaForCausalLM  # noqa: F401

    baseline = rss_mb()  # code, not model: counted apart as "imports"
    engine = Engine(base, sources, delta_dtype=delta_dtype)
    after_engine = rss_mb()
    print(
        json.dumps({"engine peak": peak_rss_mb() - baseline}),
        file=sys.stderr,
    )
    model = engine.load_target_model()
    target = engine.bind(model)
    steps = {
        "target": rss_mb() - baseline,
        "peak so far": peak_rss_mb() - baseline,
    }
    for method, params in (
        ("ties", {"weight": 0.5, "density": 0.4}),
        ("dare_ties", {"weight": 0.5, "density": 0.4}),
        ("task_arithmetic", {"weight": 0.5}),
    ):
        recipe = Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": base,
                "models": [{"model": s, "parameters": params} for s in sources],
            }
        )
        engine.materialize(recipe, target)
        steps[method] = rss_mb() - baseline
        with torch.no_grad():
            model(torch.randint(0, 1000, (4, 64)))
        steps[method + "+forward"] = rss_mb() - baseline
    print(json.dumps(steps), file=sys.stderr)
    peak = peak_rss_mb()
    print(
        json.dumps(
            {
                "imports_mb": baseline - before_imports,
                "engine_mb": after_engine - baseline,
                "weights_mb": steps["target"],
                "peak_mb": peak - baseline,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--verbose", action="store_true", help="RSS after each step")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        base, delta_dtype, *sources = args.child
        child(base, sources, None if delta_dtype == "same" else delta_dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, sources, size = make_models(Path(tmp), args.params, args.sources)
        size_mb = size / 2**20
        print(
            f"model {size_mb:.0f} MiB fp32, {args.sources} sources; bound (sources + 2) × model = "
            f"{(args.sources + 2) * size_mb:.0f} MiB"
        )
        print(
            f"{'task vectors':14s} {'imports MiB':>12s} {'engine MiB':>11s} {'+ target MiB':>13s} {'× model':>8s} "
            f"{'peak MiB':>9s} {'× model':>8s} {'working MiB':>12s} {'bound':>6s}"
        )
        bound = args.sources + 2
        for delta_dtype in ("same", "bfloat16"):
            res = subprocess.run(
                [sys.executable, __file__, "--child", base, delta_dtype, *sources],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            if args.verbose:
                print("\n".join(res.stderr.strip().splitlines()[-2:]))
            ratio = r["peak_mb"] / size_mb
            name = "fp32" if delta_dtype == "same" else delta_dtype
            print(
                f"{name:14s} {r['imports_mb']:12.0f} {r['engine_mb']:11.0f} {r['weights_mb']:13.0f} "
                f"{r['weights_mb'] / size_mb:7.2f}× {r['peak_mb']:9.0f} {ratio:7.2f}× "
                f"{r['peak_mb'] - r['weights_mb']:12.0f} {bound:5.1f}× {'ok' if ratio <= bound else 'MISS'}"
            )


if __name__ == "__main__":
    main()
