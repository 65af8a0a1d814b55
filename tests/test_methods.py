import math

import pytest
import torch

from evomerge.methods import METHODS, MethodError, merge_deltas, merge_tensors
from evomerge.methods.sparsify import magnitude, magnitude_outliers

EVERY_METHOD = list(METHODS)


def example(method: str) -> tuple[int, list[dict], dict]:
    """(sources, per-source parameters, merge-wide parameters) that `method` accepts and that change the base."""
    spec = METHODS[method]
    n = 1 if spec.max_sources == 1 else 2
    given = {"weight": 0.6} if method in ("linear", "task_arithmetic") else {"weight": 0.6, "density": 0.5}
    per_source = {k: v for k, v in {**given, "epsilon": 0.1}.items() if k in spec.source_params}
    merge_wide = {"slerp": {"t": 0.3}, "nearswap": {"t": 0.05}, "sce": {"select_topk": 0.5}}.get(method, {})
    return n, [dict(per_source) for _ in range(n)], merge_wide


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_task_arithmetic_negative_weight_negates_the_task_vector():
    base = t(1.0, 1.0, 1.0)
    a = t(2.0, 1.0, 0.0)  # δ = (1, 0, -1)
    out = merge_tensors("task_arithmetic", [a], [{"weight": -1.0}], base=base)
    assert torch.equal(out, t(0.0, 1.0, 2.0))


def test_task_arithmetic_lambda_scales_the_summed_change():
    base = torch.zeros(3)
    out = merge_tensors(
        "task_arithmetic", [t(1, 2, 3), t(1, 0, 0)], [{"weight": 1.0}, {"weight": 2.0}], {"lambda": 0.5}, base=base
    )
    assert torch.allclose(out, t(1.5, 1.0, 1.5))


def test_ties_keeps_only_majority_sign():
    base = torch.zeros(4)
    d1 = t(1.0, -2.0, 3.0, 0.0)
    d2 = t(-3.0, -1.0, 1.0, 0.0)
    out = merge_tensors("ties", [d1, d2], [{"weight": 1.0, "density": 1.0}] * 2, base=base)
    # elem0: sum -2 → negative elected → only d2 (-3), divisor 1; elem1: both negative → (-2-1)/2
    # elem2: both positive → (3+1)/2; elem3: all zero → 0
    assert torch.allclose(out, t(-3.0, -1.5, 2.0, 0.0))


def test_ties_without_normalize_sums_agreeing_contributions():
    base = torch.zeros(2)
    out = merge_tensors(
        "ties", [t(1.0, -1.0), t(2.0, 3.0)], [{"weight": 1.0, "density": 1.0}] * 2, {"normalize": False}, base=base
    )
    assert torch.allclose(out, t(3.0, 3.0))


def test_ties_trims_to_exactly_density_of_entries():
    delta = torch.arange(1, 11, dtype=torch.float32) * torch.tensor([1, -1] * 5)
    kept = magnitude(delta, 0.3)
    assert int((kept != 0).sum()) == 3
    assert set(kept.abs()[kept != 0].tolist()) == {8.0, 9.0, 10.0}


def test_magnitude_trim_with_ties_keeps_exactly_k():
    kept = magnitude(torch.ones(10), 0.4)
    assert int((kept != 0).sum()) == 4


def test_dare_rescale_l1_preserves_l1_norm_and_inverse_density_scales():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(10_000, generator=g)
    base = torch.zeros_like(delta)
    kept = merge_deltas("dare_linear", base, [delta], [{"weight": 1.0, "density": 0.3}], seed=1, key="k")
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)
    kept2 = merge_deltas(
        "dare_linear",
        base,
        [delta],
        [{"weight": 1.0, "density": 0.3}],
        {"rescale_mode": "inverse_density"},
        seed=1,
        key="k",
    )
    nz = kept2 != 0
    assert torch.allclose(kept2[nz], delta[nz] / 0.3, rtol=1e-4)  # 1/P(keep), P on DARE's 2⁻¹⁴ density grid
    assert 0.28 < nz.float().mean().item() < 0.32
    assert torch.equal(nz, kept != 0)  # same seed, same mask


