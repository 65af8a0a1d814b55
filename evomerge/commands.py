"""CLI commands beyond merging: zoo, eval, search, worker, report, soup, demo. Printing and progress bars
live here; the library modules only log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .search import OPTIMIZERS

console = Console()
DEFAULT_DEMO_SPACE = Path(__file__).resolve().parent.parent / "search_spaces" / "sakana_ps_sum.yaml"
# the demo's second search beside the default one: does the per-layer space earn its genes over 3 global ones?
GLOBAL_DEMO_SPACE = DEFAULT_DEMO_SPACE.with_name("global_task_arithmetic.yaml")


def score_table(
    title: str, rows: dict[str, dict[str, float]], columns: list[str], notes: dict[str, dict[str, str]] | None = None
) -> Table:
    """Scores per row; `notes` adds text columns (header → row → text)."""
    table = Table(title=title)
    table.add_column("model")
    for c in columns + list(notes or {}):
        table.add_column(c, justify="right")
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "-" for c in columns]
        cells += [column.get(name, "") for column in (notes or {}).values()]
        table.add_row(name, *cells, style="bold" if name in ("evolved", "PS", "DFS", "PS+DFS") else None)
    return table


# ---- zoo ---------------------------------------------------------------------------------------
def _zoo_config(args):
    from dataclasses import replace

    from .zoo.build import FULL, SMOKE

    cfg = SMOKE if getattr(args, "small", False) else FULL
    return replace(cfg, seed=args.zoo_seed if hasattr(args, "zoo_seed") else args.seed)


class StepProgress:
    """Steps, a status and the ETA of long loops (model training, search trials): a live bar per label on a
    terminal; in a log, a line every 10% (at most one per 2 s, so what takes a few seconds stays quiet)."""

    def __init__(self, status: str = "") -> None:
        self.status = status  # shown after the step count, e.g. "loss {}" or "best {}"
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}

    def __call__(self, label: str, step: int, total: int, value: str) -> None:
        import time

        now = time.time()
        self.started.setdefault(label, now)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            if self.bars is None:
                columns = (
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"),
                )
                self.bars = Progress(
                    *columns, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console
                )
                self.bars.start()
            if label not in self.tasks:
                self.tasks[label] = self.bars.add_task(f"  {label}", total=total, status="")
            self.bars.update(self.tasks[label], completed=step, total=total, status=self.status.format(value))
        elif step * 10 // total != (step - 1) * 10 // total and now - self.printed.get(label, self.started[label]) >= 2:
            elapsed = now - self.started[label]
            eta = elapsed / step * (total - step)
            console.print(
                f"  {label}: {step}/{total}, {self.status.format(value)}, {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
            )
            self.printed[label] = now

    def close(self) -> None:
        if self.bars is not None:
            self.bars.stop()
            self.bars = None


def build_zoo_with_progress(args: argparse.Namespace, out: str | None, overwrite: bool = False) -> Path:
    from .zoo.build import build_zoo

    training = StepProgress("loss {}")
    try:
        on_step = lambda name, step, total, loss: training(name, step, total, f"{loss:.3f}")  # noqa: E731
        return build_zoo(out, _zoo_config(args), progress=say, overwrite=overwrite, on_step=on_step)
    finally:
        training.close()


def current_zoo(zoo: Path) -> Path:
    """A built zoo, whatever its config, with its tasks brought up to date (see `ensure_current_tasks`)."""
    from .errors import EvomergeError
    from .zoo.build import ensure_current_tasks

    if not (zoo / "manifest.json").is_file():
        raise EvomergeError(f"{zoo}: no zoo here (no manifest.json); `evomerge zoo build --out {zoo}` builds one")
    ensure_current_tasks(zoo, say)
    return zoo


def say(message: str) -> None:
    console.print(f"[dim]{message}[/dim]")


def cmd_zoo_build(args: argparse.Namespace) -> int:
    out = build_zoo_with_progress(args, args.out, overwrite=args.overwrite)
    manifest = json.loads((out / "manifest.json").read_text())
    tasks = [t["name"] for t in manifest["tasks"]]
    console.print(score_table(f"zoo {out} (test split)", {k: v["test"] for k, v in manifest["scores"].items()}, tasks))
    console.print(f"manifest: {out / 'manifest.json'}")
    return 0


def cmd_zoo_vision(args: argparse.Namespace) -> int:
    import dataclasses

    from .zoo.build import cached_dir
    from .zoo.vision import SMALL, VisionZooConfig, build_vision_zoo

    config = dataclasses.replace(SMALL if args.small else VisionZooConfig(), seed=args.seed)
    out = args.out or cached_dir("vision-zoo", config)
    training = StepProgress("loss {}")
    try:
        on_step = lambda name, step, total, loss: training(name, step, total, f"{loss:.3f}")  # noqa: E731
        out = build_vision_zoo(out, config, progress=say, overwrite=args.overwrite, on_step=on_step)
    finally:
        training.close()
    manifest = json.loads((out / "manifest.json").read_text())
    tasks = [t["name"] for t in manifest["tasks"]]
    console.print(
        score_table(f"vision zoo {out} (test split)", {k: v["test"] for k, v in manifest["scores"].items()}, tasks)
    )
    ingredients = " ".join(manifest["ingredients"].values())
    console.print(f"next: evomerge soup {ingredients} --tasks {out} --out soup/")
    return 0


# ---- eval --------------------------------------------------------------------------------------
def local_model_dir(path: str, hub: bool = False) -> str:
    """A model argument is a local directory: a path that does not exist is an error, never a hub repo id
    (nothing is downloaded unless the user asks with --hub)."""
    if hub and not Path(path).exists():
        return path
    from .checkpoint import Checkpoint

    Checkpoint.open(path)  # one clear error for a missing or malformed directory
    return str(Path(path))


def cmd_eval(args: argparse.Namespace) -> int:
    from .engine import resolve_device
    from .evaluate.evaluator import Evaluator, with_twins
    from .evaluate.heads import check_evaluable, load_model, load_processor
    from .evaluate.tasks import load_specs, load_task

    path = local_model_dir(args.model, args.hub)
    specs = with_twins(load_specs(args.tasks, args.task_names, args.include_path), args.evaluator)
    head = check_evaluable(path, [(s.name, s.kind) for s in specs])
    tasks = [load_task(s, args.split) for s in specs]  # parsed before the model loads
    local = not args.hub
    model = load_model(path, head, local_files_only=local).to(resolve_device(args.device)).eval()
    tok = load_processor(path, head, local_files_only=local)
    scores = Evaluator(model, tok, tasks, args.batch_size, args.evaluator).evaluate().scores
    title = f"{args.model} ({args.split} split, {args.evaluator})"
    console.print(score_table(title, {Path(args.model).name: scores}, [s.name for s in specs]))
    return 0


# ---- search ------------------------------------------------------------------------------------
def _search_config(args: argparse.Namespace, space_path: Path, name: str, seed: int, ps_recipe: Any = None):
    """The run configuration of a search. For a layer-path space the sources are the participants, after the
    parameter-space merge `ps_recipe` when one is given (PS+DFS)."""
    from .evaluate.tasks import TaskError, load_specs
    from .path_space import PathSpace, load_space
    from .recipe import RecipeError

    if getattr(args, "mergekit_evolve", None):
        return _evolve_search_config(args, name, seed)
    loaded = load_space(space_path)  # validated, errors name the file
    space = loaded.model_dump(exclude={"participants"} if isinstance(loaded, PathSpace) else set())
    manifest: dict[str, Any] | None = None
    if args.zoo:
        manifest = json.loads((current_zoo(Path(args.zoo)) / "manifest.json").read_text())
    base = args.base or space.get("base") or (manifest and manifest["base"])
    sources = args.sources or space.get("sources")
    names = None
    if not sources and manifest:
        names = list(manifest["experts"])
        sources = [manifest["experts"][k] for k in names]
    if not base or not sources:
        raise RecipeError(
            "search needs a base and sources: --zoo DIR, or --base and --sources, or base:/sources: in the space"
        )
    task_source = args.tasks or (args.zoo and Path(args.zoo))
    if not task_source:
        raise TaskError("search needs --tasks (a manifest or task file) or --zoo")
    # --tasks without --task-names means every task listed there; a zoo alone means its composed task
    task_names = args.task_names or ([manifest["composed_task"]] if manifest and not args.tasks else None)
    specs = load_specs(task_source, task_names, args.include_path)
    if isinstance(loaded, PathSpace):
        labels = names or [Path(s).name for s in sources]
        space["participants"] = (
            [{"name": "ps", "recipe": ps_recipe.model_dump(exclude_none=True)}] if ps_recipe else []
        ) + [{"model": str(s), "name": label} for s, label in zip(sources, labels)]
    return _make_search_config(args, name, seed, space, base, sources, names, specs, args.subsample)


def _evolve_search_config(args: argparse.Namespace, name: str, seed: int):
    """A search from a mergekit-evolve config: its genome is the space, its models the base and sources, its
    tasks the fitness (see evolve_config.py for the mapping)."""
    from .evaluate.tasks import specs_from_dicts
    from .evolve_config import check_granularity, load_evolve_config
    from .recipe import RecipeError
    from .space import SearchSpace

    clash = [
        flag
        for flag, value in (
            ("--space", args.space),
            ("--tasks", args.tasks),
            ("--zoo", args.zoo),
            ("--base", args.base),
            ("--sources", args.sources),
        )
        if value
    ]
    if clash:
        raise RecipeError(f"--mergekit-evolve gives the space, models and tasks; drop {', '.join(clash)}")
    evolve = load_evolve_config(args.mergekit_evolve)
    base = local_model_dir(evolve.base)
    sources = [local_model_dir(s) for s in evolve.sources]
    check_granularity(evolve, json.loads((Path(base) / "config.json").read_text()).get("num_hidden_layers", 0))
    space = SearchSpace.model_validate(evolve.space).model_dump()
    specs = specs_from_dicts(evolve.tasks, Path(args.mergekit_evolve).parent, args.include_path)
    subsample = args.subsample if args.subsample is not None else evolve.subsample
    return _make_search_config(args, name, seed, space, base, sources, None, specs, subsample)


def _make_search_config(args, name, seed, space, base, sources, names, specs, subsample):
    from .search.loop import SearchConfig

    return SearchConfig(
        name=name,
        space=space,
        base=str(base),
        sources=[str(s) for s in sources],
        source_names=names,
        tasks=[s.to_dict() for s in specs],
        optimizer=args.optimizer,
        trials=args.trials,
        seed=seed,
        popsize=args.popsize,
        sigma0=args.sigma0,
        storage=_storage_arg(args),
        runs_dir=args.runs_dir,
        device=args.device,
        dtype=args.dtype,
        delta_dtype=args.delta_dtype,
        racing=args.racing,
        subsample=subsample,
        batch_size=args.batch_size,
        baselines=not args.no_baselines,
        evaluator=args.evaluator,
        heartbeat=args.heartbeat,
        max_failures=args.max_failures,
        select_top=args.select_top,
        select_every=args.select_every,
    )


def _run_with_progress(cfg, worker: bool = False):
    from .search.loop import run_search

    trials = StepProgress("best {}")
    try:

        def on_trial(info):
            trials(cfg.name, info.completed, info.total, f"{info.best:.3f}")

        return run_search(cfg, on_trial=on_trial, worker=worker, say=say)
    finally:
        trials.close()


def cmd_search(args: argparse.Namespace) -> int:
    space = Path(args.space or DEFAULT_DEMO_SPACE)
    default_name = Path(args.mergekit_evolve).stem if args.mergekit_evolve else space.stem
    name = args.name or default_name
    ps_recipe, _ = _ps_stage(args, space, name, args.seed)
    cfg = _search_config(args, space, name, args.seed, ps_recipe)
    outcome = _run_with_progress(cfg)
    _print_report(outcome.report)
    console.print(f"run directory: {outcome.run_dir}  (best_recipe.yaml, trials.csv, report.html)")
    return 0


def _print_report(report: dict[str, Any] | None, title: str | None = None) -> None:
    """The held-out table, with each row's paired difference from the best source and the best simple merge."""
    from .report import selection_line
    from .significance import short

    if not report:
        return
    title = title or f"{report['name']}: held-out test split"
    significance = report.get("significance", {})
    notes = {
        f"Δ vs {c['ref']}": {row: short(c["rows"].get(row)) for row in report["rows"]} for c in significance.values()
    }
    console.print(score_table(title, report["rows"], report["tasks"] + ["fitness"], notes))
    if "best_trial" in report:
        console.print(selection_line(report))
    if significance:
        refs = ", ".join(f"the {kind} ({c['ref']})" for kind, c in significance.items())
        console.print(
            f"Δ: fitness difference from {refs}, the best on test, on the same test items: bootstrap 95% interval"
            ", exact McNemar p for 0/1 tasks"
        )


