"""The search: propose → materialize in place → score on the search split → tell, every candidate a trial.

A run lives in `runs/<name>/`: the Optuna study (`study.db` unless --storage names an RDB URL), the run
config (`config.json`), `trials.csv`, `best_recipe.yaml` and `best_mergekit.yaml` (rewritten on every
improvement), the cma state, and at the end `report.json`/`report.html` with the held-out test scores of
the best recipe next to the baselines. Running the same command again resumes: finished trials stay, an
interrupted one is marked failed and its candidate evaluated again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from ..engine import Engine
from ..evaluate.fitness import Fitness, weighted_mean
from ..evaluate.native import NativeEvaluator
from ..evaluate.tasks import TaskSpec, check_task_files, load_task, searching
from ..recipe import Recipe, RecipeError, atomic_write_text
from ..space import BoundSpace, SearchSpace
from . import OPTIMIZERS
from .optimizers import CMAOptimizer, GreedySoupOptimizer, OptunaOptimizer, make_sampler, sampler_seed

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SearchConfig:
    name: str
    space: dict[str, Any]  # SearchSpace as a dict (so the config is JSON and travels to workers)
    base: str
    sources: list[str]
    tasks: list[dict[str, Any]]  # TaskSpec dicts; their weights make the fitness
    source_names: list[str] | None = None
    optimizer: str = "cma"
    trials: int = 60
    seed: int = 0
    popsize: int | None = None
    sigma0: float = 0.2
    storage: str | None = None
    runs_dir: str = "runs"
    device: str = "auto"
    dtype: str = "float32"
    delta_dtype: str | None = None
    racing: str | None = None
    subsample: int | None = None
    batch_size: int = 128
    baselines: bool = True

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.run_dir() / 'study.db').resolve()}"

    def search_space(self) -> SearchSpace:
        return SearchSpace.model_validate(self.space)

    def task_specs(self) -> list[TaskSpec]:
        return [TaskSpec.from_dict(t) for t in self.tasks]

    def identity(self) -> dict[str, Any]:
        """The fields that define the experiment; a resume must match them."""
        d = asdict(self)
        for k in ("trials", "storage", "runs_dir", "device", "batch_size", "baselines"):
            d.pop(k)
        return json.loads(json.dumps(d))


@dataclass
class TrialInfo:
    number: int
    fitness: float
    scores: dict[str, float]
    best: float
    seconds: float
    pruned: bool
    completed: int
    total: int


@dataclass
class SearchOutcome:
    run_dir: Path
    best_recipe: Recipe | None
    best_fitness: float
    report: dict[str, Any] = field(default_factory=dict)


class Session:
    """Resident engine + target model + search-split evaluator for one run configuration."""

    def __init__(self, cfg: SearchConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.engine = Engine(cfg.base, cfg.sources, device=cfg.device, dtype=cfg.dtype, delta_dtype=cfg.delta_dtype)
        self.model = self.engine.load_target_model()
        self.target = self.engine.bind(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        self.space: BoundSpace = cfg.search_space().bind(
            cfg.base, cfg.sources, self.engine.names, self.engine.num_layers, cfg.source_names
        )
        self.specs = cfg.task_specs()
        with searching():
            tasks = [load_task(s, "search") for s in self.specs]
        self.evaluator = NativeEvaluator(self.model, self.tokenizer, tasks, batch_size=cfg.batch_size)
        self.fitness = Fitness(
            self.evaluator,
            {s.name: s.weight for s in self.specs},
            subsample=cfg.subsample,
            racing=cfg.racing,
            seed=cfg.seed,
        )

    def score(self, recipe: Recipe, call: int):
        self.engine.materialize(recipe, self.target)
        return self.fitness(call)


def validate(cfg: SearchConfig) -> None:
    """The checks that need no model: optimizer, space (gene bounds against each method's parameter ranges),
    every split of every task (parsed; held-out splits are not scored), and the storage. They run before
    anything is written under runs/NAME, so a run that cannot start leaves nothing behind."""
    if cfg.optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    cfg.search_space()
    for spec in cfg.task_specs():
        check_task_files(spec)
    if cfg.subsample is not None and cfg.subsample < 1:
        raise RecipeError(f"--subsample must be ≥ 1, got {cfg.subsample}")
    if cfg.storage:
        check_storage(cfg.storage)


def check_storage(url: str) -> None:
    """Connect once, so an unreachable database or a wrong URL is one line before the models load."""
    import sqlalchemy

    shown = url
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as e:  # sqlalchemy and its drivers raise many types; the first line names the cause
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecipeError(f"storage {shown}: cannot connect ({type(e).__name__}: {reason})") from None


def open_study(cfg: SearchConfig, create: bool = True) -> optuna.Study:
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    n_obj = len(cfg.tasks) if cfg.optimizer == "nsga2" else 1
    url = cfg.storage_url()
    storage = optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    )
    # the sampler is rebuilt from the config in every process; the study holds the trials
    if not create:
        return optuna.load_study(storage=storage, study_name=cfg.name)
    study = optuna.create_study(
        storage=storage, study_name=cfg.name, directions=["maximize"] * n_obj, load_if_exists=True
    )
    stored = study.user_attrs.get("evomerge_config")
    if stored is not None and SearchConfig(**stored).identity() != cfg.identity():
        old, new = SearchConfig(**stored).identity(), cfg.identity()
        diff = sorted(k for k in new if old.get(k) != new.get(k))
        if completed(study):
            raise RecipeError(
                f"run {cfg.name!r} exists with a different configuration ({', '.join(diff)}); use another --name or "
                "the same settings to resume"
            )
        # a run that never finished a trial holds nothing worth keeping: start it over with the new settings
        log.warning(
            "run %r had no complete trial; starting it again with the new configuration (%s)", cfg.name, ", ".join(diff)
        )
        optuna.delete_study(study_name=cfg.name, storage=storage)
        (cfg.run_dir() / "cma_state.pkl").unlink(missing_ok=True)
        study = optuna.create_study(storage=storage, study_name=cfg.name, directions=["maximize"] * n_obj)
        stored = None
    if stored is None:
        study.set_user_attr("evomerge_config", asdict(cfg))
    return study


def fail_stale_trials(study: optuna.Study, any_host: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Mark RUNNING trials of dead local processes (a killed run) as FAIL so their candidates are redone;
    returns them."""
    host = socket.gethostname()
    stale = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner_host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        dead = owner_host is None or (owner_host == host and not _alive(pid)) or any_host
        if dead:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            stale.append(t)
    return stale


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in completed(study) if "fitness" in t.user_attrs and not t.user_attrs.get("pruned")]
    return max(done, key=lambda t: (t.user_attrs["fitness"], -t.number)) if done else None


