"""Is a row of the report really better than the best source? Paired comparisons on the same test items.

Every row of a report is scored on the same test items, so two rows differ item by item. For a row against a
reference row: the difference of their fitness (the tasks' weighted mean) with a paired bootstrap 95% interval
(items resampled within each task, the same resample for both rows), and for tasks scored 0/1 an exact McNemar
p-value (two-sided binomial test on the items where exactly one of the two is right). An interval above zero
says the row beats the reference on items like these, beyond the luck of which items were drawn.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

BOOTSTRAP = 2000
PerItem = dict[str, dict[int, float]]  # task -> item index -> score


def paired(row: PerItem, ref: PerItem, weights: dict[str, float], seed: int = 0) -> dict[str, Any]:
    """Fitness difference row − ref on the items both were scored on, its bootstrap 95% interval, McNemar's p."""
    tasks = [t for t in weights if t in row and t in ref and weights[t] > 0]
    total = sum(weights[t] for t in tasks)
    rng = np.random.default_rng(seed)
    diff, boot = 0.0, np.zeros(BOOTSTRAP)
    right_wrong = wrong_right = 0
    binary = True
    n = 0
    for t in tasks:
        items = sorted(set(row[t]) & set(ref[t]))
        a = np.array([row[t][i] for i in items], dtype=float)
        b = np.array([ref[t][i] for i in items], dtype=float)
        d = a - b
        w = weights[t] / total
        diff += w * float(d.mean())
        boot += w * d[rng.integers(0, len(d), size=(BOOTSTRAP, len(d)))].mean(axis=1)
        binary = binary and bool(np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all())
        right_wrong += int(((a == 1) & (b == 0)).sum())
        wrong_right += int(((a == 0) & (b == 1)).sum())
        n += len(items)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "diff": diff,
        "low": float(low),
        "high": float(high),
        "mcnemar_p": mcnemar_exact(right_wrong, wrong_right) if binary else None,
        "n": n,
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: under no difference, the b + c discordant items split as Binomial(b + c, ½)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def compare_rows(
    per_item: dict[str, PerItem],
    fitness: dict[str, float],
    weights: dict[str, float],
    references: dict[str, list[str]],
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """For each reference kind (e.g. "best source": the source rows), the row of that kind with the highest test
    fitness (the strongest competitor), and every other row compared with it: {kind: {"ref": label, rows...}}."""
    out: dict[str, dict[str, Any]] = {}
    for kind, labels in references.items():
        labels = [x for x in labels if x in per_item]
        if not labels:
            continue
        best = max(labels, key=lambda x: fitness[x])
        out[kind] = {
            "ref": best,
            "rows": {
                label: paired(items, per_item[best], weights, seed)
                for label, items in per_item.items()
                if label != best
            },
        }
    return out


def short(result: dict[str, Any] | None) -> str:
    """`+0.021 [+0.004, +0.038] p=0.02` (p for 0/1 tasks only)."""
    if result is None:
        return "—"
    p = result.get("mcnemar_p")
    text = f"{result['diff']:+.3f} [{result['low']:+.3f}, {result['high']:+.3f}]"
    return text + (f" p={p:.2g}" if p is not None else "")