def _ps_stage(args: argparse.Namespace, space_path: Path, name: str, seed: int) -> tuple[Any, dict[str, Any] | None]:
    """(recipe, report): the parameter-space merge a PS+DFS search starts from — --ps-recipe (no report), or the
    best recipe of the space's `ps` search, run (or resumed) first as NAME-ps, with its held-out report. (None,
    None) for other spaces."""
    from .path_space import PathSpace, load_space
    from .recipe import Recipe, RecipeError

    space = None if getattr(args, "mergekit_evolve", None) else load_space(space_path)
    if getattr(args, "ps_recipe", None):
        if not isinstance(space, PathSpace):
            raise RecipeError("--ps-recipe joins a merge to the participants of a layer-path (dfs:) space")
        return Recipe.load(args.ps_recipe), None
    if not isinstance(space, PathSpace) or not space.ps:
        return None, None
    say(f"PS+DFS: the parameter-space search {name}-ps first")
    outcome = _run_with_progress(_search_config(args, Path(space.ps), f"{name}-ps", seed))
    _print_report(outcome.report)
    return outcome.best_recipe, outcome.report


def _storage_arg(args: argparse.Namespace) -> str | None:
    from .search.reliability import read_storage

    return read_storage(args.storage, args.storage_file)


def cmd_worker(args: argparse.Namespace) -> int:
    import optuna

    from .errors import EvomergeError
    from .search.loop import SearchConfig
    from .search.reliability import open_storage, redact, storage_url

    url = _storage_arg(args)
    if not url:
        raise EvomergeError(
            "a worker needs the study's storage: --storage URL, --storage-file FILE or $EVOMERGE_STORAGE"
        )
    try:
        study = optuna.load_study(study_name=args.study, storage=open_storage(storage_url(url)))
    except KeyError:
        raise EvomergeError(f"no study named {args.study!r} at {redact(url)}") from None
    stored = study.user_attrs.get("evomerge_config")
    if stored is None:
        raise EvomergeError(f"study {args.study!r} at {redact(url)} was not created by evomerge search")
    cfg = SearchConfig(**stored)
    cfg.storage = url
    if args.trials:
        cfg.trials = args.trials
    if args.device:
        cfg.device = args.device
    outcome = _run_with_progress(cfg, worker=True)
    console.print(f"worker done; best search fitness so far {outcome.best_fitness:.3f}")
    _print_report(outcome.report)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if args.refresh:
        _refresh_report(args, run_dir)
    path = run_dir / "report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no report yet (the search has not finished); `evomerge report --refresh {run_dir}` writes one"
        )
    report = json.loads(path.read_text())
    _print_report(report, f"{report['name']}: held-out {report['split']} split")
    failed = report.get("failed_trials", [])
    if failed:
        console.print(f"{len(failed)} failed trial(s); the last: trial {failed[-1]['number']}: {failed[-1]['reason']}")
    now = _evaluated_now(args, run_dir)
    if now is not None and now != report["n_trials"]:
        console.print(
            f"[yellow]this report covers {report['n_trials']} trials; the study now has {now}: "
            f"`evomerge report --refresh {run_dir}` scores the current best[/yellow]"
        )
    console.print(f"HTML report: {run_dir / 'report.html'}")
    return 0


