"""Search under faults: failed and NaN candidates, several workers, killed workers, database outages, two
searches of one run, secrets. SQLite always; PostgreSQL too when EVOMERGE_TEST_POSTGRES names a server
(e.g. postgresql://user:pass@127.0.0.1:5432/evomerge_test)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.cli import main
from evomerge.search import reliability

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"
POSTGRES = os.environ.get("EVOMERGE_TEST_POSTGRES")


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(params=["sqlite"] + (["postgres"] if POSTGRES else []))
def storage(request, tmp_path):
    """(storage URL or None for the run's own SQLite, a unique study name)."""
    name = f"f{uuid.uuid4().hex[:8]}"
    if request.param == "postgres":
        return POSTGRES, name
    return f"sqlite:///{tmp_path / 'shared.db'}", name


def states(study):
    out = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def space_file(tmp_path, **genes):
    data = {"name": "hostile", "method": "task_arithmetic", "granularity": "global", "genes": genes}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def search(zoo, runs, name, space, *extra):
    return main(
        [
            "search",
            "--zoo",
            str(zoo),
            "--space",
            str(space),
            "--runs-dir",
            str(runs),
            "--name",
            name,
            "--no-baselines",
            *extra,
        ]
    )


# ---- failed candidates ---------------------------------------------------------------------------------------
def test_nan_and_overflowing_candidates_fail_with_a_reason_and_the_search_goes_on(small_zoo, tmp_path):
    # lambda from 1e-2 to 1e45: some merged models give NaN logits, and above 3.4e38 lambda overflows fp32
    space = space_file(
        tmp_path, weight={"low": 0.0, "high": 1.0}, **{"lambda": {"low": 1e-2, "high": 1e45, "log": True}}
    )
    args = ["--optimizer", "random", "--trials", "12", "--max-failures", "50", "--task-names", "facts_a"]
    assert search(small_zoo, tmp_path / "runs", "nan", space, *args) == 0
    study = optuna.load_study(study_name="nan", storage=f"sqlite:///{tmp_path / 'runs' / 'nan' / 'study.db'}")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    reasons = {t.user_attrs["fail_reason"].split(":")[0] for t in failed}
    assert reasons == {"NonFiniteLogits", "RuntimeError"}, reasons  # RuntimeError: cannot convert 1e39 to fp32
    assert len({json.dumps(t.params) for t in failed}) == len(failed)  # a failure moves the sampler on
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 12 and states(study).get("RUNNING", 0) == 0
    report = json.loads((tmp_path / "runs" / "nan" / "report.json").read_text())
    assert len(report["failed_trials"]) == len(failed) and report["failed_trials"][0]["reason"]
    assert "Failed trials" in (tmp_path / "runs" / "nan" / "report.html").read_text()
    assert "fail_reason" in (tmp_path / "runs" / "nan" / "trials.csv").read_text().splitlines()[0]
    best = max(done, key=lambda t: t.user_attrs["fitness"])
    recipe = yaml.safe_load((tmp_path / "runs" / "nan" / "best_recipe.yaml").read_text())
    assert recipe["parameters"]["lambda"] in {t.params["lambda"] for t in done}
    assert report["best_search_fitness"] == best.user_attrs["fitness"]


def test_a_search_whose_every_candidate_fails_stops_after_max_failures(small_zoo, tmp_path, capsys):
    space = space_file(tmp_path, weight={"low": 1e39, "high": 1e40})  # every weight overflows fp32
    assert (
        search(small_zoo, tmp_path / "runs", "bad", space, "--optimizer", "cma", "--trials", "5", "--max-failures", "3")
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 candidates in a row failed (the last: RuntimeError" in err, err
    study = optuna.load_study(study_name="bad", storage=f"sqlite:///{tmp_path / 'runs' / 'bad' / 'study.db'}")
    assert states(study) == {"FAIL": 3}  # nothing left RUNNING
    # run again: cma's state knows those candidates failed, so it proposes new ones instead of crash-looping
    assert (
        search(small_zoo, tmp_path / "runs", "bad", space, "--optimizer", "cma", "--trials", "5", "--max-failures", "3")
        == 2
    )
    assert states(study) == {"FAIL": 6}
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials}) == 6


# ---- workers ------------------------------------------------------------------------------------------------
def _create(zoo, runs, url, name, trials, *extra):
    space = SPACES / "global_task_arithmetic.yaml"
    args = ["--storage", url, "--optimizer", "tpe", "--trials", str(trials), "--heartbeat", "1", *extra]
    assert search(zoo, runs, name, space, *args) == 0


@pytest.mark.slow
def test_workers_never_repeat_candidates_and_the_last_one_writes_the_report(small_zoo, tmp_path, storage):
    url, name = storage
    _create(small_zoo, tmp_path / "runs", url, name, 2)
    cmd = [sys.executable, "-m", "evomerge", "worker", "--study", name, "--trials", "14"]
    procs = [
        subprocess.Popen(
            cmd, env={**env(), "EVOMERGE_STORAGE": url}, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    study = optuna.load_study(study_name=name, storage=reliability.storage_url(url))
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) >= 14
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == len(done)  # per-worker sampler seeds
    assert not any("duplicate_of" in t.user_attrs for t in done)
    report = json.loads((tmp_path / "runs" / name / "report.json").read_text())
    assert report["n_trials"] == len(done)  # the worker that finished the study wrote it


@pytest.mark.slow
def test_a_killed_workers_trial_is_taken_over_and_the_study_reaches_its_count(small_zoo, tmp_path, storage):
    url, name = storage
    _create(small_zoo, tmp_path / "runs", url, name, 2)
    study = optuna.load_study(study_name=name, storage=reliability.storage_url(url))
    cmd = [sys.executable, "-m", "evomerge", "worker", "--study", name, "--trials", "16"]

    def worker():
        e = {**env(), "EVOMERGE_STORAGE": url}
        return subprocess.Popen(cmd, env=e, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def running_trial_of(pid):
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return next((t.number for t in trials if t.user_attrs.get("pid") == pid), None)

    killed = None
    for _ in range(10):  # a candidate takes a fraction of a second: retry until the kill lands inside one
        victim = worker()
        deadline = time.time() + 120
        while (number := running_trial_of(victim.pid)) is None and time.time() < deadline:
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        if number is not None and study.trials[number].state.name == "RUNNING":
            killed = number  # its process is dead and the trial is left RUNNING
            break
    assert killed is not None, "no kill landed inside a trial"
    survivor = worker()
    assert survivor.wait(timeout=300) == 0, survivor.stderr.read().decode()[-2000:]
    trial = study.trials[killed]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"].startswith("abandoned: its process")
    assert states(study).get("RUNNING", 0) == 0
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) >= 16


def test_a_silent_trial_is_stale_after_three_heartbeats():
    trial = optuna.trial.create_trial(
        params={},
        distributions={},
        value=None,
        state=optuna.trial.TrialState.RUNNING,
        user_attrs={"host": "elsewhere", "pid": 1, "heartbeat": 1000.0},
    )
    assert reliability.stale_reason(trial, interval=10, now=1025.0) is None
    assert "no heartbeat from elsewhere:1 for 31 s" == reliability.stale_reason(trial, interval=10, now=1031.0)
    here = optuna.trial.create_trial(
        params={},
        distributions={},
        value=None,
        state=optuna.trial.TrialState.RUNNING,
        user_attrs={"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": 1000.0},
    )
    assert reliability.stale_reason(here, interval=10, now=1e12) is None  # a live process on this host answers
    untagged = optuna.trial.create_trial(params={}, distributions={}, value=None, state=optuna.trial.TrialState.RUNNING)
    asked = untagged.datetime_start.timestamp()
    assert reliability.stale_reason(untagged, interval=10, now=asked + 25) is None  # just asked by a live process
    assert reliability.stale_reason(untagged, interval=10, now=asked + 31) == "no heartbeat since it was asked 31 s ago"


# ---- one search per run, outages, secrets ---------------------------------------------------------------------
def test_a_second_search_of_a_running_run_refuses_with_one_line(small_zoo, tmp_path, capsys):
    space = SPACES / "global_task_arithmetic.yaml"
    assert search(small_zoo, tmp_path, "r", space, "--trials", "1", "--optimizer", "random") == 0
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'r' / 'study.db'}")
    with reliability.run_lock(tmp_path / "r", study, interval=10):  # as if another process were searching it
        assert search(small_zoo, tmp_path, "r", space, "--trials", "2", "--optimizer", "random") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run 'r' is being searched by" in err and "evomerge worker" in err
    assert search(small_zoo, tmp_path, "r", space, "--trials", "2", "--optimizer", "random") == 0  # lock released


def test_storage_errors_are_retried_then_named_by_their_cause():
    import sqlalchemy.exc

    def lost_connection():
        try:
            raise ConnectionError("server closed the connection unexpectedly")
        except ConnectionError as cause:  # as Optuna reports it: a wrapper whose last line hides the cause
            try:
                raise sqlalchemy.exc.OperationalError("SELECT 1", {}, cause) from cause
            except sqlalchemy.exc.OperationalError as e:
                raise RuntimeError("StorageInternalError: exceeding max length") from e

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            lost_connection()
        return "ok"

    assert reliability.with_retries(flaky, "asking", delays=(0, 0, 0)) == "ok" and len(calls) == 3
    with pytest.raises(
        reliability.StorageUnavailable, match="ConnectionError: server closed the connection unexpectedly"
    ):
        reliability.with_retries(lost_connection, "asking", delays=(0, 0))

    def bug():
        raise ValueError("bug")

    with pytest.raises(ValueError):  # anything else is not retried
        reliability.with_retries(bug, "asking", delays=(0,))


def test_passwords_are_never_written_and_urls_can_come_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from evomerge.search.loop import SearchConfig

    url = "postgresql://evo:s3cret@127.0.0.1:5432/evomerge"
    assert reliability.redact(url) == "postgresql://evo:***@127.0.0.1:5432/evomerge"
    assert reliability.storage_url(url) == "postgresql+psycopg://evo:s3cret@127.0.0.1:5432/evomerge"
    cfg = SearchConfig(name="n", space={}, base="b", sources=["s"], tasks=[], storage=url)
    assert "s3cret" not in json.dumps(cfg.public())
    (tmp_path / "url").write_text(url + "\n")
    assert reliability.read_storage(None, str(tmp_path / "url")) == url
    monkeypatch.setenv("EVOMERGE_STORAGE", url)
    assert reliability.read_storage(None, None) == url
    assert reliability.read_storage("sqlite:///x.db", None) == "sqlite:///x.db"


def test_report_says_when_it_is_older_than_the_study_and_refresh_rewrites_it(small_zoo, tmp_path, capsys):
    space = SPACES / "global_task_arithmetic.yaml"
    assert search(small_zoo, tmp_path, "r", space, "--trials", "3", "--optimizer", "random") == 0
    path = tmp_path / "r" / "report.json"
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "n_trials": 1}))  # as written before more trials were evaluated
    capsys.readouterr()
    assert main(["report", str(tmp_path / "r")]) == 0
    assert "covers 1 trials; the study now has 3" in capsys.readouterr().out
    assert main(["report", "--refresh", str(tmp_path / "r")]) == 0
    assert "the study now has" not in capsys.readouterr().out
    assert json.loads(path.read_text())["n_trials"] == 3
