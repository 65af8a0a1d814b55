"""Per-candidate evaluation time of one lm-eval task, same model and documents, side by side in one run:

- native-compiled: the lm-eval task compiled to native batched items (`--evaluator auto`);
- lm-eval through evomerge: one HFLM on the resident model, task objects built once, `evaluate` per candidate
  (`--evaluator lm-eval`);
- naive loop: `simple_evaluate` with a fresh HFLM per candidate (what a loop around lm-eval does; the
  TaskManager is built once, which is generous to it: mergekit-evolve builds one per candidate).

Scores must be equal; ratios are against the naive loop.

    python benchmarks/eval_overhead.py [--zoo DIR] [--task zoo_facts_b] [--metric acc,none] [--repeats 3]
                                       [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def timed(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), value


def main() -> None:
    import torch
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.evaluator import Evaluator
    from evomerge.evaluate.tasks import TaskSpec, load_task
    from evomerge.zoo.build import SMALL, build_zoo, ensure_current_tasks

    transformers.utils.logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=None, help="zoo directory (default: build the small zoo in a temp dir)")
    ap.add_argument("--task", default="zoo_math_b", help="an lm-eval task of the zoo's tasks/lm_eval folder")
    ap.add_argument("--metric", default="exact_match,none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128, help="all three (128 is the search's default)")
    args = ap.parse_args()
    zoo = Path(args.zoo) if args.zoo else build_zoo(Path(tempfile.mkdtemp()) / "zoo", SMALL)
    ensure_current_tasks(zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    path = manifest["experts"]["expert_math"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    include = str(zoo / "tasks" / "lm_eval")
    spec = TaskSpec.from_dict({"lm_eval": args.task, "metric": args.metric, "include_path": include})
    # the documents lm-eval's own loop scores for this task (its test split: the zoo YAML's test_split), so all
    # three score the same documents; a benchmark, not a search: no recipe is chosen on them
    task = load_task(spec, "test")
    docs = len(task.items)
    compiled = Evaluator(model, tok, [task], batch_size=args.batch_size, mode="auto")
    through = Evaluator(model, tok, [load_task(spec, "test")], batch_size=args.batch_size, mode="lm-eval")
    manager = TaskManager(include_path=include, include_defaults=False)
    metric = args.metric

    def naive():
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
        with torch.inference_mode():
            out = simple_evaluate(model=lm, tasks=[args.task], task_manager=manager, verbosity="ERROR")
        return out["results"][args.task][metric]

    rows = [
        ("native-compiled (--evaluator auto)", *timed(lambda: compiled.evaluate().scores[spec.name], args.repeats)),
        ("lm-eval through evomerge", *timed(lambda: through.evaluate().scores[spec.name], args.repeats)),
        ("simple_evaluate, fresh HFLM per candidate", *timed(naive, args.repeats)),
    ]
    print(
        f"model {Path(path).name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), task "
        f"{args.task} ({metric}), {docs} documents, batch {args.batch_size}, median of {args.repeats}; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads"
    )
    naive_s = rows[-1][1]
    print(f"{'evaluator':44s} {'per candidate':>14s} {'docs/s':>8s} {'vs naive':>9s} {'score':>8s}")
    for name, seconds, score in rows:
        print(f"{name:44s} {seconds * 1000:11.1f} ms {docs / seconds:8.0f} {naive_s / seconds:8.1f}× {score:8.4f}")
    scores = {round(float(score), 10) for _, _, score in rows}
    print("scores equal" if len(scores) == 1 else f"SCORES DIFFER: {scores}")


if __name__ == "__main__":
    main()