def _run_config(args: argparse.Namespace, run_dir: Path):
    from .errors import EvomergeError
    from .search.loop import SearchConfig

    path = run_dir / "config.json"
    if not path.is_file():
        raise EvomergeError(f"{path}: missing; {run_dir} is not a run directory")
    cfg = SearchConfig(**json.loads(path.read_text()))
    cfg.runs_dir, cfg.name, cfg.device = str(run_dir.parent), run_dir.name, args.device
    written = cfg.storage  # as written: without its password
    cfg.storage = _storage_arg(args) or (written if written and "***" not in written else None)
    if written and cfg.storage is None:
        raise EvomergeError(
            f"run {cfg.name!r} keeps its study in a database: give --storage, --storage-file or $EVOMERGE_STORAGE"
        )
    return cfg


def _evaluated_now(args: argparse.Namespace, run_dir: Path) -> int | None:
    """Evaluated trials in the study now, or None when the study cannot be read from here."""
    try:
        import optuna

        from .search.loop import evaluated

        cfg = _run_config(args, run_dir)  # a plain load: an optional note must not wait out database retries
        return len(evaluated(optuna.load_study(study_name=cfg.name, storage=cfg.storage_url())))
    except Exception:  # a report stays readable without its database
        return None


def _refresh_report(args: argparse.Namespace, run_dir: Path) -> None:
    from .evaluate.tasks import searching
    from .search.loop import best_trial, conclude, open_study
    from .search.session import make_session

    cfg = _run_config(args, run_dir)
    study = open_study(cfg, create=False)
    if best_trial(study) is None:
        from .errors import EvomergeError

        raise EvomergeError(f"run {cfg.name!r} has no complete trial to report")
    say("loading the models to choose the run's recipe and score it on the held-out test split")
    with searching():
        session = make_session(cfg)
    conclude(cfg, study, session, say)


