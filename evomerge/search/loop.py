"""The search: propose → materialize in place → score on the search split → tell, every candidate a trial.

A run lives in `runs/<name>/`: the Optuna study (`study.db` unless --storage names an RDB URL), the run
config (`config.json`), `trials.csv`, `best_recipe.yaml` and `best_mergekit.yaml` (the best on search, rewritten
on every improvement; once the tasks' select split has chosen among the top candidates, the chosen one), the cma
state, and at the end `report.json`/`report.html` with the held-out test scores of the run's recipe next to the
baselines. Running the same command again resumes: finished trials stay, an
interrupted one is marked failed and its candidate evaluated again.
"""

from __future__ import annotations

import contextlib
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
from pydantic import ValidationError

from ..errors import HeldOutError, one_line, validation_summary
from ..evaluate.evaluator import EVALUATORS, Evaluator, with_twins
from ..evaluate.fitness import weighted_mean
from ..evaluate.heads import check_evaluable
from ..evaluate.tasks import TaskError, TaskSpec, check_task_files, load_task, searching
from ..path_space import PathSpace, space_from_dict
from ..recipe import Recipe, RecipeError, atomic_write_text
from ..significance import compare_rows
from ..space import BoundSpace, SearchSpace
from . import OPTIMIZERS, reliability
from .optimizers import CMAOptimizer, GreedySoupOptimizer, OptunaOptimizer, completed, make_sampler, sampler_seed
from .reliability import StorageUnavailable, fail_stale_trials, run_lock
from .selection import Selection, select, select_scores
from .session import PathSession, Session, make_session

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class SearchConfig:
    name: str
    space: dict[str, Any]  # SearchSpace as a dict (so the config is JSON and travels to workers)
    base: str
    sources: list[str]
    tasks: list[dict[str, Any]]  # TaskSpec dicts (native or lm-eval); their weights make the fitness
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
    evaluator: str = "auto"  # auto | native | lm-eval (evaluate/evaluator.py)
    heartbeat: float = reliability.HEARTBEAT_SECONDS  # seconds between a running trial's heartbeats
    max_failures: int = 10  # failed candidates in a row that stop the search
    select_top: int = 5  # candidates (best on search) scored on the select split to choose the run's recipe
    select_every: int = 0  # also choose every this many trials (0: at the end only)

    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def storage_url(self) -> str:
        return reliability.storage_url(self.storage) or f"sqlite:///{(self.run_dir() / 'study.db').resolve()}"

    def public(self) -> dict[str, Any]:
        """The config as written to config.json and the study: the storage URL without its password."""
        return {**asdict(self), "storage": reliability.redact(self.storage)}

    def search_space(self) -> SearchSpace | PathSpace:
        try:
            return space_from_dict(self.space)
        except ValidationError as e:
            raise RecipeError(f"run {self.name!r}: invalid search space: {validation_summary(e)}") from None

    def task_specs(self) -> list[TaskSpec]:
        """The tasks as this process scores them (with `--evaluator lm-eval`, native tasks as their lm-eval twins)."""
        return with_twins([TaskSpec.from_dict(t) for t in self.tasks], self.evaluator)

    def identity(self) -> dict[str, Any]:
        """The fields that define the experiment; a resume must match them."""
        d = asdict(self)
        operational = (
            "trials",
            "storage",
            "runs_dir",
            "device",
            "batch_size",
            "baselines",
            "heartbeat",
            "max_failures",
        )
        for k in (*operational, "select_top", "select_every"):  # a selection reads the trials; any K or N fits
            d.pop(k)
        d["space"] = self.search_space().model_dump()  # with defaults: a field added later does not change it
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


