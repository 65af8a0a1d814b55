"""Choosing the run's recipe: the best candidates on the search split, scored again on the select split.

Hundreds of candidates ranked on one search split overfit it: the top one is partly the luckiest. The K best
trials by search fitness (fully scored, one per distinct candidate) are scored on the tasks' select parts, data
no trial ever saw, and the best there becomes the run's recipe (ties: the better search fitness, then the earlier
trial). Select scores are stored in the study, so a candidate is scored on select once, across checkpoints
(`select_every`) and resumes. Without a select split the run's recipe is the best on search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna

from ..evaluate.fitness import weighted_mean
from .optimizers import completed

if TYPE_CHECKING:
    from .loop import SearchConfig
    from .session import PathSession, Session

log = logging.getLogger(__name__)


@dataclass
class Selection:
    chosen: optuna.trial.FrozenTrial  # the run's recipe
    best_on_search: optuna.trial.FrozenTrial
    candidates: list[dict[str, Any]] = field(default_factory=list)  # {trial, search, select}, best on search first

    @property
    def select_fitness(self) -> float | None:
        """The chosen candidate's fitness on the select split (None without one)."""
        return next((c["select"] for c in self.candidates if c["trial"] == self.chosen.number), None)

    def summary(self) -> dict[str, Any]:
        return {"chosen": self.chosen.number, "best_on_search": self.best_on_search.number, "top": self.candidates}


def ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Fully scored candidates, best search fitness first (earlier trial first on ties), one trial per candidate."""
    done = [
        t
        for t in completed(study)
        if "fitness" in t.user_attrs and not t.user_attrs.get("pruned") and "duplicate_of" not in t.user_attrs
    ]
    return sorted(done, key=lambda t: (-t.user_attrs["fitness"], t.number))


SELECT_KEY = "select:"  # study user attribute per trial scored on select (a finished trial cannot take attributes)


def select_scores(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """trial number -> {fitness, scores} on the select split, for the trials scored there."""
    return {int(k[len(SELECT_KEY) :]): v for k, v in study.user_attrs.items() if k.startswith(SELECT_KEY)}


def select(
    cfg: "SearchConfig", study: optuna.Study, session: "Session | PathSession", say=log.info
) -> Selection | None:
    """Score the top `cfg.select_top` candidates on select (those not scored before) and choose; None when no
    trial is complete. Without select tasks the best on search is chosen."""
    top = ranked(study)[: cfg.select_top]  # validated ≥ 1
    if not top:
        return None
    scorer = session.select_scorer
    if scorer is None:
        return Selection(top[0], top[0])
    evaluator, weights = scorer
    scored = select_scores(study)
    fresh = [t for t in top if t.number not in scored]
    if fresh:
        say(f"scoring the top {len(fresh)} candidate(s) on the select split")
    for t in fresh:
        session.install(session.space.decode(t.params, name=f"{cfg.name}-trial{t.number}"))
        scores = evaluator.evaluate().scores
        scored[t.number] = {"fitness": weighted_mean(scores, weights), "scores": scores}
        study.set_user_attr(f"{SELECT_KEY}{t.number}", scored[t.number])
    chosen = max(top, key=lambda t: (scored[t.number]["fitness"], t.user_attrs["fitness"], -t.number))
    candidates = [
        {"trial": t.number, "search": t.user_attrs["fitness"], "select": scored[t.number]["fitness"]} for t in top
    ]
    return Selection(chosen, top[0], candidates)