# ---- soup --------------------------------------------------------------------------------------
def cmd_soup(args: argparse.Namespace) -> int:
    from .checkpoint import check_output_dir
    from .engine import Engine, write_merged
    from .evaluate.evaluator import Evaluator, with_twins
    from .evaluate.fitness import Fitness, weighted_mean
    from .evaluate.heads import check_evaluable, load_processor
    from .evaluate.tasks import check_task_files, load_specs, load_task, searching
    from .search.soup import greedy_soup, soup_recipe

    specs = with_twins(load_specs(args.tasks, args.task_names, args.include_path), args.evaluator)
    for spec in specs:
        check_task_files(spec)  # every split, before any scoring
    check_output_dir(args.out, args.overwrite)
    models = [local_model_dir(m) for m in args.models]
    for m in models:
        check_evaluable(m, [(s.name, s.kind) for s in specs])
    engine = Engine(models[0], models[1:], device=args.device, dtype=args.dtype)
    model = engine.load_target_model()
    target = engine.bind(model)
    tok = load_processor(models[0], engine.head)
    with searching():
        fitness = Fitness(
            Evaluator(model, tok, [load_task(s, "search") for s in specs], args.batch_size, args.evaluator),
            {s.name: s.weight for s in specs},
        )

        def score(recipe):
            engine.materialize(recipe, target)
            return fitness().value

        greedy = greedy_soup(engine, score, models, strict=not args.keep_ties) if not args.uniform else None
    chosen = greedy.members if greedy else models
    test = Evaluator(model, tok, [load_task(s, "test") for s in specs], args.batch_size, args.evaluator)
    weights = {s.name: s.weight for s in specs}
    rows = {}
    for label, members in [*[(Path(m).name, [m]) for m in models], ("uniform soup", models)] + (
        [("greedy soup", chosen)] if greedy else []
    ):
        engine.materialize(soup_recipe(models[0], members), target)
        row = test.evaluate().scores
        row["fitness"] = weighted_mean(row, weights)
        if greedy:
            row["search"] = (
                greedy.ingredient_scores.get(members[0], float("nan"))
                if len(members) == 1
                else (greedy.score if label == "greedy soup" else float("nan"))
            )
        rows[label] = row
    if greedy:  # the paper's "best individual model": the ingredient best on the held-out (search) split
        best = Path(max(models, key=lambda m: greedy.ingredient_scores[m])).name
        ordered = list(rows.items())
        rows = dict(ordered[: len(models)] + [("best ingredient", rows[best])] + ordered[len(models) :])
    columns = [s.name for s in specs] + ["fitness"] + (["search"] if greedy else [])
    card = (
        "## Soup\n\n"
        + ("Greedy soup (strict improvement on the search split)" if greedy else "Uniform soup")
        + f" of {len(chosen)} of {len(models)} ingredients:\n\n"
    )
    card += (
        "".join(f"- {m}\n" for m in chosen)
        + "\n| model | "
        + " | ".join(columns)
        + " |\n|---|"
        + "---|" * len(columns)
        + "\n"
    )
    card += (
        "".join(
            f"| {k} | " + " | ".join(f"{v.get(c, float('nan')):.3f}" for c in columns) + " |\n" for k, v in rows.items()
        )
        + "\n(test split unless the column says search)\n\n"
    )
    out = write_merged(
        soup_recipe(models[0], chosen, name="greedy soup" if greedy else "uniform soup"),
        args.out,
        device=args.device,
        overwrite=args.overwrite,
        card_extra=card,
    )
    console.print(
        score_table("soups (test split; 'search' = search-split score used for the greedy choice)", rows, columns)
    )
    console.print(f"chose {len(chosen)}/{len(models)}: {', '.join(Path(m).name for m in chosen)}\nwrote {out}")
    return 0


