"""What a data-flow-space (layer-path) candidate costs: installing its path into the host model, next to scoring it.

The zoo's experts are the participants (resident once, as `search --space sakana_dfs.yaml` holds them). For
`--candidates` random points of the DFS genome (indicator genes uniform in [-1, 1]: about half of the T = M·r
slots in the path, longer paths than a search usually visits) it times, per candidate, `LayerPaths.use` (shallow
copies of the chosen layers, cache indices, scale hooks) and the native evaluator's score of the zoo's composed
task on its search split, side by side in one run, and prints their ratio.

    python benchmarks/dfs_candidate.py                       # the small zoo, built in a temporary folder (~20 s)
    python benchmarks/dfs_candidate.py --zoo ~/.cache/evomerge/zoo-<hash>   # a built demo zoo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", help="a built zoo directory; default: build the small zoo in a temporary folder")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="the genome's r")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import load_specs, load_task, searching
    from evomerge.layer_path import LayerPaths, Participant, PathRecipe, load_participants
    from evomerge.path_space import DFSGenes, PathSpace

    with tempfile.TemporaryDirectory() as tmp:
        zoo = Path(args.zoo) if args.zoo else _small_zoo(Path(tmp))
        manifest = json.loads((zoo / "manifest.json").read_text())
        participants = [Participant(model=d, name=n) for n, d in manifest["experts"].items()]
        start = PathRecipe(models=participants, layer_path=[{"model": 0, "layer": 0}])
        models = load_participants(start)
        paths = LayerPaths(models, [p.label for p in participants])
        host = paths.use(paths.identity(0))
        space = PathSpace(name="bench", dfs=DFSGenes(repeats=args.repeats), participants=participants)
        bound = space.bind(paths.num_layers)
        with searching():
            task = load_task(load_specs(zoo, [manifest["composed_task"]])[0], "search")
        evaluator = NativeEvaluator(host, AutoTokenizer.from_pretrained(participants[0].directory()), [task], 128)
        evaluator.evaluate()  # warm-up
        rng = random.Random(args.seed)
        build, score, lengths = [], [], []
        for _ in range(args.candidates):
            params = {g.name: g.from_unit(rng.random()) for g in bound.genes}
            try:
                steps = bound.decode(params).steps()
            except Exception:  # no slot included
                continue
            t0 = time.perf_counter()
            paths.use(steps)
            t1 = time.perf_counter()
            with torch.inference_mode():
                evaluator.evaluate()
            t2 = time.perf_counter()
            build.append((t1 - t0) * 1e3)
            score.append((t2 - t1) * 1e3)
            lengths.append(len(steps))
    slots = sum(paths.num_layers) * args.repeats
    layers = sum(paths.num_layers)
    print(f"zoo {zoo.name}: {len(participants)} participants, {layers} layers, {slots} slots, {bound.dim} genes")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {len(build)} candidates")
    print(f"path length: median {statistics.median(lengths):.0f} (min {min(lengths)}, max {max(lengths)})")
    print(f"install path: median {statistics.median(build):8.2f} ms")
    print(f"evaluation:   median {statistics.median(score):8.1f} ms ({len(task.items)} documents)")
    print(f"install / evaluation: {statistics.median(b / s for b, s in zip(build, score)):.5f}")


def _small_zoo(root: Path) -> Path:
    from evomerge.zoo.build import SMALL, build_zoo

    return build_zoo(root / "zoo", SMALL)


if __name__ == "__main__":
    main()