def test_dare_is_reproducible_for_a_seed_and_differs_across_seeds():
    base = torch.zeros(1000)
    deltas = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    p = [{"weight": 0.5, "density": 0.5}] * 2
    a = merge_deltas("dare_ties", base, deltas, p, seed=3, key="w")
    b = merge_deltas("dare_ties", base, deltas, p, seed=3, key="w")
    c = merge_deltas("dare_ties", base, deltas, p, seed=4, key="w")
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_breadcrumbs_drops_top_outliers_and_smallest():
    delta = torch.arange(1, 21, dtype=torch.float32)  # 20 entries
    kept = magnitude_outliers(delta, density=0.5, gamma=0.1)  # keep 10: drop top 2 and bottom 8
    assert (kept != 0).nonzero().view(-1).tolist() == list(range(8, 18))


def test_breadcrumbs_with_no_outliers_to_drop_keeps_the_largest():
    # gamma·n < 1: no outlier to drop; mergekit 0.1.5 keeps indices[n_bot : n_bot + k] of the ascending sort too
    kept = magnitude_outliers(torch.arange(1, 11, dtype=torch.float32), density=0.5, gamma=0.01)
    assert (kept != 0).nonzero().view(-1).tolist() == [5, 6, 7, 8, 9]


def test_della_keeps_larger_entries_more_often():
    delta = torch.linspace(0.01, 1.0, 1000).repeat(50, 1)
    base = torch.zeros_like(delta)
    out = merge_deltas(
        "della_linear",
        base,
        [delta],
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}],
        {"rescale": False},
        seed=0,
        key="x",
    )
    keep = (out != 0).float().mean(dim=0)
    assert keep[:100].mean() < 0.2 and keep[-100:].mean() > 0.8


def test_della_rejects_density_epsilon_outside_unit_interval():
    with pytest.raises(MethodError, match="epsilon"):
        merge_deltas("della", torch.zeros(4), [torch.ones(4)], [{"weight": 1.0, "density": 0.1, "epsilon": 0.2}])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "della_linear"])
def test_density_zero_keeps_nothing_of_that_task_vector_but_keeps_its_weight(method):
    """mergekit 0.1.5: sparsifying at density 0 gives zeros (DELLA's ε band does not apply); the source's weight
    still counts where a method normalizes by the sum of weights."""
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(64, 16, generator=g) for _ in range(3))
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    params = [{"weight": 0.7, "density": 0.0, **extra}, {"weight": 0.4, "density": 0.5, **extra}]
    got = merge_deltas(method, base, [a, b], params, {"normalize": True}, seed=3, key="k")
    zeroed = [{"weight": 0.7, "density": 1.0, **extra}, params[1]]
    want = merge_deltas(method, base, [torch.zeros_like(a), b], zeroed, {"normalize": True}, seed=3, key="k")
    assert torch.isfinite(got).all() and torch.equal(got, want)
    alone = merge_deltas(method, base, [b], [params[1]], {"normalize": True}, seed=3, key="k")
    assert not torch.equal(got, base) and (method.endswith("ties") or not torch.equal(got, alone))


def test_slerp_endpoints_and_near_parallel_lerp():
    v0, v1 = t(1.0, 0.0), t(0.0, 2.0)
    assert torch.allclose(merge_tensors("slerp", [v1], global_params={"t": 0.0}, base=v0), v0)
    assert torch.allclose(merge_tensors("slerp", [v1], global_params={"t": 1.0}, base=v0), v1)
    mid = merge_tensors("slerp", [v1], global_params={"t": 0.5}, base=v0)
    # angle 90°: weights sin(45°)/sin(90°) on the un-normalized tensors
    assert torch.allclose(mid, t(2**-0.5, 2 * 2**-0.5), atol=1e-6)
    a, b = t(1.0, 1.0), t(1.0, 1.0001)
    assert torch.allclose(merge_tensors("slerp", [b], global_params={"t": 0.25}, base=a), 0.75 * a + 0.25 * b)