# ---- demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """Build or reuse the zoo, evolve a recipe for the composed task, print the paper-style table."""
    import statistics

    given = args.zoo and (Path(args.zoo) / "manifest.json").is_file()
    args.zoo = str(current_zoo(Path(args.zoo)) if given else build_zoo_with_progress(args, args.zoo))
    args.trials = args.trials or (40 if args.small else 200)
    reports = []
    space = Path(args.space or DEFAULT_DEMO_SPACE)
    # a smoke run never blocks the full demo, nor one space's demo another's
    other_space = "" if space.resolve() == DEFAULT_DEMO_SPACE else f"-{space.stem}"
    name = args.name or ("demo-small" if args.small else "demo") + other_space
    for seed in args.seeds:
        run = f"{name}-seed{seed}"
        report = _demo_path_runs(args, space, run, seed) or _demo_parameter_runs(args, space, name, seed)
        reports.append(report)
        _print_report(report, f"seed {seed}: held-out test split")
    if len(reports) > 1:
        rows = {}
        for label in reports[0]["rows"]:
            vals = [r["rows"][label]["fitness"] for r in reports]
            rows[label] = {
                "mean": statistics.mean(vals),
                "stdev": statistics.stdev(vals),
                "min": min(vals),
                "max": max(vals),
            }
        console.print(
            score_table(f"fitness over seeds {args.seeds} (test split)", rows, ["mean", "stdev", "min", "max"])
        )
    return 0


