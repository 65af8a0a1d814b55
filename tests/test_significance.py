"""Paired comparisons of report rows on the same test items."""

import random

import pytest

from evomerge.significance import compare_rows, mcnemar_exact, paired, short


def test_mcnemar_exact_is_the_two_sided_binomial_test_on_discordant_items():
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(3, 7) == pytest.approx(2 * (1 + 10 + 45 + 120) / 1024)  # 0.34375
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0


def test_a_clear_gain_has_an_interval_above_zero_and_a_tie_straddles_it():
    rng = random.Random(0)
    ref = {i: float(rng.random() < 0.4) for i in range(1000)}
    better = {i: 1.0 if i < 80 else v for i, v in ref.items()}  # right on up to 80 more items
    gain = sum(better.values()) / 1000 - sum(ref.values()) / 1000
    r = paired({"t": better}, {"t": ref}, {"t": 1.0})
    assert r["diff"] == pytest.approx(gain) and 0 < r["low"] < gain < r["high"]
    assert r["mcnemar_p"] < 1e-6 and r["n"] == 1000
    shuffled = dict(zip(ref, rng.sample(list(ref.values()), len(ref))))  # same accuracy, other items
    tie = paired({"t": shuffled}, {"t": ref}, {"t": 1.0})
    assert tie["low"] < 0 < tie["high"] and tie["mcnemar_p"] > 0.05


def test_tasks_combine_by_their_weights_and_graded_scores_get_no_mcnemar():
    row = {"a": {0: 1.0, 1: 1.0}, "b": {0: 0.5, 1: 0.5}}
    ref = {"a": {0: 0.0, 1: 1.0}, "b": {0: 0.5, 1: 0.25}}
    r = paired(row, ref, {"a": 3.0, "b": 1.0})
    assert r["diff"] == pytest.approx(0.75 * 0.5 + 0.25 * 0.125)
    assert r["mcnemar_p"] is None


def test_rows_are_compared_with_the_strongest_reference_of_each_kind():
    items = {"s1": {"t": {0: 0.0, 1: 0.0}}, "s2": {"t": {0: 1.0, 1: 0.0}}, "evolved": {"t": {0: 1.0, 1: 1.0}}}
    fitness = {"s1": 0.0, "s2": 0.5, "evolved": 1.0}
    out = compare_rows(items, fitness, {"t": 1.0}, {"best source": ["s1", "s2"], "absent": ["x"]})
    assert list(out) == ["best source"] and out["best source"]["ref"] == "s2"
    assert set(out["best source"]["rows"]) == {"s1", "evolved"}
    assert short(out["best source"]["rows"]["evolved"]).startswith("+0.500 [") and short(None) == "—"
