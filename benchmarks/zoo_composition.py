"""Does the zoo's composed task need both experts? Scores on the search and select splits only — never test.

Prints, for the composed task (`math_b`, arithmetic asked in language B) and the math expert's own task
(`math_a`): the base, each expert, and task-arithmetic merges of the math expert and the language-B expert at a
few equal weights (base + w·(θ_math − base) + w·(θ_B − base)), each the mean of its search and select scores.
The composed task needs both experts when a merge scores above either expert on it.

    python benchmarks/zoo_composition.py [--zoo ~/.cache/evomerge/zoo-XXXX] [--weights 0.5 0.8 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import TaskSpec, load_task
    from evomerge.zoo.build import FULL, default_zoo_dir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=str(default_zoo_dir(FULL)), help="a built zoo (default: the full zoo's cache)")
    ap.add_argument("--weights", nargs="+", type=float, default=[0.5, 0.8, 1.0])
    args = ap.parse_args()
    zoo = Path(args.zoo)
    manifest = json.loads((zoo / "manifest.json").read_text())
    specs = [TaskSpec.from_dict(t) for t in manifest["tasks"] if t["name"] in ("math_a", "math_b")]
    tasks = {split: [load_task(s, split) for s in specs] for split in ("search", "select")}
    tokenizer = AutoTokenizer.from_pretrained(manifest["base"])
    model = AutoModelForCausalLM.from_pretrained(manifest["base"]).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}

    def weights(path: str) -> dict[str, torch.Tensor]:
        return AutoModelForCausalLM.from_pretrained(path).state_dict()

    experts = {name: weights(path) for name, path in manifest["experts"].items()}
    rows = {"base": base, **experts}
    math, lang_b = experts["expert_math"], experts["expert_lang_b"]
    for w in args.weights:
        rows[f"TA math + lang_b, w={w:g}"] = {
            k: base[k] + w * (math[k] - base[k]) + w * (lang_b[k] - base[k]) for k in base
        }
    print(
        f"zoo {zoo}: mean of the search and select scores ({sum(len(t.items) for t in tasks['search'])} + "
        f"{sum(len(t.items) for t in tasks['select'])} items)"
    )
    print(f"{'model':<28} {'math_a':>7} {'math_b':>7}")
    for label, state in rows.items():
        model.load_state_dict(state)
        scores = {split: NativeEvaluator(model, tokenizer, ts).evaluate().scores for split, ts in tasks.items()}
        mean = {name: (scores["search"][name] + scores["select"][name]) / 2 for name in ("math_a", "math_b")}
        print(f"{label:<28} {mean['math_a']:>7.3f} {mean['math_b']:>7.3f}")


if __name__ == "__main__":
    main()