def _unclaimed(cfg: Any) -> Any:
    """The demo's run, renamed (its settings' digest appended) when an earlier demo with other settings — an older
    zoo or evomerge — holds the name: a demo neither refuses to run nor touches that run."""
    import hashlib

    from .search.loop import SearchConfig

    stored = cfg.run_dir() / "config.json"
    if not stored.is_file():
        return cfg
    try:
        if SearchConfig(**json.loads(stored.read_text())).identity() == cfg.identity():
            return cfg
    except (ValueError, TypeError):  # a config an older evomerge wrote: other settings
        pass
    digest = hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True).encode()).hexdigest()[:8]
    say(f"{stored.parent} holds a demo run with other settings, kept as it is; this one is {cfg.name}-{digest}")
    cfg.name = f"{cfg.name}-{digest}"
    return cfg


def _demo_parameter_runs(args: argparse.Namespace, space: Path, name: str, seed: int) -> dict[str, Any]:
    """The report of the space's search, NAME-seedN. For the default space, the global task-arithmetic search (3
    genes, run as NAME-global_task_arithmetic-seedN) first, its evolved row in the same table as `global TA
    search` and the per-layer one's as `PS search`. The global search takes half the trials (3 genes; on the
    demo zoo its best search fitness at 100 trials was within 0.006 of that at 200) and leaves the sources and
    simple merges, which the per-layer run reports, out of its own report."""
    run = f"{name}-seed{seed}"
    if space.resolve() != DEFAULT_DEMO_SPACE:
        return _run_with_progress(_unclaimed(_search_config(args, space, run, seed))).report
    say(f"the 3-gene global task-arithmetic search first, then the per-layer search ({space.stem})")
    cfg = _search_config(args, GLOBAL_DEMO_SPACE, f"{name}-{GLOBAL_DEMO_SPACE.stem}-seed{seed}", seed)
    cfg.trials, cfg.baselines = max(1, args.trials // 2), False
    global_ = _run_with_progress(_unclaimed(cfg)).report
    per_layer = _run_with_progress(_unclaimed(_search_config(args, space, run, seed))).report
    rows = [("global TA search", global_, "evolved"), ("PS search", per_layer, "evolved")]
    return _side_by_side(per_layer, [*rows, ("PS search, best on search", per_layer, "best on search")], seed)


def _side_by_side(common: dict[str, Any], evolved: list[tuple[str, dict[str, Any], str]], seed: int) -> dict[str, Any]:
    """One table of runs over the same tasks and test items: the rows of `common` that every run shares (sources,
    simple merges), then for each (label, report, row) that report's row under the label; every row compared
    with the best source and the best simple merge."""
    from .significance import compare_rows

    shared = [k for k in common["rows"] if k not in ("evolved", "best on search")]
    rows = {k: common["rows"][k] for k in shared}
    per_item = {k: common["per_item"][k] for k in shared}
    for label, report, row in evolved:
        if row in report["rows"]:
            rows[label], per_item[label] = report["rows"][row], report["per_item"][row]
    fitness = {k: r["fitness"] for k, r in rows.items()}
    significance = compare_rows(per_item, fitness, common["weights"], common["references"], seed)
    return {**common, "rows": rows, "per_item": per_item, "significance": significance}


def _demo_path_runs(args: argparse.Namespace, space: Path, run: str, seed: int) -> dict[str, Any] | None:
    """For a layer-path space: the table of its runs side by side. PS+DFS runs three searches, PS (RUN-ps), DFS
    over the sources (RUN-dfs) and DFS over the PS merge and the sources (RUN); the table holds the PS run's rows
    with its evolved recipe as `PS`, then `DFS` and `PS+DFS`. None for a parameter-space space."""
    from .path_space import PathSpace, load_space

    if not isinstance(load_space(space), PathSpace):
        return None
    ps_recipe, ps_report = _ps_stage(args, space, run, seed)
    dfs = _run_with_progress(_search_config(args, space, f"{run}-dfs" if ps_recipe else run, seed)).report
    if ps_recipe is None:
        return dfs
    both = _run_with_progress(_search_config(args, space, run, seed, ps_recipe)).report
    rows = [("DFS", dfs, "evolved"), ("PS+DFS", both, "evolved")]
    if ps_report is None:  # --ps-recipe: no PS run of its own
        return _side_by_side({**both, "rows": {}, "per_item": {}}, rows, seed)
    ps_rows = [("PS", ps_report, "evolved"), ("PS, best on search", ps_report, "best on search")]
    joined = _side_by_side(ps_report, ps_rows + rows, seed)
    return {**both, **{k: joined[k] for k in ("rows", "per_item", "references", "significance")}}


def _add_search_args(p: argparse.ArgumentParser, demo: bool = False) -> None:
    p.add_argument("--space", help=f"search space YAML (see search_spaces/); default: {DEFAULT_DEMO_SPACE.name}")
    p.add_argument("--zoo", help="zoo directory (its manifest gives base, experts and tasks)")
    p.add_argument("--base", help="base model directory")
    p.add_argument("--sources", nargs="+", help="source model directories")
    p.add_argument("--tasks", help="task definitions: a zoo directory or manifest, or a JSON/YAML list of task specs")
    p.add_argument(
        "--task-names",
        nargs="+",
        help="tasks to optimize; default: every task in --tasks, else the zoo's composed task",
    )
    p.add_argument("--optimizer", default="cma", choices=OPTIMIZERS, help="search algorithm")
    p.add_argument(
        "--trials",
        type=int,
        default=None if demo else 100,
        help="stop when this many trials are complete" + (" (default 200; 40 with --small)" if demo else ""),
    )
    p.add_argument("--popsize", type=int, default=None, help="population per generation (cma, optuna-cma, nsga2)")
    p.add_argument("--sigma0", type=float, default=0.2, help="cma: initial step size on the unit cube")
    _add_storage_args(p, "default: sqlite in RUNS_DIR/NAME/")
    p.add_argument("--runs-dir", default="runs", help="where run directories are created")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="dtype of the resident target model")
    p.add_argument("--delta-dtype", default=None, help="keep task vectors in this dtype (bfloat16 halves their memory)")
    p.add_argument(
        "--racing", choices=["bound", "halving"], default=None, help="stop scoring a candidate early (see README)"
    )
    p.add_argument("--subsample", type=int, default=None, help="score this many search examples per task per trial")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    _add_evaluator_args(p)
    p.add_argument(
        "--ps-recipe",
        help="layer-path spaces: a parameter-space recipe whose merge joins the participants (PS+DFS) instead of "
        "running the space's ps: search first",
    )
    p.add_argument(
        "--select-top",
        type=int,
        default=5,
        help="candidates, best on search first, scored on the tasks' select split to choose the run's recipe",
    )
    p.add_argument(
        "--select-every", type=int, default=0, help="also choose every this many trials (default 0: at the end)"
    )
    p.add_argument("--no-baselines", action="store_true", help="leave the simple merges out of the final report")
    p.add_argument("--max-failures", type=int, default=10, help="failed candidates in a row that stop the search")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        help="seconds between a running trial's heartbeats; "
        "a trial silent for 3 heartbeats is taken over by another process",
    )


