"""Does `evomerge` stay fast on a shared CPU when the user has not exported OMP_WAIT_POLICY?

OpenMP threads that spin while they wait steal the cores another job needs (and that job steals theirs): a
zoo training step went from 0.5 s to 4-5 s beside one CPU-bound process. The `evomerge` entry point sets
OMP_WAIT_POLICY=PASSIVE before torch is imported; this script measures `evomerge zoo build --small` with a
competing CPU-bound process in three settings, interleaved, and prints the ratios:

- unset: the variable not in the environment (what a new user has);
- exported: OMP_WAIT_POLICY=PASSIVE exported before starting (what CI does);
- torch first: torch imported before evomerge's entry point, as the entry point did before it set the
  variable first (the variable then comes too late to matter).

    python benchmarks/omp_wait_policy.py [--repeats 2]

Target: unset ≤ 1.5 × exported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TORCH_FIRST = "import sys, torch; from evomerge.cli import main; sys.exit(main(sys.argv[1:]))"


def timed_build(setting: str, out: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if setting == "exported":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    args = ["zoo", "build", "--small", "--out", out]
    cmd = (
        [sys.executable, "-c", TORCH_FIRST, *args]
        if setting == "torch first"
        else [sys.executable, "-m", "evomerge", *args]
    )
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the other job on the machine
    try:
        started = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - started
    finally:
        hog.kill()
        hog.wait()
        shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="builds per setting (interleaved)")
    args = parser.parse_args()
    settings = ["unset", "exported", "torch first"]
    times: dict[str, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for s in settings:
                times[s].append(timed_build(s, os.path.join(tmp, f"zoo-{r}-{s.replace(' ', '_')}")))
                print(f"  {s:12s} run {r + 1}: {times[s][-1]:.1f} s", flush=True)
    med = {s: statistics.median(v) for s, v in times.items()}
    print(
        f"\nevomerge zoo build --small beside one CPU-bound process, {os.cpu_count()} cores, median of {args.repeats}:"
    )
    for s in settings:
        print(f"  {s:12s} {med[s]:6.1f} s   {med[s] / med['exported']:.2f}x exported")
    ok = med["unset"] <= 1.5 * med["exported"]
    print(f"target unset <= 1.5x exported: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
