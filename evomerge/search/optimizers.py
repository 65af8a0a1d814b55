"""Optimizers behind one ask/tell interface, every candidate an Optuna trial in one study.

- `cma`: pycma's CMA-ES on the unit cube (genes scaled to [0, 1]). Its state is pickled after every ask
  and tell, so a killed run resumes inside a generation: candidates of that generation that already
  finished are read back from the study, not evaluated again. Single process.
- `tpe`, `optuna-cma`, `nsga2`, `random`: Optuna samplers. The study (SQLite or any RDB URL) is the
  state, so several `evomerge worker` processes can share one study.
- `greedy-soup`: Wortsman et al.'s greedy soup as ask/tell over a global linear space: each source alone,
  then each next-best source added if the score strictly improves. Its state is replayed from the study.
"""

from __future__ import annotations

import os
import pickle
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution

from ..space import BoundSpace
from . import OPTIMIZERS

FAILED_FITNESS = -1e9  # what cma is told for a candidate that could not be merged or scored


@dataclass
class Candidate:
    trial: optuna.trial.Trial
    params: dict[str, Any]
    cached_values: list[float] | None = None  # already finished before a resume (cma only)
    attrs: dict[str, Any] = field(default_factory=dict)
    # complete trials when it was asked: seeds the candidate's subsample, and is the same for a candidate
    # evaluated again after a kill (its trial number is not), so a resumed run reproduces an uninterrupted one
    position: int = 0


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def settled(study: optuna.Study) -> tuple[int, int]:
    """(complete trials, FAIL trials whose candidate failed): abandoned ones (a killed process's) do not count,
    since their candidates are evaluated again."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL))
    complete = sum(1 for t in trials if t.state == optuna.trial.TrialState.COMPLETE)
    reasons = [t.user_attrs.get("fail_reason", "abandoned") for t in trials if t.state == optuna.trial.TrialState.FAIL]
    return complete, sum(1 for r in reasons if not r.startswith("abandoned"))


def sampler_seed(seed: int, position: int, stream: str = "") -> int:
    """The Optuna sampler is rebuilt for every candidate with this seed: its proposal depends only on the run
    seed, the complete trials and (for workers) the process, not on how often the process restarted."""
    return zlib.crc32(f"{seed}:{position}:{stream}".encode())


def distributions(space: BoundSpace) -> dict[str, Any]:
    return {
        g.name: CategoricalDistribution(list(g.choices)) if g.choices else FloatDistribution(g.low, g.high, log=g.log)
        for g in space.genes
    }


def make_sampler(name: str, seed: int, space: BoundSpace, popsize: int | None = None) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(4, space.dim)))
    if name == "optuna-cma":
        return optuna.samplers.CmaEsSampler(seed=seed, popsize=popsize, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=popsize or 20)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


class OptunaOptimizer:
    def __init__(
        self, study: optuna.Study, space: BoundSpace, sampler_for: Callable[[int], optuna.samplers.BaseSampler]
    ) -> None:
        self.study = study
        self.space = space
        self.dists = distributions(space)
        self.sampler_for = sampler_for

    def ask(self) -> Candidate:
        position, failed = settled(self.study)
        # a failed candidate moves the seed on, or the same proposal would come back forever
        self.study.sampler = self.sampler_for(position + failed)
        trial = self.study.ask(self.dists)
        return Candidate(trial, {g.name: trial.params[g.name] for g in self.space.genes}, position=position)

    def tell(self, cand: Candidate, values: list[float]) -> None:
        self.study.tell(cand.trial, values if len(values) > 1 else values[0])

    def fail(self, cand: Candidate) -> None:
        self.study.tell(cand.trial, state=optuna.trial.TrialState.FAIL)

    def finish(self) -> None:
        pass


class CMAOptimizer:
    """pycma ask/tell; candidates are enqueued into the study so each one is a normal trial."""

    def __init__(
        self,
        study: optuna.Study,
        space: BoundSpace,
        state_path: Path,
        seed: int = 0,
        sigma0: float = 0.2,
        popsize: int | None = None,
        x0: list[float] | None = None,
        start_first: bool = False,
    ) -> None:
        """`start_first`: the first candidate is the start point itself (CMA-ES otherwise only samples around it);
        a layer-path search starts from a model worth scoring, e.g. the PS merge."""
        import cma

        self.study = study
        self.space = space
        self.dists = distributions(space)
        self.state_path = Path(state_path)
        self.pending: list[tuple[int, list[float]]] = []
        # a kill between enqueue and ask leaves a WAITING trial; fail it so no later ask picks it up
        for _ in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
        if self.state_path.is_file():
            with open(self.state_path, "rb") as fh:
                state = pickle.load(fh)
            self.es, self.generation, self.solutions, self.values = (
                state["es"],
                state["generation"],
                state["solutions"],
                state["values"],
            )
        else:
            opts = {"seed": seed + 1, "bounds": [0.0, 1.0], "verbose": -9}
            if popsize:
                opts["popsize"] = popsize
            start = x0 if x0 is not None else space.to_unit(space.initial())
            self.es = cma.CMAEvolutionStrategy(start, sigma0, opts)
            if start_first:
                self.es.inject([start], force=True)
            self.generation, self.solutions, self.values = 0, None, {}

    def _save(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + f".tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            pickle.dump(
                {"es": self.es, "generation": self.generation, "solutions": self.solutions, "values": self.values}, fh
            )
        os.replace(tmp, self.state_path)

    def _finished(self) -> dict[int, list[float]]:
        done = {}
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.user_attrs.get("cma_generation") == self.generation:
                done[t.user_attrs["cma_index"]] = list(t.values)
        return done

    def ask(self) -> Candidate:
        if self.solutions is None:
            self.solutions = [list(map(float, x)) for x in self.es.ask()]
            self.values = {}
            self._save()
        done = self._finished()
        self.values.update(done)
        for idx, x in enumerate(self.solutions):
            if idx in self.values or idx in [i for i, _ in self.pending]:
                continue
            params = self.space.from_unit(x)
            self.study.enqueue_trial(
                params, user_attrs={"cma_generation": self.generation, "cma_index": idx}, skip_if_exists=False
            )
            trial = self.study.ask(self.dists)
            if trial.user_attrs.get("cma_index") != idx or trial.user_attrs.get("cma_generation") != self.generation:
                raise RuntimeError(
                    f"study {self.study.study_name}: asked trial {trial.number} is not the enqueued CMA candidate "
                    f"{self.generation}/{idx}"
                )
            self.pending.append((idx, x))
            attrs = {"cma_generation": self.generation, "cma_index": idx}
            return Candidate(trial, params, attrs=attrs, position=len(completed(self.study)))
        raise RuntimeError("internal: no CMA candidate left to ask in this generation")

    def tell(self, cand: Candidate, values: list[float]) -> None:
        self.study.tell(cand.trial, values[0])
        self._record(cand, values)

    def fail(self, cand: Candidate) -> None:
        """A failed candidate is the worst of its generation for CMA-ES (ranks are all it uses)."""
        self.study.tell(cand.trial, state=optuna.trial.TrialState.FAIL)
        self._record(cand, [FAILED_FITNESS])

    def _record(self, cand: Candidate, values: list[float]) -> None:
        idx = cand.attrs["cma_index"]
        self.pending = [(i, x) for i, x in self.pending if i != idx]
        self.values[idx] = values
        if len(self.values) == len(self.solutions):
            # cma minimizes; our fitness is maximized. From its second generation pycma 4 injects a solution of
            # its own; with bounds it does not recognise it among the solutions told back (its archive grows, as
            # a plain ask/tell loop with bounds shows), and warns of an "orphanated injected solution" about its
            # own bookkeeping, not about this call order
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="orphanated injected solution")
                self.es.tell(self.solutions, [-self.values[i][0] for i in range(len(self.solutions))])
            self.generation += 1
            self.solutions, self.values = None, {}
        self._save()

    def finish(self) -> None:
        self._save()


class GreedySoupOptimizer:
    """Greedy soup over the sources of a `linear`, `granularity: global` space (weights 0/1).

    Trials 0..n−1 score each source alone; then sources are tried in rank order, each kept if the soup's
    fitness strictly improves. The chosen members are `members()`; search their coefficients next with
    another space and `--sources` set to them. Stops asking after n + (n − 1) trials."""

    def __init__(self, study: optuna.Study, space: BoundSpace) -> None:
        s = space.space
        if s.method != "linear" or s.granularity != "global" or set(s.genes) != {"weight"}:
            raise ValueError(
                "greedy-soup needs a space with method: linear, granularity: global and only a weight gene"
            )
        self.study = study
        self.space = space
        self.dists = distributions(space)
        self.names = space.source_names
        self.total = 2 * len(self.names) - 1

    def _params(self, members: list[str]) -> dict[str, float]:
        return {f"weight[{n}]@all": (1.0 if n in members else 0.0) for n in self.names}

    def _history(self) -> list[tuple[list[str], float]]:
        done = sorted(
            self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number
        )
        return [
            ([n for n in self.names if t.params.get(f"weight[{n}]@all", 0.0) > 0.5], t.values[0])
            for t in done
            if "soup_step" in t.user_attrs
        ]

    def plan(self) -> tuple[list[str] | None, list[str]]:
        """(next members to score or None when finished, current members)."""
        hist = self._history()
        singles = {m[0]: v for m, v in hist[: len(self.names)]}
        if len(hist) < len(self.names):
            return [self.names[len(hist)]], []
        ranked = sorted(self.names, key=lambda n: (-singles[n], self.names.index(n)))
        members, best = [ranked[0]], singles[ranked[0]]
        for m, v in hist[len(self.names) :]:
            if v > best:
                members, best = m, v
        tried = len(hist) - len(self.names)
        if tried >= len(ranked) - 1:
            return None, members
        return members + [ranked[1 + tried]], members

    def members(self) -> list[str]:
        return self.plan()[1]

    def ask(self) -> Candidate:
        nxt, _ = self.plan()
        if nxt is None:
            raise StopIteration
        params = self._params(nxt)
        self.study.enqueue_trial(params, user_attrs={"soup_step": len(self._history())}, skip_if_exists=False)
        trial = self.study.ask(self.dists)
        return Candidate(trial, params, position=len(completed(self.study)))

    def tell(self, cand: Candidate, values: list[float]) -> None:
        self.study.tell(cand.trial, values[0])

    def fail(self, cand: Candidate) -> None:
        self.study.tell(cand.trial, state=optuna.trial.TrialState.FAIL)

    def finish(self) -> None:
        pass