def validate(cfg: SearchConfig) -> None:
    """The checks that need no model: optimizer, space (gene bounds against each method's parameter ranges),
    every split of every task (parsed; held-out splits are not scored), and the storage. They run before
    anything is written under runs/NAME, so a run that cannot start leaves nothing behind."""
    if cfg.optimizer not in OPTIMIZERS:
        raise RecipeError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if cfg.evaluator not in EVALUATORS:
        raise RecipeError(f"unknown evaluator {cfg.evaluator!r}; choose from {', '.join(EVALUATORS)}")
    kinds = [(s.name, s.kind) for s in cfg.task_specs()]
    heads = {check_evaluable(model, kinds) for model in dict.fromkeys([cfg.base, *cfg.sources])}
    if isinstance(cfg.search_space(), PathSpace) and heads != {"causal_lm"}:
        raise RecipeError(
            "a layer-path (dfs:) space routes the layers of causal LMs; these models are not all causal LMs"
        )
    if isinstance(cfg.search_space(), PathSpace) and cfg.optimizer == "greedy-soup":
        raise RecipeError("greedy-soup chooses soup ingredients; a layer-path (dfs:) space needs another optimizer")
    if cfg.subsample is not None and cfg.subsample < 1:
        raise RecipeError(f"--subsample must be ≥ 1, got {cfg.subsample}")
    for spec in cfg.task_specs():
        n_search = check_task_files(spec)["search"]
        if cfg.subsample and cfg.subsample > n_search:
            raise TaskError(
                f"task {spec.name}: --subsample {cfg.subsample} is more than the {n_search} examples of its search part"
            )
    if cfg.max_failures < 1:
        raise RecipeError(f"--max-failures must be ≥ 1, got {cfg.max_failures}")
    if cfg.select_top < 1 or cfg.select_every < 0:
        raise RecipeError(f"--select-top must be ≥ 1 and --select-every ≥ 0, got {cfg.select_top}, {cfg.select_every}")
    if cfg.storage:
        reliability.check_storage(cfg.storage_url())


def open_study(cfg: SearchConfig, create: bool = True) -> optuna.Study:
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    n_obj = len(cfg.tasks) if cfg.optimizer == "nsga2" else 1
    storage = reliability.open_storage(cfg.storage_url())
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
        study.set_user_attr("evomerge_config", cfg.public())
    return study