def test_model_stock_interpolation_ratio_follows_offset_angle():
    base = torch.zeros(2)
    same = merge_tensors("model_stock", [t(1.0, 0.0), t(1.0, 0.0)], base=base)
    assert torch.allclose(same, t(1.0, 0.0))  # cos=1 → t=1 → the average
    orth = merge_tensors("model_stock", [t(1.0, 0.0), t(0.0, 1.0)], base=base)
    assert torch.allclose(orth, torch.zeros(2))  # cos=0 → t=0 → the base
    base3 = torch.zeros(3)
    # cos = 0.5 between each pair, N=2: t = 2·0.5/(1+0.5) = 2/3
    out = merge_tensors("model_stock", [t(1.0, 1.0, 0.0), t(0.0, 1.0, 1.0)], base=base3)
    assert torch.allclose(out, (2 / 3) * t(0.5, 1.0, 0.5))


def test_linear_is_the_weighted_average():
    out = merge_tensors("linear", [t(0.0, 2.0), t(4.0, 6.0)], [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, t(3.0, 5.0))


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_writes_into_a_preallocated_output(method):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 8, generator=g)
    n, params, gp = example(method)
    deltas = [torch.randn(16, 8, generator=g) * 0.1 for _ in range(n)]
    out = torch.empty_like(base)
    ptr = out.data_ptr()
    res = merge_deltas(method, base, deltas, params, gp, seed=1, key="k", out=out)
    fresh = merge_deltas(method, base, deltas, params, gp, seed=1, key="k")
    assert res.data_ptr() == ptr
    assert torch.allclose(out, fresh, atol=1e-6)
    assert not torch.allclose(out, base)


def test_unknown_method_and_parameter_are_named():
    with pytest.raises(MethodError, match="unknown merge method 'tie'"):
        merge_deltas("tie", torch.zeros(1), [torch.zeros(1)], [{"weight": 1}])
    with pytest.raises(MethodError, match="densty"):
        merge_deltas("ties", torch.zeros(1), [torch.zeros(1)], [{"weight": 1, "densty": 0.5}])
    with pytest.raises(MethodError, match="needs parameter 'weight'"):
        merge_deltas("ties", torch.zeros(1), [torch.zeros(1)], [{}])


def _reference_gta(base, deltas, weights, keep_masks, consensus, normalize, lam=1.0):
    """mergekit's formula with stacked tensors, as a slow reference for the chunked fast path."""
    d = torch.stack([x * m for x, m in zip(deltas, keep_masks)])
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    wd = d * w
    if consensus:
        elected = (wd.sum(0) >= 0).float() * 2 - 1
        mask = wd.sign() == elected
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), w.sum()
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "breadcrumbs", "task_arithmetic"])
def test_fast_paths_match_the_reference_on_large_tensors(method):
    g = torch.Generator().manual_seed(0)
    shape = (1200, 1000)  # > one chunk and > the size where the sampled threshold kicks in
    base = torch.randn(shape, generator=g)
    deltas = [torch.randn(shape, generator=g) * 0.01 for _ in range(3)]
    weights, densities = [0.5, -0.3, 0.8], [0.3, 0.6, 0.9]
    params = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    if method == "task_arithmetic":
        params = [{"weight": w} for w in weights]
    if method.startswith("breadcrumbs"):
        for p in params:
            p["gamma"] = 0.02
    out = merge_deltas(method, base, deltas, params, {"lambda": 0.7})
    if method == "task_arithmetic":
        masks = [torch.ones(shape)] * 3
    elif method == "ties":
        masks = [(magnitude(d, dens) != 0).float() for d, dens in zip(deltas, densities)]
    else:
        masks = [(magnitude_outliers(d, dens, gamma=0.02) != 0).float() for d, dens in zip(deltas, densities)]
    for m, dens in zip(masks, densities):
        if method != "task_arithmetic":
            assert int(m.sum()) == int(dens * m.numel())
    ref = _reference_gta(
        base, deltas, weights, masks, consensus=method.endswith("ties"), normalize=method == "ties", lam=0.7
    )
    assert (out - ref).abs().max().item() < 1e-5


