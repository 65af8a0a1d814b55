"""What a search's candidates run on: resident models, one model that each candidate is installed into, and the
search-split evaluator bound to it. `Session` installs parameter-space recipes (merged in place by the engine);
`PathSession` installs layer paths over resident participants (no weights copied)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

from ..engine import Engine
from ..evaluate.evaluator import Evaluator
from ..evaluate.fitness import Fitness
from ..evaluate.heads import load_processor
from ..evaluate.tasks import has_select, load_task, searching, selecting
from ..layer_path import LayerPaths, PathRecipe, load_participants
from ..methods.fused import expect_candidates
from ..path_fold import path_to_mergekit
from ..recipe import Recipe

if TYPE_CHECKING:
    from .loop import SearchConfig

log = logging.getLogger(__name__)


class _Scoring:
    """The tasks of a run, their search parts, the evaluator bound to `self.model` and the fitness."""

    model: Any
    tokenizer: Any
    decoder: str | None = None  # the generation KV cache (evaluate/decoding.py); None: the device's default

    def _prepare_scoring(self, cfg: "SearchConfig") -> None:
        self.cfg = cfg
        self.specs = cfg.task_specs()
        with searching():
            self.tasks = [load_task(s, "search") for s in self.specs]
        self.evaluator = Evaluator(self.model, self.tokenizer, self.tasks, cfg.batch_size, cfg.evaluator, self.decoder)
        self.fitness = Fitness(
            self.evaluator,
            {s.name: s.weight for s in self.specs},
            subsample=cfg.subsample,
            racing=cfg.racing,
            seed=cfg.seed,
        )

    @functools.cached_property
    def select_scorer(self) -> tuple[Evaluator, dict[str, float]] | None:
        """The evaluator over the tasks' select parts, with their weights (built on first use: most trials never
        need it); None when no task has a select part."""
        specs = [s for s in self.specs if has_select(s)]
        if not specs:
            return None
        missing = [s.name for s in self.specs if not has_select(s)]
        if missing:
            log.warning("task(s) %s have no select split; the selection scores %s", missing, [s.name for s in specs])
        with selecting():
            tasks = [load_task(s, "select") for s in specs]
        evaluator = Evaluator(self.model, self.tokenizer, tasks, self.cfg.batch_size, self.cfg.evaluator, self.decoder)
        return evaluator, {s.name: s.weight for s in specs}

    def score(self, recipe: Any, call: int):
        self.install(recipe)
        return self.fitness(call)

    def install(self, recipe: Any) -> None:
        raise NotImplementedError


class Session(_Scoring):
    """Resident engine + target model + search-split evaluator for one parameter-space run."""

    def __init__(self, cfg: "SearchConfig") -> None:
        self.engine = Engine(cfg.base, cfg.sources, device=cfg.device, dtype=cfg.dtype, delta_dtype=cfg.delta_dtype)
        expect_candidates(cfg.trials)
        self.model = self.engine.load_target_model()
        self.target = self.engine.bind(self.model)
        self.tokenizer = load_processor(cfg.base, self.engine.head)
        self.space = cfg.search_space().bind(cfg.base, cfg.sources, self.engine.layout, source_names=cfg.source_names)
        self._prepare_scoring(cfg)

    def install(self, recipe: Recipe) -> None:
        self.engine.materialize(recipe, self.target)

    def references(self) -> dict[str, Recipe]:
        """What the final report scores next to the evolved recipe: the base, each source, the simple merges."""
        cfg = self.cfg

        def weights(ws: list[float]) -> Recipe:
            return Recipe.from_dict(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": cfg.base,
                    "models": [{"model": s, "parameters": {"weight": w}} for s, w in zip(cfg.sources, ws)],
                }
            )

        rows = {"base": weights([0.0] * len(cfg.sources))}
        for i, name in enumerate(self.space.source_names):
            rows[name] = weights([1.0 if j == i else 0.0 for j in range(len(cfg.sources))])
        if cfg.baselines:
            rows.update(baseline_recipes(cfg.base, cfg.sources))
        return rows

    def mergekit_config(self, recipe: Recipe) -> dict[str, Any]:
        return recipe.to_mergekit()

    def reference_kinds(self) -> dict[str, list[str]]:
        """The rows each row is compared with in the report (the best of each kind, on the test split)."""
        kinds = {"best source": list(self.space.source_names)}
        if self.cfg.baselines:
            kinds["best simple merge"] = list(baseline_recipes(self.cfg.base, self.cfg.sources))
        return kinds


class PathSession(_Scoring):
    """Resident participants + one host model whose layer list each candidate path replaces."""

    decoder = "dynamic"  # a static cache has the slots of one layer list; a compiled step, the graph of one

    def __init__(self, cfg: "SearchConfig") -> None:
        from transformers import AutoTokenizer

        space = cfg.search_space()
        e = space.embed_model
        self.labels = [p.label for p in space.participants]
        start = PathRecipe(models=space.participants, layer_path=[{"model": e, "layer": 0}], embed_model=e)
        self.models = load_participants(start, cfg.device, cfg.dtype)
        self.paths = LayerPaths(self.models, self.labels, e)
        self.model = self.paths.use(self.paths.identity(e))
        self.tokenizer = AutoTokenizer.from_pretrained(space.participants[e].directory())
        self.space = space.bind(self.paths.num_layers)
        self._measured: dict[int, dict[int, list[str]]] = {}  # residual writers per participant, once
        self._prepare_scoring(cfg)

    def install(self, recipe: PathRecipe) -> None:
        self.paths.use(recipe.steps())

    def references(self) -> dict[str, PathRecipe]:
        """Each participant alone (its own layers in order)."""
        models = self.space.space.participants
        return {
            label: PathRecipe(
                models=models,
                layer_path=[{"model": p, "layer": i, "scale": s} for p, i, s in self.paths.identity(k)],
                embed_model=k,
            )
            for k, label in enumerate(self.labels)
        }

    def reference_kinds(self) -> dict[str, list[str]]:
        participants = self.space.space.participants
        return {"best source": [p.label for p in participants if p.model is not None]}

    def mergekit_config(self, recipe: PathRecipe) -> dict[str, Any]:
        return path_to_mergekit(recipe, self.models, self._measured)


def make_session(cfg: "SearchConfig") -> Session | PathSession:
    from ..path_space import PathSpace

    return PathSession(cfg) if isinstance(cfg.search_space(), PathSpace) else Session(cfg)


def baseline_recipes(base: str, sources: list[str]) -> dict[str, Recipe]:
    """Simple merges at default settings (documented in the README): uniform soup, task arithmetic
    (every task vector at weight 1), TIES and DARE-TIES (weight 1, density 0.5)."""

    def r(method: str, params: dict[str, float], extra: dict | None = None) -> Recipe:
        left_out = [{"model": base, "parameters": {"weight": 0.0}}] if method == "linear" else []  # sources only
        return Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": base,
                "models": left_out + [{"model": s, "parameters": dict(params)} for s in sources],
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
