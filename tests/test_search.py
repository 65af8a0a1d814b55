import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "search_spaces" / "sakana_ps.yaml"


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_WAIT_POLICY"] = "PASSIVE"
    e["OMP_NUM_THREADS"] = "1"
    return e


def complete_trials(db):
    if not Path(db).exists():
        return []
    with sqlite3.connect(db, timeout=30) as c:
        try:
            rows = c.execute(
                "select t.number, v.value from trials t join trial_values v on v.trial_id = t.trial_id where t.state "
                "= 'COMPLETE' and v.objective = 0 order by t.number"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
    return rows


def test_search_writes_run_outputs_and_held_out_report(small_zoo, tmp_path, capsys):
    assert (
        main(
            [
                "search",
                "--zoo",
                str(small_zoo),
                "--space",
                str(SPACE),
                "--trials",
                "8",
                "--popsize",
                "4",
                "--runs-dir",
                str(tmp_path),
                "--name",
                "r",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    run = tmp_path / "r"
    for f in (
        "study.db",
        "trials.csv",
        "best_recipe.yaml",
        "best_mergekit.yaml",
        "report.json",
        "report.html",
        "cma_state.pkl",
        "config.json",
    ):
        assert (run / f).is_file(), f
    report = json.loads((run / "report.json").read_text())
    assert report["split"] == "test" and report["n_trials"] == 8
    assert {
        "base",
        "expert_math",
        "expert_lang_b",
        "expert_reverse",
        "uniform soup",
        "task arithmetic",
        "TIES",
        "DARE-TIES",
        "evolved",
    } <= set(report["rows"])
    assert len((run / "trials.csv").read_text().splitlines()) == 9
    recipe = Recipe.load(run / "best_recipe.yaml")
    assert recipe.merge_method == "dare_ties"
    assert recipe.tie_order == "position"  # what the search's engine merged, so `merge` writes the scored model
    assert yaml.safe_load((run / "best_mergekit.yaml").read_text())["merge_method"] == "dare_ties"
    assert "data:image/png;base64" in (run / "report.html").read_text()
    # the best recipe is a normal recipe: it merges to a model directory
    assert main(["merge", str(run / "best_recipe.yaml"), "--out", str(tmp_path / "merged")]) == 0
    # every row against the best source and the best simple merge, paired on the same test items
    significance = report["significance"]
    assert set(significance) == {"best source", "best simple merge"}
    best_source = max(["expert_math", "expert_lang_b", "expert_reverse"], key=lambda r: report["rows"][r]["fitness"])
    assert significance["best source"]["ref"] == best_source
    evolved = significance["best source"]["rows"]["evolved"]
    gap = report["rows"]["evolved"]["fitness"] - report["rows"][best_source]["fitness"]
    assert evolved["diff"] == pytest.approx(gap) and evolved["low"] <= evolved["diff"] <= evolved["high"]
    assert "Δ vs" in (run / "report.html").read_text()
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert f"Δ vs {best_source}" in capsys.readouterr().out


def test_same_seed_reproduces_the_same_trials(small_zoo, tmp_path):
    for name in ("a", "b"):
        assert (
            main(
                [
                    "search",
                    "--zoo",
                    str(small_zoo),
                    "--space",
                    str(SPACE),
                    "--trials",
                    "5",
                    "--popsize",
                    "5",
                    "--runs-dir",
                    str(tmp_path),
                    "--name",
                    name,
                    "--no-baselines",
                ]
            )
            == 0
        )
    a, b = (list(csv.DictReader(open(tmp_path / name / "trials.csv"))) for name in ("a", "b"))
    for row in a + b:
        row.pop("seconds")  # timing differs
    assert a == b


@pytest.mark.parametrize("optimizer", ["tpe", "optuna-cma", "nsga2", "random"])
def test_optuna_optimizers_run(small_zoo, tmp_path, optimizer):
    space = ROOT / "search_spaces" / "global_task_arithmetic.yaml"
    args = [
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(space),
        "--trials",
        "5",
        "--runs-dir",
        str(tmp_path),
        "--name",
        optimizer,
        "--optimizer",
        optimizer,
        "--no-baselines",
        "--popsize",
        "4",
    ]
    if optimizer == "nsga2":
        args += ["--task-names", "math_b", "facts_b"]
    assert main(args) == 0
    assert len(complete_trials(tmp_path / optimizer / "study.db")) == 5


def test_resuming_with_different_settings_is_refused(small_zoo, tmp_path, capsys):
    base = [
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(SPACE),
        "--trials",
        "2",
        "--popsize",
        "2",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "r",
        "--no-baselines",
    ]
    assert main(base) == 0
    assert main(base[:-1] + ["--seed", "5", "--no-baselines"]) == 2
    assert "different configuration" in capsys.readouterr().err
    # a run written before a space field existed (stored without it) resumes: the defaults fill it in
    import optuna

    study = optuna.load_study(study_name="r", storage=f"sqlite:///{tmp_path / 'r' / 'study.db'}")
    stored = study.user_attrs["evomerge_config"]
    del stored["space"]["knots"]
    study.set_user_attr("evomerge_config", stored)
    again = list(base)
    again[again.index("--trials") + 1] = "3"
    assert main(again) == 0


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_loses_and_repeats_nothing(small_zoo, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "evomerge",
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(SPACE),
        "--trials",
        "14",
        "--popsize",
        "5",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "k",
        "--no-baselines",
    ]
    db = tmp_path / "k" / "study.db"
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while len(complete_trials(db)) < 7 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = complete_trials(db)
    assert 7 <= len(before) < 14
    out = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    after = complete_trials(db)
    assert len(after) == 14
    assert after[: len(before)] == before  # finished trials kept, with their values
    import optuna

    study = optuna.load_study(study_name="k", storage=f"sqlite:///{db}")
    keys = [
        (t.user_attrs["cma_generation"], t.user_attrs["cma_index"]) for t in study.trials if t.state.name == "COMPLETE"
    ]
    assert len(keys) == len(set(keys)) == 14  # no candidate evaluated twice
    assert (tmp_path / "k" / "report.json").is_file()


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(small_zoo, tmp_path):
    space = ROOT / "search_spaces" / "global_task_arithmetic.yaml"
    assert (
        main(
            [
                "search",
                "--zoo",
                str(small_zoo),
                "--space",
                str(space),
                "--trials",
                "2",
                "--runs-dir",
                str(tmp_path),
                "--name",
                "w",
                "--optimizer",
                "tpe",
                "--no-baselines",
            ]
        )
        == 0
    )
    db = tmp_path / "w" / "study.db"
    url = f"sqlite:///{db}"
    # a trial of the small zoo takes ~0.1 s, a worker's start ~6 s: 40 trials to share, so that one worker's start
    # ahead of the other (a second or two on a loaded machine) does not leave it every trial
    cmd = [sys.executable, "-m", "evomerge", "worker", "--storage", url, "--study", "w", "--trials", "42"]
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read().decode()[-2000:]
    import optuna

    study = optuna.load_study(study_name="w", storage=url)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert 42 <= len(done) <= 43  # each worker checks the count before asking; at most one overshoots
    pids = {t.user_attrs["pid"] for t in done[2:]}
    assert len(pids) == 2  # both workers evaluated trials


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_small_zoo(small_zoo, tmp_path, capsys):
    assert (
        main(
            [
                "demo",
                "--small",
                "--zoo",
                str(small_zoo),
                "--trials",
                "6",
                "--popsize",
                "3",
                "--seeds",
                "0",
                "1",
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "seed 0: held-out test split" in out and "fitness over seeds [0, 1]" in out
    table = out[out.index("seed 1: held-out test split") :]
    for row in ("expert_math", "uniform soup", "DARE-TIES", "global TA search", "PS search", "Δ vs"):
        assert row in table
    # the rows are the two runs' own: the global search's evolved row, the per-layer search's
    runs = {"global TA search": "demo-small-global_task_arithmetic-seed1", "PS search": "demo-small-seed1"}
    for label, run in runs.items():
        fitness = json.loads((tmp_path / run / "report.json").read_text())["rows"]["evolved"]["fitness"]
        assert f"{fitness:.3f}" in table.split(label, 1)[1].splitlines()[0], (label, fitness)


def test_racing_and_subsampling_through_the_search_loop(small_zoo, tmp_path):
    import optuna

    space = ROOT / "search_spaces" / "global_task_arithmetic.yaml"
    args = [
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(space),
        "--trials",
        "8",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "race",
        "--optimizer",
        "random",
        "--task-names",
        "facts_a",
        "facts_b",
        "--racing",
        "halving",
        "--subsample",
        "6",
        "--no-baselines",
    ]
    assert main(args) == 0
    study = optuna.load_study(study_name="race", storage=f"sqlite:///{tmp_path / 'race' / 'study.db'}")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 8
    assert all(t.user_attrs["n_examples"] <= 12 for t in done)  # 6 per task at most
    assert all("pruned" in t.user_attrs and "rung" in t.user_attrs for t in done)
    header = (tmp_path / "race" / "trials.csv").read_text().splitlines()[0]
    assert "pruned" in header and "n_examples" in header


def test_cma_resume_ignores_a_candidate_enqueued_but_never_started(small_zoo, tmp_path):
    import optuna

    base = [
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(SPACE),
        "--popsize",
        "3",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "q",
        "--no-baselines",
    ]
    assert main(base + ["--trials", "2"]) == 0
    study = optuna.load_study(study_name="q", storage=f"sqlite:///{tmp_path / 'q' / 'study.db'}")
    study.enqueue_trial(
        study.trials[0].params, user_attrs={"cma_generation": 0, "cma_index": 0}
    )  # as if killed right after enqueue
    assert main(base + ["--trials", "6"]) == 0
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    keys = [(t.user_attrs["cma_generation"], t.user_attrs["cma_index"]) for t in done]
    assert len(done) == 6 and len(set(keys)) == 6


@pytest.mark.parametrize("optimizer", ["tpe", "optuna-cma", "random", "nsga2", "cma"])
def test_resume_evaluates_the_interrupted_candidate_again_and_reproduces_the_run(
    small_zoo, tmp_path, monkeypatch, optimizer
):
    import optuna

    from evomerge.search.loop import Session

    space = ROOT / "search_spaces" / "global_task_arithmetic.yaml"

    def args(name):
        return [
            "search",
            "--zoo",
            str(small_zoo),
            "--space",
            str(space),
            "--trials",
            "7",
            "--popsize",
            "3",
            "--runs-dir",
            str(tmp_path),
            "--name",
            name,
            "--optimizer",
            optimizer,
            "--subsample",
            "6",
            "--task-names",
            "facts_a",
            "facts_b",
            "--no-baselines",
            "--seed",
            "2",
        ]

    def trials(name):
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}")
        return study, [(t.params, t.user_attrs["fitness"]) for t in study.trials if t.state.name == "COMPLETE"]

    assert main(args("whole")) == 0
    score, calls = Session.score, []

    def killed_at_the_fifth(self, recipe, call):
        calls.append(call)
        if len(calls) == 5:
            raise KeyboardInterrupt  # the process dies with its trial RUNNING
        return score(self, recipe, call)

    monkeypatch.setattr(Session, "score", killed_at_the_fifth)
    assert main(args("killed")) == 130
    monkeypatch.setattr(Session, "score", score)
    study, before = trials("killed")
    running = [t for t in study.trials if t.state.name == "RUNNING"]
    assert len(before) == 4 and len(running) == 1
    study._storage.set_trial_user_attr(running[0]._trial_id, "pid", 0)  # its process is gone
    assert main(args("killed")) == 0
    study, after = trials("killed")
    assert study.trials[running[0].number].state.name == "FAIL"
    assert after[4][0] == running[0].params  # the interrupted candidate comes first
    whole = trials("whole")[1]
    if optimizer in ("optuna-cma", "nsga2"):  # their generations are keyed by trial numbers, which moved on
        assert after[:5] == whole[:5]
    else:
        assert after == whole  # the run is the uninterrupted one, trial for trial


def test_the_select_split_chooses_the_runs_recipe_among_the_top_candidates(small_zoo, tmp_path, capsys):
    args = ["search", "--zoo", str(small_zoo), "--space", str(SPACE), "--trials", "6", "--popsize", "3"]
    args += ["--runs-dir", str(tmp_path), "--name", "s", "--no-baselines", "--task-names", "facts_a", "facts_b"]
    args += ["--select-top", "3", "--select-every", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    rows = {int(r["number"]): r for r in csv.DictReader(open(tmp_path / "s" / "trials.csv"))}
    top = report["selection"]["top"]
    assert [c["search"] for c in top] == sorted((float(r["fitness"]) for r in rows.values()), reverse=True)[:3]
    for c in top:
        assert float(rows[c["trial"]]["select_fitness"]) == c["select"]
    chosen = max(top, key=lambda c: (c["select"], c["search"], -c["trial"]))["trial"]
    assert report["best_trial"] == report["selection"]["chosen"] == chosen
    assert report["select_fitness"] == max(c["select"] for c in top)
    # the choice after 3 trials scored all three on select, whatever the final top 3 are
    assert all(rows[n]["select_fitness"] != "" for n in (0, 1, 2))
    assert "best on search" in report["rows"] and f"the run's recipe: trial #{chosen}" in " ".join(out.split())
    if chosen == report["selection"]["best_on_search"]:
        assert report["rows"]["best on search"] == report["rows"]["evolved"]
    # a resume scores no candidate on select twice
    assert main(args) == 0
    assert "on the select split" not in capsys.readouterr().out.split("the run's recipe")[0]


def test_the_select_split_is_held_out_from_trials(small_zoo):
    from evomerge.errors import HeldOutError
    from evomerge.evaluate.tasks import load_specs, load_task, searching, selecting

    spec = load_specs(small_zoo, ["facts_a"])[0]
    with searching():
        with pytest.raises(HeldOutError, match="select split"):
            load_task(spec, "select")
        with selecting():
            assert load_task(spec, "select").items
        with selecting(), pytest.raises(HeldOutError, match="test split"):
            load_task(spec, "test")


def test_without_a_select_split_the_best_on_search_is_the_runs_recipe(small_zoo, tmp_path, capsys):
    spec = next(t for t in json.loads((small_zoo / "manifest.json").read_text())["tasks"] if t["name"] == "facts_a")
    del spec["files"]["select"]
    (tmp_path / "tasks.json").write_text(json.dumps([spec]))
    args = ["search", "--zoo", str(small_zoo), "--space", str(SPACE), "--trials", "3", "--popsize", "3"]
    assert main(args + ["--runs-dir", str(tmp_path), "--name", "n", "--tasks", str(tmp_path / "tasks.json")]) == 0
    report = json.loads((tmp_path / "n" / "report.json").read_text())
    best = max(complete_trials(tmp_path / "n" / "study.db"), key=lambda r: (r[1], -r[0]))[0]
    assert report["best_trial"] == best and report["selection"]["top"] == [] and "best on search" not in report["rows"]
    assert "no select split" in " ".join(capsys.readouterr().out.split())


def test_a_search_can_stop_at_its_choice_without_touching_the_test_split(small_zoo, tmp_path, monkeypatch):
    """What benchmarks/search_defaults.py relies on to decide settings from search and select data alone."""
    from evomerge.evaluate import tasks
    from evomerge.evaluate.tasks import load_specs
    from evomerge.search import loop, session

    loaded = []

    def spy(spec, split):
        loaded.append(split)
        return tasks.load_task(spec, split)

    for module in (loop, session):  # where a search loads task splits
        monkeypatch.setattr(module, "load_task", spy)
    m = json.loads((small_zoo / "manifest.json").read_text())
    cfg = loop.SearchConfig(
        name="d",
        space=yaml.safe_load(SPACE.read_text()),
        base=m["base"],
        sources=list(m["experts"].values()),
        tasks=[s.to_dict() for s in load_specs(small_zoo, ["facts_a"])],
        trials=3,
        popsize=3,
        runs_dir=str(tmp_path),
        baselines=False,
    )
    choice = loop.run_search(cfg, test_report=False).report
    assert "test" not in loaded and "select" in loaded
    assert set(choice) == {"selection", "best_search_fitness", "select_fitness"}
    assert not (tmp_path / "d" / "report.json").exists() and (tmp_path / "d" / "best_recipe.yaml").is_file()


@pytest.mark.parametrize(
    "method, order, noted", [("ties", "position", True), ("ties", "mergekit", False), ("dare_ties", "position", False)]
)
def test_the_best_mergekit_config_says_when_mergekit_would_order_ties_otherwise(tmp_path, method, order, noted):
    from evomerge.search.loop import write_best

    recipe = Recipe.from_dict(
        {
            "merge_method": method,
            "base_model": "/b",
            "models": [{"model": "/a", "parameters": {"weight": 1.0, "density": 0.5}}],
            "tie_order": order,
        }
    )
    write_best(tmp_path, recipe, lambda r: r.to_mergekit())
    text = (tmp_path / "best_mergekit.yaml").read_text()
    assert ("tie_order: position" in text) == noted
    assert yaml.safe_load(text) == recipe.to_mergekit()
