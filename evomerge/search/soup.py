"""Model soups (Wortsman et al. 2022): uniform (average everything) and greedy.

Greedy: rank ingredients by their search-split score, start from the best, then try each next one in
rank order and keep it only if the soup's search-split score strictly improves (`strict=True`, as the
paper's code does: `if held_out_val_acc > best_val_acc_so_far`); `strict=False` also keeps ties (`>=`).
Every candidate soup is materialized in place by the engine: no disk writes per candidate. By
construction the greedy soup's search-split score is ≥ the best single ingredient's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..engine import Engine
from ..recipe import Recipe


def soup_recipe(reference: str, members: list[str], name: str = "soup") -> Recipe:
    """Uniform average of `members`; `reference` is the engine's base (one of the ingredients)."""
    return Recipe.from_dict(
        {
            "merge_method": "linear",
            "base_model": reference,
            "models": ([] if reference in members else [{"model": reference, "parameters": {"weight": 0.0}}])
            + [{"model": m, "parameters": {"weight": 1.0}} for m in members],
            "name": name,
        }
    )


@dataclass
class SoupResult:
    members: list[str]
    score: float
    ingredient_scores: dict[str, float]
    steps: list[dict] = field(default_factory=list)  # each tried addition: ingredient, score, kept

    def recipe(self, reference: str) -> Recipe:
        return soup_recipe(reference, self.members, name="greedy soup")


def greedy_soup(
    engine: Engine, score: Callable[[Recipe], float], ingredients: list[str], strict: bool = True
) -> SoupResult:
    """`score(recipe)` materializes and returns the search-split fitness; ingredients are model paths."""
    reference = engine.base_path
    single = {m: score(soup_recipe(reference, [m], name=Path(m).name)) for m in ingredients}
    ranked = sorted(ingredients, key=lambda m: -single[m])
    members = [ranked[0]]
    best = single[ranked[0]]
    steps = []
    for m in ranked[1:]:
        s = score(soup_recipe(reference, members + [m]))
        keep = s > best if strict else s >= best
        steps.append({"ingredient": m, "score": s, "kept": keep})
        if keep:
            members.append(m)
            best = s
    return SoupResult(members, best, single, steps)
