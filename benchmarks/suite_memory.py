"""Peak memory of a command and every process it starts (the test suite by default), sampled every 0.1 s.

    python benchmarks/suite_memory.py                 # python -m pytest -q
    python benchmarks/suite_memory.py -- evomerge demo --small

Prints the peak of the summed RSS of the whole process tree (what the machine must hold at once), the peak of
the largest single process, and the wall time. Target for the suite: < 4 GiB, since it runs beside other
jobs on 24 GB machines.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(sum, max) of RSS over `proc` and its descendants, in bytes."""
    sizes = []
    for p in [proc, *proc.children(recursive=True)]:
        try:
            sizes.append(p.memory_info().rss)
        except psutil.Error:
            pass  # exited between listing and reading
    return sum(sizes), max(sizes, default=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command to run (after --)")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"] or [sys.executable, "-m", "pytest", "-q"]
    started = time.time()
    child = subprocess.Popen(command)
    proc = psutil.Process(child.pid)
    peak_sum = peak_one = 0
    while child.poll() is None:
        total, largest = tree_rss(proc)
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        time.sleep(0.1)
    gib = 1024**3
    print(f"command: {' '.join(command)}")
    print(f"exit status {child.returncode}, wall {time.time() - started:.0f} s")
    print(f"peak RSS, whole process tree: {peak_sum / gib:.2f} GiB; largest single process: {peak_one / gib:.2f} GiB")
    return child.returncode


if __name__ == "__main__":
    sys.exit(main())
