"""Fault drill on a real PostgreSQL: 3 workers share one study; one worker is killed with SIGKILL mid-trial and
the database server is stopped (immediate mode: connections cut) and restarted once. Prints what happened
to the trials: asked / complete / failed / orphaned / duplicated / lost. Target: 0 orphaned, 0 duplicated,
0 lost.

    pip install -e '.[postgres]'
    python benchmarks/fault_drill.py [--trials 40] [--outage 15]

Needs `initdb` and `pg_ctl` (Debian: apt-get install -y postgresql; run as a user that may start it — as
root, the server runs as the `postgres` user). The server listens on 127.0.0.1 only, in a temporary
directory, and is stopped at the end. Uses the small demo zoo (built on first use).

- orphaned: trials still RUNNING at the end (nobody recovered them);
- duplicated: complete trials whose parameters equal another complete trial's;
- lost: trials COMPLETE before the outage that are missing or changed after it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL server on 127.0.0.1 in `root`."""

    def __init__(self, root: Path) -> None:
        self.data, self.port = root / "pgdata", free_port()
        self.user = "postgres" if os.geteuid() == 0 else None  # the server refuses to run as root
        root.chmod(0o777)
        self._run(["initdb", "-D", str(self.data), "-U", "evomerge", "--auth=trust"])

    def _run(self, cmd: list[str]) -> None:
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.data}"
        self._run(["pg_ctl", "-D", str(self.data), "-o", opts, "-w", "-l", str(self.data / "log"), "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop"])

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://evomerge@127.0.0.1:{self.port}/{db}"


def snapshot(url: str, name: str) -> dict[int, tuple[str, str]]:
    import optuna

    from evomerge.search.reliability import storage_url

    study = optuna.load_study(study_name=name, storage=storage_url(url))
    return {t.number: (t.state.name, json.dumps([t.params, t.values], sort_keys=True)) for t in study.trials}


def victim_trial(url: str, name: str, pid: int) -> int | None:
    """The number of a RUNNING trial of process `pid`, if any."""
    import optuna

    from evomerge.search.reliability import storage_url

    study = optuna.load_study(study_name=name, storage=storage_url(url))
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    return next((t.number for t in running if t.user_attrs.get("pid") == pid), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40, help="evaluated trials the study must reach")
    parser.add_argument("--outage", type=float, default=15.0, help="seconds the database stays down")
    args = parser.parse_args()
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        print("initdb/pg_ctl not found: apt-get install -y postgresql")
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from evomerge.zoo.build import SMALL, build_zoo

    zoo = build_zoo(None, SMALL)
    root = Path(tempfile.mkdtemp(prefix="evomerge-drill-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    pg = Postgres(root)
    pg.start()
    procs: list[subprocess.Popen] = []
    try:
        subprocess.run(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-p",
                str(pg.port),
                "-U",
                "evomerge",
                "-d",
                "postgres",
                "-qc",
                "CREATE DATABASE drill",
            ],
            check=True,
            env=env,
        )
        url, name = pg.url("drill"), "drill"
        env["EVOMERGE_STORAGE"] = url
        evomerge = [sys.executable, "-m", "evomerge"]
        subprocess.run(
            [
                *evomerge,
                "search",
                "--zoo",
                str(zoo),
                "--space",
                str(ROOT / "search_spaces" / "global_task_arithmetic.yaml"),
                "--optimizer",
                "tpe",
                "--trials",
                "2",
                "--heartbeat",
                "2",
                "--name",
                name,
                "--runs-dir",
                str(root / "runs"),
                "--no-baselines",
                "--task-names",
                "facts_a",
                "facts_b",
            ],
            check=True,
            env=env,
            cwd=root,
            stdout=subprocess.DEVNULL,
        )
        logs = [open(root / f"worker{i}.log", "w") for i in range(3)]
        procs = [
            subprocess.Popen(
                [*evomerge, "worker", "--study", name, "--trials", str(args.trials)],
                env=env,
                cwd=root,
                stdout=logs[i],
                stderr=subprocess.STDOUT,
            )
            for i in range(3)
        ]
        t0 = time.time()

        def complete() -> int:
            return sum(state == "COMPLETE" for state, _ in snapshot(url, name).values())

        while complete() < args.trials // 4:
            time.sleep(0.2)
        victim = procs[0]
        while (killed := victim_trial(url, name, victim.pid)) is None:  # kill it while it evaluates a candidate
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        print(f"{time.time() - t0:5.1f} s  killed worker 0 (pid {victim.pid}) with SIGKILL in trial {killed}")
        while complete() < args.trials // 2:
            time.sleep(0.2)
        before = snapshot(url, name)
        pg.stop("immediate")
        print(
            f"{time.time() - t0:5.1f} s  database stopped (immediate: connections cut), "
            f"{sum(s == 'COMPLETE' for s, _ in before.values())} complete"
        )
        time.sleep(args.outage)
        pg.start()
        print(f"{time.time() - t0:5.1f} s  database restarted after {args.outage:g} s")
        codes = [p.wait(timeout=900) for p in procs[1:]]
        print(f"{time.time() - t0:5.1f} s  workers 1 and 2 exited with {codes}")
        after = snapshot(url, name)
        done = [v for s, v in after.values() if s == "COMPLETE"]
        params = [json.loads(v)[0] for v in done]
        duplicated = len(params) - len({json.dumps(p, sort_keys=True) for p in params})
        lost = sum(1 for n, (s, v) in before.items() if s == "COMPLETE" and after.get(n) != (s, v))
        counts = {state: sum(s == state for s, _ in after.values()) for state in ("COMPLETE", "FAIL", "RUNNING")}
        print(
            f"the killed worker's trial {killed} ended {after[killed][0]}"
            + (" (it finished between the check and the kill)" if after[killed][0] == "COMPLETE" else "")
        )
        print(
            f"\ntrials asked {len(after)} / complete {counts['COMPLETE']} / failed {counts['FAIL']} / "
            f"orphaned {counts['RUNNING']} / duplicated {duplicated} / lost {lost}   (target complete >= {args.trials})"
        )
        import optuna

        from evomerge.search.reliability import storage_url

        study = optuna.load_study(study_name=name, storage=storage_url(url))
        for t in study.trials:
            if t.state.name == "FAIL":
                print(f"  trial {t.number} FAIL: {t.user_attrs.get('fail_reason')}")
        for i, log in enumerate(logs):
            log.close()
            if i and codes[i - 1] != 0:
                print(f"  worker {i} exited with {codes[i - 1]}; its last lines:")
                for line in (root / f"worker{i}.log").read_text().splitlines()[-12:]:
                    print(f"    {line[:160]}")
            tail = [
                line
                for line in (root / f"worker{i}.log").read_text().splitlines()
                if "WARNING" in line or "error" in line
            ]
            for line in tail[:4]:
                print(f"  worker {i}: {line.strip()[:150]}")
        ok = counts["RUNNING"] == 0 and duplicated == 0 and lost == 0 and counts["COMPLETE"] >= args.trials
        ok = ok and codes == [0, 0]
        print(f"target 0 orphaned, 0 duplicated, 0 lost: {'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        try:
            pg.stop("fast")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