def evaluated(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials that evaluated a candidate: what `--trials` counts (a repeated candidate reuses an
    earlier result and is not counted)."""
    return [t for t in completed(study) if "duplicate_of" not in t.user_attrs]


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    done = [t for t in completed(study) if "fitness" in t.user_attrs and not t.user_attrs.get("pruned")]
    return max(done, key=lambda t: (t.user_attrs["fitness"], -t.number)) if done else None


def run_search(
    cfg: SearchConfig,
    on_trial: Callable[[TrialInfo], None] | None = None,
    worker: bool = False,
    session: Session | PathSession | None = None,
    say: Callable[[str], None] = log.info,
    test_report: bool = True,
) -> SearchOutcome:
    """Run (or resume) a search until `cfg.trials` candidates are evaluated; then choose the run's recipe and
    write the held-out report (the `search` process, or the worker that finishes the study). `say` reports the
    steps that take a while; `test_report=False` stops after the choice, the test split untouched (experiments
    that decide settings, `benchmarks/search_defaults.py`)."""
    if worker and cfg.optimizer in ("cma", "greedy-soup"):
        raise RecipeError(
            f"the {cfg.optimizer} optimizer is sequential (one process); use optuna-cma, tpe, nsga2 or random for "
            "workers"
        )
    validate(cfg)
    if session is None:
        say(f"loading the base and {len(cfg.sources)} source(s), preparing {len(cfg.tasks)} task(s)")
        session = make_session(cfg)  # loads and checks the models, binds the space: still nothing written
    run_dir = cfg.run_dir()
    study = open_study(cfg)
    _record_partitions(cfg, study, session)
    with contextlib.ExitStack() as held:
        if not worker:
            held.enter_context(run_lock(run_dir, study, cfg.heartbeat))
            atomic_write_text(run_dir / "config.json", json.dumps(cfg.public(), indent=2) + "\n")
        best_value = _search_loop(cfg, study, session, worker, on_trial, say)
    # a worker that finds the study done (its own last trials too) writes the final report
    last_worker = worker and len(evaluated(study)) >= cfg.trials and reliability.settle(study, cfg.heartbeat)
    if not worker or last_worker:
        recipe, report = conclude(cfg, study, session, say, test_report)
        return SearchOutcome(run_dir, recipe, best_value, report)
    best = best_trial(study)
    return SearchOutcome(
        run_dir, session.space.decode(best.params, name=f"{cfg.name}-best") if best else None, best_value
    )


def conclude(
    cfg: SearchConfig,
    study: optuna.Study,
    session: Session | PathSession,
    say: Callable[[str], None] = log.info,
    test_report: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Choose the run's recipe (the select split among the top candidates), write it, and score it and the
    references once on the held-out test split (unless `test_report` is off: then the report holds the choice
    alone). (None, {}) when no trial is complete."""
    with searching():
        selection = select(cfg, study, session, say)
    if selection is None:
        return None, {}
    recipe = session.space.decode(selection.chosen.params, name=f"{cfg.name}-best")
    write_best(cfg.run_dir(), recipe, session.mergekit_config)
    if not test_report:
        chosen = selection.chosen
        choice = {"best_search_fitness": chosen.user_attrs["fitness"], "select_fitness": selection.select_fitness}
        return recipe, {"selection": selection.summary(), **choice}
    return recipe, final_report(cfg, session, recipe, study, selection, say)


def _record_partitions(cfg: SearchConfig, study: optuna.Study, session: Session | PathSession) -> None:
    """The study keeps what its lm-eval tasks' search parts were; a resume on other documents is refused."""
    from ..evaluate.lm_eval_adapter import partition_record

    record = partition_record(session.tasks)
    stored = study.user_attrs.get("evomerge_partitions", {})
    if stored == record:
        return
    if stored and completed(study):
        raise RecipeError(
            f"run {cfg.name!r} searched other lm-eval documents ({stored}; now {record}): the task data changed; use "
            "another --name"
        )
    study.set_user_attr("evomerge_partitions", record)


def _search_loop(
    cfg: SearchConfig,
    study: optuna.Study,
    session: Session | PathSession,
    worker: bool,
    on_trial: Callable[[TrialInfo], None] | None,
    say: Callable[[str], None] = log.info,
) -> float:
    """Ask, evaluate, tell until enough candidates are evaluated; returns the best search fitness. A failed
    candidate is a FAIL trial with its reason and the search goes on; `cfg.max_failures` failures in a row
    stop it with the last reason. The study's storage retries by itself while the database is down. Every
    `cfg.select_every` trials (the searching process) the select split chooses among the top candidates and
    the chosen one is written as the best recipe until the next choice."""
    space, run_dir = session.space, cfg.run_dir()
    stale = fail_stale_trials(study, cfg.heartbeat)
    if stale:
        log.info("marked %d abandoned trial(s) as failed; their candidates will be evaluated again", len(stale))
    optimizer = _optimizer(cfg, study, space, worker, stale)
    best = best_trial(study)
    if best is not None:
        session.fitness.observe_best(best.user_attrs["fitness"], best.user_attrs.get("per_rung", []))
    best_value = best.user_attrs["fitness"] if best else float("-inf")
    failures = 0
    task_names = [s.name for s in session.specs]
    chosen_once = bool(select_scores(study))
    with searching():
        while len(done := evaluated(study)) < cfg.trials:
            if worker:
                fail_stale_trials(study, cfg.heartbeat)
            try:
                cand = optimizer.ask()
            except StopIteration:
                break
            for key, value in {"host": socket.gethostname(), "pid": os.getpid()}.items():
                study._storage.set_trial_user_attr(cand.trial._trial_id, key, value)
            earlier = _same_candidate(done, cand)
            beat = reliability.trial_heartbeat(study, cand.trial._trial_id, cfg.heartbeat)
            started = time.time()
            try:
                name = f"{cfg.name}-trial{cand.trial.number}"
                res, reason = (None, None) if earlier else _evaluate(session, space, cand, name)
            finally:
                beat.stop()
            seconds = time.time() - started
            try:
                _tell(cfg, study, optimizer, cand, earlier, res, reason, seconds, task_names)
            except optuna.exceptions.UpdateFinishedTrialError:
                note = "was finished meanwhile by another process (or a retried write); this result is dropped"
                log.warning("trial %d %s", cand.trial.number, note)
                continue
            finally:
                write_trials_csv(study, run_dir / "trials.csv", task_names)
            if earlier is not None:
                continue
            if res is None:
                failures += 1
                if failures >= cfg.max_failures:
                    raise RecipeError(
                        f"{failures} candidates in a row failed (the last: {reason}); finished trials are kept in "
                        f"{run_dir}; fix the space or the models, or raise --max-failures"
                    )
                continue
            failures = 0
            n = len(done) + 1
            if not res.pruned and res.value > best_value:
                best_value = res.value
                if not chosen_once:
                    best_recipe = space.decode(cand.params, name=f"{cfg.name}-trial{cand.trial.number}")
                    write_best(run_dir, best_recipe, session.mergekit_config)
            if cfg.select_every and not worker and n % cfg.select_every == 0 and n < cfg.trials:
                selection = select(cfg, study, session, say)
                if selection is not None and selection.candidates:
                    chosen = space.decode(selection.chosen.params, name=f"{cfg.name}-trial{selection.chosen.number}")
                    write_best(run_dir, chosen, session.mergekit_config)
                    chosen_once = True
            if on_trial:
                on_trial(
                    TrialInfo(cand.trial.number, res.value, res.scores, best_value, seconds, res.pruned, n, cfg.trials)
                )
    optimizer.finish()
    return best_value


def _optimizer(cfg: SearchConfig, study: optuna.Study, space: BoundSpace, worker: bool, stale: list) -> Any:
    start_first = isinstance(cfg.search_space(), PathSpace)  # a layer path starts from a model worth scoring
    if cfg.optimizer == "cma":
        state = cfg.run_dir() / "cma_state.pkl"
        return CMAOptimizer(
            study, space, state, seed=cfg.seed, sigma0=cfg.sigma0, popsize=cfg.popsize, start_first=start_first
        )
    if cfg.optimizer == "greedy-soup":
        optimizer = GreedySoupOptimizer(study, space)  # replays its state from the complete trials
        cfg.trials = min(cfg.trials, optimizer.total)
        return optimizer
    # a fresh sampler per candidate, seeded by its position among the trials (and, for a worker, by its
    # process), so a resumed run proposes what an uninterrupted one would have (tpe, random; optuna-cma and
    # nsga2 key on trial numbers) and workers do not propose each other's candidates
    stream = reliability.me() if worker else ""

    def sampler_for(position: int) -> optuna.samplers.BaseSampler:
        return make_sampler(cfg.optimizer, sampler_seed(cfg.seed, position, stream), space, cfg.popsize)

    for t in stale if not worker else []:  # the interrupted candidates come first, as cma's do
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
    if start_first and not study.get_trials(deepcopy=False):
        study.enqueue_trial(space.initial())
    return OptunaOptimizer(study, space, sampler_for)


def _tell(
    cfg: SearchConfig,
    study: optuna.Study,
    optimizer: Any,
    cand: Any,
    earlier: optuna.trial.FrozenTrial | None,
    res: Any,
    reason: str | None,
    seconds: float,
    task_names: list[str],
) -> None:
    """Record a candidate's outcome in its trial and tell the optimizer: a reused earlier result, a failure with
    its reason, or a fitness."""
    trial_id = cand.trial._trial_id
    if earlier is not None:  # the same candidate was evaluated before: reuse its result
        attrs = {k: earlier.user_attrs[k] for k in ("fitness", *RESULT_ATTRS) if k in earlier.user_attrs}
        _record(study, trial_id, {**attrs, "duplicate_of": earlier.number})
        optimizer.tell(cand, list(earlier.values))
    elif res is None:
        log.warning("trial %d failed: %s", cand.trial.number, reason)
        _record(study, trial_id, {"fail_reason": reason, "seconds": round(seconds, 4)})
        optimizer.fail(cand)
    else:
        attrs = {k: getattr(res, k) for k in RESULT_ATTRS}
        _record(study, trial_id, {**attrs, "fitness": res.value, "seconds": round(seconds, 4)})
        values = [res.scores.get(n, 0.0) for n in task_names] if cfg.optimizer == "nsga2" else [res.value]
        optimizer.tell(cand, values)


RESULT_ATTRS = ("scores", "n_examples", "pruned", "rung", "per_rung")  # and "fitness", FitnessResult.value


def _evaluate(session: Session | PathSession, space: BoundSpace, cand: Any, name: str) -> tuple[Any, str | None]:
    """(fitness result, None), or (None, reason) when the candidate cannot be merged or scored: an error in the
    merge, an out-of-range value, non-finite logits."""
    try:
        return session.score(space.decode(cand.params, name=name), call=cand.position), None
    except (HeldOutError, StorageUnavailable):
        raise  # a broken held-out rule or a lost database is not the candidate's fault
    except Exception as e:  # anything else stops this candidate, not the search
        return None, f"{type(e).__name__}: {one_line(e)}"


def _same_candidate(done: list[optuna.trial.FrozenTrial], cand: Any) -> optuna.trial.FrozenTrial | None:
    """An evaluated trial with exactly these parameters (workers or a categorical space can propose one twice)."""
    return next((t for t in done if t.params == cand.params and "fitness" in t.user_attrs), None)


def _record(study: optuna.Study, trial_id: int, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        study._storage.set_trial_user_attr(trial_id, key, value)


def write_best(run_dir: Path, recipe: Any, mergekit: Callable[[Any], dict]) -> None:
    """The best recipe, and the mergekit config that reproduces it (`mergekit`: the session's exporter)."""
    recipe.save(run_dir / "best_recipe.yaml")
    try:
        import yaml

        config = mergekit(recipe)
        atomic_write_text(run_dir / "best_mergekit.yaml", _tie_note(recipe) + yaml.safe_dump(config, sort_keys=False))
    except RecipeError as e:
        atomic_write_text(
            run_dir / "best_mergekit.yaml", f"# this recipe cannot be expressed as a mergekit config: {e}\n"
        )


def _tie_note(recipe: Any) -> str:
    """A comment for a mergekit config of a recipe the search scored with equal |δ| at TIES/breadcrumbs cuts kept
    by position: mergekit keeps those in its sort's order, so its merge can differ in exactly those entries."""
    from ..methods import METHODS

    methods = {getattr(recipe, "merge_method", None), *(r.method for r in getattr(recipe, "method_rules", []))}
    cut = any(m in METHODS and METHODS[m].sparsification in ("magnitude", "magnitude_outliers") for m in methods)
    if getattr(recipe, "tie_order", None) != "position" or not cut:
        return ""
    return (
        "# evomerge scored this recipe keeping equal |delta| at each TIES/breadcrumbs cut by position\n"
        "# (tie_order: position); mergekit keeps them in its sort's order, so its merge can differ in those\n"
        "# entries. `evomerge merge best_recipe.yaml` writes the model the search scored.\n"
    )


def write_trials_csv(study: optuna.Study, path: Path, task_names: list[str]) -> None:
    trials = study.get_trials(deepcopy=False)
    selected = select_scores(study)
    param_names = sorted({p for t in trials for p in t.params})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "number",
            "state",
            "fitness",
            *[f"score:{n}" for n in task_names],
            "select_fitness",
            "pruned",
            "n_examples",
            "seconds",
            "fail_reason",
            "duplicate_of",
            *param_names,
        ]
    )
    for t in trials:
        a = t.user_attrs
        scores = [a.get("scores", {}).get(n, "") for n in task_names]
        w.writerow(
            [
                t.number,
                t.state.name,
                a.get("fitness", ""),
                *scores,
                selected.get(t.number, {}).get("fitness", ""),
                a.get("pruned", ""),
                a.get("n_examples", ""),
                a.get("seconds", ""),
                a.get("fail_reason", ""),
                a.get("duplicate_of", ""),
                *[t.params.get(p, "") for p in param_names],
            ]
        )
    atomic_write_text(path, buf.getvalue())


