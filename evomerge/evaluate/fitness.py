"""Fitness: a weighted sum of task metrics on the search split, with optional per-call subsampling and
racing (score a candidate on a small subset first; stop when it can no longer beat the best so far).

Racing modes:
- "bound": exact. After scoring part of each task, the best the candidate could still reach (every
  unscored example correct) is computed; if that is below the best fitness, it stops. Never wrong. It is
  checked after every round of batches the evaluator runs at once (`granularity` items of each task), not
  only at the rungs, so a candidate stops at the batch where it falls behind.
- "halving": successive halving. At each rung the candidate must score at least the best candidate's
  score on the same examples (minus `tolerance`) to go on. Faster, can drop a late bloomer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .evaluator import Evaluator


def weighted_mean(scores: dict[str, float], weights: dict[str, float]) -> float:
    """The fitness of per-task scores: their mean weighted by task weight (tasks without a score skipped)."""
    total = sum(weights.get(k, 0.0) for k in scores)
    return sum(weights.get(k, 0.0) * v for k, v in scores.items()) / total if total else 0.0


@dataclass
class FitnessResult:
    value: float  # weighted score (on the examples scored; an upper bound when pruned under "bound")
    scores: dict[str, float]
    n_examples: int
    pruned: bool = False
    rung: int = 0  # index of the last rung scored
    per_rung: list[float] = field(default_factory=list)


class Fitness:
    def __init__(
        self,
        evaluator: "Evaluator",  # anything with .tasks and .evaluate(subset) -> EvalResult
        weights: dict[str, float] | None = None,
        subsample: int | None = None,
        racing: str | None = None,
        rungs: Sequence[float] = (0.25, 0.5, 1.0),
        tolerance: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.evaluator = evaluator
        self.sizes = {t.name: len(t.items) for t in evaluator.tasks}
        self.weights = weights or {t.name: t.spec.weight for t in evaluator.tasks}
        unknown = set(self.weights) - set(self.sizes)
        if unknown:
            raise ValueError(f"fitness weights name unknown task(s) {sorted(unknown)}; tasks: {sorted(self.sizes)}")
        if racing not in (None, "bound", "halving"):
            raise ValueError(f"racing must be None, 'bound' or 'halving', got {racing!r}")
        self.subsample = subsample
        self.racing = racing
        self.rungs = sorted(rungs) if racing else [1.0]
        if self.rungs[-1] != 1.0:
            self.rungs.append(1.0)
        self.tolerance = tolerance
        self.seed = seed
        rng = random.Random(seed)
        self.order = {}
        for name, n in self.sizes.items():
            idx = list(range(n))
            rng.shuffle(idx)
            self.order[name] = idx
        self.best: float = float("-inf")
        self.best_rungs: list[float] = []
        self.granularity = getattr(evaluator, "granularity", None)  # items a round of batches scores

    def combine(self, scores: dict[str, float]) -> float:
        return weighted_mean(scores, self.weights)

    def _pool(self, call: int) -> dict[str, list[int]]:
        """Examples this call may score, in rung order: all (fixed order) or a seeded subsample."""
        if not self.subsample:
            return self.order
        rng = random.Random(self.seed * 1_000_003 + call)
        return {name: rng.sample(range(n), min(n, self.subsample)) for name, n in self.sizes.items()}

    def __call__(self, call: int = 0) -> FitnessResult:
        pool = self._pool(call)
        correct: dict[str, dict[int, float]] = {name: {} for name in pool}
        per_rung: list[float] = []
        last = 0
        for r, frac in enumerate(self.rungs):
            subset = {}
            for name, idx in pool.items():
                upto = max(1, round(frac * len(idx))) if frac < 1.0 else len(idx)
                subset[name] = idx[len(correct[name]) : upto]
            for part in self._rounds(subset):
                res = self.evaluator.evaluate(part)
                for name, items in res.per_item.items():
                    correct[name].update(items)
                if self.racing == "bound" and self.best > float("-inf"):
                    bound = self.combine(
                        {
                            name: (sum(c.values()) + len(pool[name]) - len(c)) / len(pool[name])
                            for name, c in correct.items()
                        }
                    )
                    if bound < self.best and _scored(correct) < sum(map(len, pool.values())):
                        return self._finish(FitnessResult(bound, _means(correct), _scored(correct), True, r, per_rung))
            scores = _means(correct)
            value = self.combine(scores)
            per_rung.append(value)
            last = r
            if frac >= 1.0 or self.best == float("-inf"):
                continue
            if self.racing == "halving" and r < len(self.best_rungs) and value < self.best_rungs[r] - self.tolerance:
                return self._finish(FitnessResult(value, scores, _scored(correct), True, r, per_rung))
        scores = _means(correct)
        return self._finish(FitnessResult(self.combine(scores), scores, _scored(correct), False, last, per_rung))

    def _rounds(self, subset: dict[str, list[int]]):
        """The subset in the evaluator's rounds of batches (bound racing checks between them), else whole."""
        subset = {k: v for k, v in subset.items() if v}
        step = self.granularity if self.racing == "bound" and self.granularity else None
        if not step or not subset:
            yield subset
            return
        for s in range(0, max(map(len, subset.values())), step):
            part = {k: v[s : s + step] for k, v in subset.items() if v[s : s + step]}
            if part:
                yield part

    def _finish(self, result: FitnessResult) -> FitnessResult:
        if not result.pruned and result.value > self.best:
            self.best = result.value
            self.best_rungs = list(result.per_rung)
        return result

    def observe_best(self, value: float, per_rung: Sequence[float] = ()) -> None:
        """Seed the racing bar from earlier trials (e.g. when a search resumes)."""
        if value > self.best:
            self.best = value
            self.best_rungs = list(per_rung)


def _means(correct: dict[str, dict[int, float]]) -> dict[str, float]:
    """Each task's mean score over the items scored so far (tasks with none left out)."""
    return {name: sum(c.values()) / len(c) for name, c in correct.items() if c}


def _scored(correct: dict[str, dict[int, float]]) -> int:
    return sum(map(len, correct.values()))
