"""Per-call overhead and throughput: native evaluator vs evomerge's lm-eval adapter (tasks built once,
`evaluator.evaluate`) vs stock `lm_eval.simple_evaluate`, on the same zoo tasks and the same in-memory
model, measured side by side in one run.

    python benchmarks/eval_overhead.py [--zoo DIR] [--repeats 3]

Overhead is measured with one example per task (`limit=1`); throughput with the whole search split.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import logging

    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.lm_eval_adapter import LMEvalEvaluator, lm_eval_task_name
    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import load_specs, load_task
    from evomerge.zoo.build import SMALL, build_zoo

    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=None, help="zoo directory (default: build the small zoo in a temp dir)")
    ap.add_argument("--tasks", nargs="+", default=["math_a", "facts_a"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    zoo = Path(args.zoo) if args.zoo else build_zoo(Path(tempfile.mkdtemp()) / "zoo", SMALL)
    manifest = json.loads((zoo / "manifest.json").read_text())
    path = manifest["experts"]["expert_math"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    specs = load_specs(zoo, args.tasks)
    tasks = [load_task(s, "search") for s in specs]
    n_examples = sum(len(t.items) for t in tasks)
    include = manifest["lm_eval_include_path"]
    names = [lm_eval_task_name(s.name, "search") for s in specs]

    native = NativeEvaluator(model, tok, tasks, batch_size=64)
    adapter = LMEvalEvaluator(model, tok, names, include_path=include, batch_size=64)
    hflm = adapter.lm
    one = {t.name: [0] for t in tasks}

    rows = []
    rows.append(("native", timed(lambda: native.evaluate(one), args.repeats), timed(native.evaluate, args.repeats)))
    rows.append(
        (
            "lm-eval adapter (tasks built once)",
            timed(lambda: adapter.evaluate(limit=1), args.repeats),
            timed(adapter.evaluate, args.repeats),
        )
    )
    prebuilt = TaskManager(include_path=include, include_defaults=False)
    rows.append(
        (
            "simple_evaluate, prebuilt TaskManager",
            timed(
                lambda: simple_evaluate(model=hflm, tasks=names, task_manager=prebuilt, limit=1, verbosity="ERROR"),
                args.repeats,
            ),
            timed(
                lambda: simple_evaluate(model=hflm, tasks=names, task_manager=prebuilt, verbosity="ERROR"), args.repeats
            ),
        )
    )
    rows.append(
        (
            "simple_evaluate, stock (default TaskManager)",
            timed(
                lambda: simple_evaluate(
                    model=hflm, tasks=names, task_manager=TaskManager(include_path=include), limit=1, verbosity="ERROR"
                ),
                1,
            ),
            float("nan"),
        )
    )

    base_overhead, base_full = rows[0][1], rows[0][2]
    print(
        f"model {Path(path).name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), tasks "
        f"{args.tasks}, {n_examples} search examples, median of {args.repeats}"
    )
    print(
        f"{'evaluator':46s} {'per-call overhead':>18s} {'vs native':>10s} {'full split':>11s} {'examples/s':>11s} "
        f"{'vs native':>10s}"
    )
    for name, overhead, full in rows:
        eps = n_examples / full if full == full else float("nan")
        print(
            f"{name:46s} {overhead * 1000:15.1f} ms {overhead / base_overhead:9.1f}× {full:10.3f}s {eps:11.0f} "
            f"{full / base_full:9.1f}×"
        )


if __name__ == "__main__":
    main()