def run_search(
    cfg: SearchConfig,
    on_trial: Callable[[TrialInfo], None] | None = None,
    worker: bool = False,
    session: Session | None = None,
    say: Callable[[str], None] = log.info,
) -> SearchOutcome:
    """Run (or resume) a search until `cfg.trials` trials are complete; then write the held-out report.
    `say` reports the steps that take a while (loading the models, the held-out report)."""
    if worker and cfg.optimizer in ("cma", "greedy-soup"):
        raise RecipeError(
            f"the {cfg.optimizer} optimizer is sequential (one process); use optuna-cma, tpe, nsga2 or random for "
            "workers"
        )
    validate(cfg)
    if session is None:
        say(f"loading the base and {len(cfg.sources)} source(s), preparing {len(cfg.tasks)} task(s)")
        session = Session(cfg)  # loads and checks the models, binds the space: still nothing written
    space = session.space
    run_dir = cfg.run_dir()
    study = open_study(cfg)
    stale: list[optuna.trial.FrozenTrial] = []
    if not worker:
        atomic_write_text(run_dir / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
        stale = fail_stale_trials(study)
        if stale:
            log.info("marked %d interrupted trial(s) as failed; their candidates will be evaluated again", len(stale))
    if cfg.optimizer == "cma":
        optimizer: Any = CMAOptimizer(
            study, space, run_dir / "cma_state.pkl", seed=cfg.seed, sigma0=cfg.sigma0, popsize=cfg.popsize
        )
    elif cfg.optimizer == "greedy-soup":
        optimizer = GreedySoupOptimizer(study, space)  # replays its state from the complete trials
        cfg.trials = min(cfg.trials, optimizer.total)
    else:
        # a fresh sampler per candidate, seeded by its position among the complete trials, so a resumed run
        # proposes what an uninterrupted one would have (tpe, random; optuna-cma and nsga2 key on trial numbers)
        stream = f"{socket.gethostname()}:{os.getpid()}" if worker else ""
        optimizer = OptunaOptimizer(
            study, space, lambda n: make_sampler(cfg.optimizer, sampler_seed(cfg.seed, n, stream), space, cfg.popsize)
        )
        for t in stale:  # the interrupted candidates come first, as cma's do
            if t.params:
                study.enqueue_trial(t.params, skip_if_exists=False)
    best = best_trial(study)
    if best is not None:
        session.fitness.observe_best(best.user_attrs["fitness"], best.user_attrs.get("per_rung", []))
    best_value = best.user_attrs["fitness"] if best else float("-inf")
    with searching():
        while len(completed(study)) < cfg.trials:
            try:
                cand = optimizer.ask()
            except StopIteration:
                break
            cand.trial.set_user_attr("host", socket.gethostname())
            cand.trial.set_user_attr("pid", os.getpid())
            started = time.time()
            recipe = space.decode(cand.params, name=f"{cfg.name}-trial{cand.trial.number}")
            res = session.score(recipe, call=cand.position)
            seconds = time.time() - started
            for key, value in {
                "fitness": res.value,
                "scores": res.scores,
                "n_examples": res.n_examples,
                "pruned": res.pruned,
                "rung": res.rung,
                "per_rung": res.per_rung,
                "seconds": round(seconds, 4),
            }.items():
                cand.trial.set_user_attr(key, value)
            values = [res.scores.get(s.name, 0.0) for s in session.specs] if cfg.optimizer == "nsga2" else [res.value]
            optimizer.tell(cand, values)
            if not res.pruned and res.value > best_value:
                best_value = res.value
                write_best(run_dir, recipe)
            write_trials_csv(study, run_dir / "trials.csv", [s.name for s in session.specs])
            if on_trial:
                on_trial(
                    TrialInfo(
                        cand.trial.number,
                        res.value,
                        res.scores,
                        best_value,
                        seconds,
                        res.pruned,
                        len(completed(study)),
                        cfg.trials,
                    )
                )
    optimizer.finish()
    best = best_trial(study)
    best_recipe = space.decode(best.params, name=f"{cfg.name}-best") if best else None
    outcome = SearchOutcome(run_dir, best_recipe, best_value)
    if best_recipe is not None and not worker:
        write_best(run_dir, best_recipe)
        say(
            f"scoring the base, {len(cfg.sources)} source(s), {'the baselines and ' if cfg.baselines else ''}the "
            "evolved recipe on the held-out test split"
        )
        outcome.report = final_report(cfg, session, best_recipe, study)
    return outcome


def write_best(run_dir: Path, recipe: Recipe) -> None:
    recipe.save(run_dir / "best_recipe.yaml")
    try:
        import yaml

        atomic_write_text(run_dir / "best_mergekit.yaml", yaml.safe_dump(recipe.to_mergekit(), sort_keys=False))
    except RecipeError as e:
        atomic_write_text(
            run_dir / "best_mergekit.yaml", f"# this recipe cannot be expressed as a mergekit config: {e}\n"
        )


def write_trials_csv(study: optuna.Study, path: Path, task_names: list[str]) -> None:
    trials = study.get_trials(deepcopy=False)
    param_names = sorted({p for t in trials for p in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "number",
            "state",
            "fitness",
            *[f"score:{n}" for n in task_names],
            "pruned",
            "n_examples",
            "seconds",
            *param_names,
        ]
    )
    for t in trials:
        a = t.user_attrs
        w.writerow(
            [
                t.number,
                t.state.name,
                a.get("fitness", ""),
                *[a.get("scores", {}).get(n, "") for n in task_names],
                a.get("pruned", ""),
                a.get("n_examples", ""),
                a.get("seconds", ""),
                *[t.params.get(p, "") for p in param_names],
            ]
        )
    atomic_write_text(path, buf.getvalue())


# ---- baselines and the held-out report ------------------------------------------------------------
def baseline_recipes(base: str, sources: list[str], names: list[str]) -> dict[str, Recipe]:
    """Simple merges at default settings (documented in the README): uniform soup, task arithmetic
    (every task vector at weight 1), TIES and DARE-TIES (weight 1, density 0.5)."""

    def r(method: str, params: dict[str, float], extra: dict | None = None) -> Recipe:
        return Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": base,
                "models": [{"model": s, "parameters": dict(params)} for s in sources],
                "parameters": extra or {},
                "name": method,
            }
        )

    return {
        "uniform soup": r("linear", {"weight": 1.0}),
        "task arithmetic": r("task_arithmetic", {"weight": 1.0}),
        "TIES": r("ties", {"weight": 1.0, "density": 0.5}),
        "DARE-TIES": r("dare_ties", {"weight": 1.0, "density": 0.5}),
    }