# ---- the held-out report ------------------------------------------------------------------------------
def final_report(
    cfg: SearchConfig,
    session: Session | PathSession,
    best: Any,
    study: optuna.Study,
    selection: Selection,
    say: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Score the references (base, sources, simple merges; or each participant of a layer path) and the evolved
    recipe once on the test split (never during the search). With a select split, the best candidate on search
    is scored too (`best on search`), so the report shows what the selection changed; nothing is chosen by it."""
    from ..report import write_html_report

    specs = session.specs
    test_tasks = [load_task(s, "test") for s in specs]
    evaluator = Evaluator(session.model, session.tokenizer, test_tasks, cfg.batch_size, cfg.evaluator, session.decoder)
    rows: dict[str, dict[str, float]] = {}
    per_item: dict[str, dict[str, dict[int, float]]] = {}
    on_search = selection.best_on_search
    candidates = [*session.references().items(), ("evolved", best)]
    if selection.candidates and on_search.number != selection.chosen.number:
        candidates.append(("best on search", session.space.decode(on_search.params, name=f"{cfg.name}-on-search")))
    for i, (label, recipe) in enumerate(candidates, 1):
        say(f"held-out test split {i}/{len(candidates)}: {label}")  # ~5 s a row on the demo zoo
        session.install(recipe)
        result = evaluator.evaluate()
        rows[label], per_item[label] = result.scores, result.per_item
    if selection.candidates and "best on search" not in rows:  # the selection kept the best on search
        rows["best on search"], per_item["best on search"] = dict(rows["evolved"]), per_item["evolved"]
    weights = {s.name: s.weight for s in specs}
    for row in rows.values():
        row["fitness"] = weighted_mean(row, weights)
    kinds = session.reference_kinds()
    trials = evaluated(study)
    history = [
        (t.number, t.user_attrs.get("fitness"))
        for t in sorted(trials, key=lambda t: t.number)
        if "fitness" in t.user_attrs
    ]
    failed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
    chosen = selection.chosen
    report = {
        "name": cfg.name,
        "tasks": [s.name for s in specs],
        "split": "test",
        "rows": rows,
        "weights": weights,
        "references": kinds,
        "significance": compare_rows(per_item, {k: r["fitness"] for k, r in rows.items()}, weights, kinds, cfg.seed),
        "per_item": per_item,
        "best_trial": chosen.number,
        "best_search_fitness": chosen.user_attrs.get("fitness"),
        "select_fitness": selection.select_fitness,
        "selection": selection.summary(),
        "n_trials": len(trials),
        "failed_trials": [{"number": t.number, "reason": t.user_attrs.get("fail_reason", "unknown")} for t in failed],
        "history": history,
        "optimizer": cfg.optimizer,
        "seed": cfg.seed,
    }
    atomic_write_text(cfg.run_dir() / "report.json", json.dumps(report, indent=2) + "\n")
    write_html_report(cfg.run_dir(), report, best, session.space if isinstance(session, Session) else None)
    return report
