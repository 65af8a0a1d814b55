"""Evidence for the demo's search defaults, from the search and select splits only — never the test split.

Runs the demo's search (the zoo's composed task) for every combination of space, CMA-ES step size, trial
budget, population size and seed,
each in its own run directory, and stops after the selection step (`run_search(test_report=False)`: no test
item is scored). Prints, per setting, the select fitness of the chosen recipe — data no trial saw, the basis
for choosing — and the best search fitness, as mean ± standard deviation over the seeds.

    python benchmarks/search_defaults.py --zoo ~/.cache/evomerge/zoo-XXXX \\
        [--spaces sakana_ps global_task_arithmetic sakana_knots] [--sigmas 0.1 0.2 0.3] [--seeds 0 1] \\
        [--trials 200 400] [--popsizes 8 28] [--runs-dir DIR]
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from evomerge.evaluate.tasks import load_specs
    from evomerge.path_space import load_space
    from evomerge.search.loop import SearchConfig, run_search

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--spaces", nargs="+", default=["sakana_ps", "global_task_arithmetic", "sakana_knots"])
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--trials", nargs="+", type=int, default=[200], help="trial budgets")
    ap.add_argument(
        "--popsizes", nargs="+", type=int, default=[0], help="CMA-ES population sizes (0: cma's default, 4 + 3 ln n)"
    )
    ap.add_argument("--runs-dir", default=None, help="where the runs go (default: a temporary folder)")
    args = ap.parse_args()
    manifest = json.loads((Path(args.zoo) / "manifest.json").read_text())
    specs = load_specs(Path(args.zoo), [manifest["composed_task"]])
    runs = args.runs_dir or tempfile.mkdtemp(prefix="search-defaults-")
    results: dict[tuple[str, float, int, int], list[tuple[float, float]]] = {}
    settings = [(s, g, t, p) for s in args.spaces for g in args.sigmas for t in args.trials for p in args.popsizes]
    for space_name, sigma, trials, popsize in settings:
        space = load_space(ROOT / "search_spaces" / f"{space_name}.yaml").model_dump()
        for seed in args.seeds:
            cfg = SearchConfig(
                name=f"{space_name}-sigma{sigma:g}-trials{trials}-pop{popsize}-seed{seed}",
                space=space,
                base=manifest["base"],
                sources=list(manifest["experts"].values()),
                source_names=list(manifest["experts"]),
                tasks=[s.to_dict() for s in specs],
                trials=trials,
                seed=seed,
                popsize=popsize or None,
                sigma0=sigma,
                runs_dir=runs,
                baselines=False,
            )
            started = time.time()
            choice = run_search(cfg, test_report=False).report
            results.setdefault((space_name, sigma, trials, popsize), []).append(
                (choice["select_fitness"], choice["best_search_fitness"])
            )
            print(
                f"{cfg.name}: select {choice['select_fitness']:.3f}, search {choice['best_search_fitness']:.3f} "
                f"({time.time() - started:.0f} s)",
                flush=True,
            )

    def spread(values: list[float]) -> str:
        return (
            f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
        )

    print(f"\nseeds {args.seeds}; select = the chosen recipe on the select split; population 0 = cma's default\n")
    print("| space | sigma0 | trials | population | select fitness | best search fitness |")
    print("|---|---|---|---|---|---|")
    for (space_name, sigma, trials, popsize), rows in results.items():
        select, search = spread([r[0] for r in rows]), spread([r[1] for r in rows])
        print(f"| {space_name} | {sigma:g} | {trials} | {popsize} | {select} | {search} |")
    print(f"\nruns: {runs}")


if __name__ == "__main__":
    main()