def test_large_bf16_merge_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(600, 1000, generator=g)
    deltas = [torch.randn(600, 1000, generator=g) * 0.01 for _ in range(2)]
    p = [{"weight": 0.5}, {"weight": 0.5}]
    b16, d16 = base.bfloat16(), [d.bfloat16() for d in deltas]
    got = merge_deltas("task_arithmetic", b16, d16, p)
    # accumulating in fp32 and rounding once gives exactly the fp32 merge of the same inputs, rounded
    ref = merge_deltas("task_arithmetic", b16.float(), [d.float() for d in d16], p).bfloat16()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref)


def test_slerp_from_task_vector_equals_slerp_of_whole_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(700, 1000, generator=g)
    other = torch.randn(700, 1000, generator=g)
    from_delta = merge_deltas("slerp", base, [other - base], [], {"t": 0.3})
    raw = merge_tensors("slerp", [other], global_params={"t": 0.3}, base=base)
    assert (from_delta - raw).abs().max().item() < 1e-5


def test_model_stock_filter_wise_uses_per_row_angles():
    base = torch.zeros(2, 2)
    d1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    d2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0 parallel (t=1), row 1 orthogonal (t=0)
    out = merge_deltas("model_stock", base, [d1, d2], [], {"filter_wise": True})
    assert torch.allclose(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_cached_angles_follow_in_place_changes_of_the_task_vectors():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(100)
    d1, d2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    first = merge_deltas("model_stock", base, [d1, d2], [])
    d2.copy_(d1)  # now parallel: t = 1, the plain average
    assert torch.allclose(merge_deltas("model_stock", base, [d1, d2], []), d1, atol=1e-6)
    assert not torch.allclose(first, d1)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_accepts_bf16_task_vectors_and_output(method):
    """bf16 inputs (e.g. --delta-dtype bfloat16) merge like their fp32 upcast, rounded once."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g).bfloat16()
    n, params, gp = example(method)
    deltas = [(torch.randn(64, 32, generator=g) * 0.1).bfloat16() for _ in range(n)]
    got = merge_deltas(method, base, deltas, params, gp, seed=1, key="k")
    ref = merge_deltas(method, base.float(), [d.float() for d in deltas], params, gp, seed=1, key="k")
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max().item() <= 2**-7 * ref.abs().max().item()


def test_the_methods_beyond_the_task_arithmetic_family_check_their_inputs():
    base, d = torch.zeros(4), [torch.ones(4) * 0.1] * 3
    for method, deltas, gp, why in [
        ("nuslerp", d, {}, "nuslerp takes 2 non-base source"),
        ("nearswap", d[:1], {"t": 0.0}, "t .* must be > 0"),
        ("nearswap", d[:2], {"t": 0.1}, "nearswap takes 1 non-base source"),
        ("sce", d, {"select_topk": 1.5}, "select_topk must be in \\[0, 1\\]"),
        ("arcee_fusion", d[:2], {}, "arcee_fusion takes 1 non-base source"),
    ]:
        weights = [{"weight": 1.0}] * len(deltas) if "weight" in METHODS[method].source_params else []
        with pytest.raises(MethodError, match=why):
            merge_deltas(method, base, deltas, weights, gp)


def test_nearswap_takes_entries_closer_than_t_whole_and_moves_the_others_by_t():
    base = torch.zeros(4)
    got = merge_deltas("nearswap", base, [torch.tensor([0.05, -0.05, 0.5, -2.0])], [], {"t": 0.1})
    assert torch.allclose(got, torch.tensor([0.05, -0.05, 0.1, -0.1]))


def test_spherical_methods_without_a_base_interpolate_the_models_themselves():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    mid = merge_tensors("nuslerp", [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(mid, (a + b) * math.sin(math.pi / 4), atol=1e-6)  # a quarter turn, halved: sin(π/4)(a+b)
    assert torch.allclose(merge_tensors("multislerp", [a, a * 3], [{"weight": 1.0}, {"weight": 1.0}]), a * 2)
    assert torch.allclose(merge_tensors("karcher", [a, a * 3]), a * 2)