def final_report(cfg: SearchConfig, session: Session, best: Recipe, study: optuna.Study) -> dict[str, Any]:
    """Score sources, baselines and the evolved recipe once on the test split (never during the search)."""
    from ..report import write_html_report

    specs = session.specs
    test_tasks = [load_task(s, "test") for s in specs]
    evaluator = NativeEvaluator(session.model, session.tokenizer, test_tasks, batch_size=cfg.batch_size)
    names = cfg.source_names or [Path(s).name for s in cfg.sources]
    rows: dict[str, dict[str, float]] = {}

    def score(recipe: Recipe) -> dict[str, float]:
        session.engine.materialize(recipe, session.target)
        return evaluator.evaluate().scores

    rows["base"] = score(
        Recipe.from_dict(
            {
                "merge_method": "task_arithmetic",
                "base_model": cfg.base,
                "models": [{"model": s, "parameters": {"weight": 0.0}} for s in cfg.sources],
            }
        )
    )
    for src, name in zip(cfg.sources, names):
        rows[name] = score(
            Recipe.from_dict(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": cfg.base,
                    "models": [{"model": s, "parameters": {"weight": 1.0 if s == src else 0.0}} for s in cfg.sources],
                }
            )
        )
    if cfg.baselines:
        for label, recipe in baseline_recipes(cfg.base, cfg.sources, names).items():
            rows[label] = score(recipe)
    rows["evolved"] = score(best)
    weights = {s.name: s.weight for s in specs}
    for row in rows.values():
        row["fitness"] = weighted_mean(row, weights)
    trials = completed(study)
    history = [
        (t.number, t.user_attrs.get("fitness"))
        for t in sorted(trials, key=lambda t: t.number)
        if "fitness" in t.user_attrs
    ]
    bt = best_trial(study)
    report = {
        "name": cfg.name,
        "tasks": [s.name for s in specs],
        "split": "test",
        "rows": rows,
        "best_trial": bt.number if bt else None,
        "best_search_fitness": bt.user_attrs.get("fitness") if bt else None,
        "n_trials": len(trials),
        "history": history,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
    }
    atomic_write_text(cfg.run_dir() / "report.json", json.dumps(report, indent=2) + "\n")
    write_html_report(cfg.run_dir(), report, best, session.space)
    return report