def _add_evaluator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evaluator",
        default="auto",
        choices=["auto", "native", "lm-eval"],
        help="auto: native batched scoring, lm-eval tasks compiled to it where they can be; lm-eval: every task "
        "through lm-eval (native tasks through generated lm-eval YAML); native: fail where auto would use lm-eval",
    )
    p.add_argument("--include-path", help="folder of lm-eval task YAMLs, for lm-eval tasks that do not name their own")


def _add_storage_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--storage",
        help=f"Optuna storage URL (sqlite:///... or postgresql://...); {default}; "
        "$EVOMERGE_STORAGE is read when neither --storage nor --storage-file is given",
    )
    p.add_argument(
        "--storage-file", help="read the storage URL from this file (keeps a password out of the process list)"
    )


def register(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=formatter)

    p = add("zoo", "the offline demo zoo")
    zsub = p.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")
    b = zsub.add_parser(
        "build", help="build (or reuse) the zoo: base, experts, soup ingredients, tasks", formatter_class=formatter
    )
    b.add_argument("--out", default=None, help="directory; default: ~/.cache/evomerge/zoo-<config hash>")
    b.add_argument("--seed", type=int, default=0, help="seed of the generated world, data and training")
    b.add_argument("--small", action="store_true", help="the smoke zoo: small models, built in about a minute")
    b.add_argument("--overwrite", action="store_true", help="rebuild even if a zoo exists at --out")
    b.set_defaults(func=cmd_zoo_build)
    v = zsub.add_parser(
        "vision",
        help="build (or reuse) the vision zoo: a small ViT, its fine-tunes (soup ingredients), shape tasks with a "
        "shifted test split",
        formatter_class=formatter,
    )
    v.add_argument("--out", default=None, help="directory; default: ~/.cache/evomerge/vision-zoo-<config hash>")
    v.add_argument("--seed", type=int, default=0, help="seed of the generated images and of training")
    v.add_argument("--small", action="store_true", help="a fraction of the training: built in well under a minute")
    v.add_argument("--overwrite", action="store_true", help="rebuild even if a zoo exists at --out")
    v.set_defaults(func=cmd_zoo_vision)

    p = add("eval", "score a model directory on tasks and print a table")
    p.add_argument("model", help="model directory (a hub id only with --hub)")
    p.add_argument("--tasks", required=True, help="a zoo directory/manifest or a task file")
    p.add_argument("--task-names", nargs="+", help="tasks to score; default: all listed")
    p.add_argument("--split", default="test", choices=["search", "select", "test"], help="which split to score")
    _add_evaluator_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="evaluation batch size")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--hub", action="store_true", help="MODEL may be a Hugging Face hub id (downloads it)")
    p.set_defaults(func=cmd_eval)

    p = add("search", "evolve a merge recipe")
    p.add_argument("--name", help="run name; default: the space's file name. The same name resumes the run")
    p.add_argument("--seed", type=int, default=0, help="seed of the optimizer and of subsampling")
    p.add_argument(
        "--mergekit-evolve",
        metavar="CONFIG",
        help="run a mergekit-evolve config (genome and tasks) as this search; its lm-eval tasks are found in "
        "--include-path",
    )
    _add_search_args(p)
    p.set_defaults(func=cmd_search)

    p = add("worker", "evaluate trials of an existing study (several processes/machines)")
    _add_storage_args(p, "required here")
    p.add_argument("--study", required=True, help="study (run) name")
    p.add_argument("--trials", type=int, default=None, help="stop when the study has this many complete trials")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto; default: the study's setting")
    p.set_defaults(func=cmd_worker)

    p = add("report", "print a finished run's held-out table")
    p.add_argument("run_dir", help="the run directory (runs/NAME)")
    p.add_argument(
        "--refresh", action="store_true", help="score the study's current best recipe and rewrite the report"
    )
    _add_storage_args(p, "default: the run's own")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (with --refresh)")
    p.set_defaults(func=cmd_report)

    p = add("soup", "greedy (default) or uniform model soup of fine-tunes of one base")
    p.add_argument("models", nargs="+", help="ingredient model directories")
    p.add_argument("--tasks", required=True, help="task definitions (zoo directory/manifest or task file)")
    p.add_argument("--task-names", nargs="+", help="tasks to score; default: all listed")
    p.add_argument("--out", required=True, help="output model directory (written atomically)")
    p.add_argument("--uniform", action="store_true", help="average all ingredients instead of choosing greedily")
    p.add_argument(
        "--keep-ties",
        action="store_true",
        help="greedy: keep an ingredient when the score ties (>=) instead of strictly improving (>)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", help="dtype of the resident soup")
    p.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    _add_evaluator_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_soup)

    p = add("demo", "build/reuse the zoo, evolve a recipe for the composed task, print the table")
    p.add_argument(
        "--name",
        default=None,
        help="run name prefix; default: demo (demo-small with --small), then -SPACE for a space other than the default",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one search per seed")
    p.add_argument("--zoo-seed", type=int, default=0, help="seed of the zoo build")
    p.add_argument(
        "--small", action="store_true", help="a smoke run: the small zoo and 40 trials (about 2 minutes on 2 cores)"
    )
    _add_search_args(p, demo=True)
    p.set_defaults(func=cmd_demo)
