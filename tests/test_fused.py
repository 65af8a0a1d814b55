"""The fused TIES/DARE/breadcrumbs kernels: exact thresholds, the counter-based random masks, and compiled
code agreeing with the eager chunked code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from evomerge.methods import fast, fused, merge_deltas
from evomerge.methods.sparsify import magnitude


def reference_top_k(absval: torch.Tensor, k: int) -> torch.Tensor:
    """Exactly k largest, ties broken by position (stable sort on -|δ|)."""
    flat = absval.reshape(-1)
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def keep_mask(delta: torch.Tensor, t: float, cut: int) -> torch.Tensor:
    a = delta.reshape(-1).abs().double()
    idx = torch.arange(a.numel())
    return (a > t) | ((a == t) & (idx < cut))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n", [1000, 100_001, 3_000_001])
@pytest.mark.parametrize("host_numpy", [True, False])  # False: the torch code a GPU runs
def test_keep_largest_is_an_exact_top_k_with_positional_ties(dtype, n, host_numpy, monkeypatch):
    monkeypatch.setattr(fast, "HOST_NUMPY", host_numpy)
    g = torch.Generator().manual_seed(n)
    delta = (torch.randn(n, generator=g) * 0.01).to(dtype)
    delta[::7] = 0.0  # a block of exact ties at zero
    ks = [int(d * n) for d in (0.001, 0.3, 0.5, 0.9, 0.95)]
    for k, (t, cut) in zip(ks, fused.keep_largest(delta, ks)):  # one pass for all ks
        got = keep_mask(delta, t, cut)
        assert int(got.sum()) == k
        assert torch.equal(got, reference_top_k(delta.abs().float(), k))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,host_numpy", [(100_001, True), (3_000_001, True), (100_001, False)])
def test_a_one_shot_merge_selects_the_same_top_k_without_an_index(dtype, n, host_numpy, monkeypatch):
    """`evomerge merge` uses each task vector once: the bracketed selection replaces the bin index, same result
    (its passes in numpy on the CPU, in torch as on a GPU)."""
    monkeypatch.setattr(fast, "HOST_NUMPY", host_numpy)
    g = torch.Generator().manual_seed(n + 1)
    delta = (torch.randn(n, generator=g) * 0.01).to(dtype)
    delta[::7] = 0.0
    ks = [int(d * n) for d in (0.001, 0.3, 0.5, 0.9, 0.95)]
    with fast.one_shot():
        found = fused.keep_largest(delta, ks)
    for k, (t, cut), indexed in zip(ks, found, fused.keep_largest(delta, ks)):  # and the index path of a search
        assert torch.equal(keep_mask(delta, t, cut), reference_top_k(delta.abs().float(), k))
        assert torch.equal(keep_mask(delta, *indexed), keep_mask(delta, t, cut))
        magnitudes = delta.abs().to(fast.work_dtype(delta))  # the ties it met on the way: every |δ| == t
        assert torch.equal(fused.ties_found(delta)[t], (magnitudes == t).nonzero().view(-1))
    a = delta.abs().float()
    t, cut = fast.kth_largest(a, ks[2])
    assert fast.kth_largest_bracketed(a, ks[2], sample=1) == (float(t), cut, None)  # a missed bracket: the fallback


@pytest.mark.parametrize("scan,host_numpy", [(fused.BLOCK * 3, True), (fused.SCAN, True), (fused.SCAN, False)])
def test_tie_cut_scans_from_either_end_in_chunks(scan, host_numpy, monkeypatch):
    """16-bit task vectors: the k-th value has many ties; its nth is found between two `tie_index` records
    (numpy on the CPU, torch as on a GPU), or, in a stretch longer than SCAN, block by block from the nearer
    end."""
    monkeypatch.setattr(fused, "SCAN", scan)
    monkeypatch.setattr(fast, "HOST_NUMPY", host_numpy)
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(100_003, generator=g) * 0.01).to(torch.bfloat16)
    ks = [int(d * delta.numel()) for d in (0.05, 0.3, 0.5, 0.7, 0.95)] + [77_777, 100_002]
    for k, (t, cut) in zip(ks, fused.keep_largest(delta, ks)):
        assert torch.equal(keep_mask(delta, t, cut), reference_top_k(delta.abs().float(), k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tie_index_records_every_stride_th_entry_of_each_value(dtype, monkeypatch):
    """Built a chunk at a time (chunks far smaller than the tensor here), the records must be each value's
    1st, (S+1)th, (2S+1)th... positions; a few values with thousands of ties and one rare value, the k-th
    largest landing on each."""
    monkeypatch.setattr(fast, "CHUNK", 4096)
    g = torch.Generator().manual_seed(2)
    n = 50_001
    delta = (torch.randint(0, 4, (n,), generator=g) * 0.25 * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)).to(dtype)
    delta[[5, 20_000, 49_999]] = 3.0  # a rare value: 3 ties, its last stretch reaching the end
    ties = fused.tie_index(delta)
    patterns = (delta.view(torch.int16) & 0x7FFF).long()
    order = torch.sort(patterns, stable=True).indices
    present = patterns.unique().tolist()
    assert fused.magnitude_index(delta).patterns.tolist() == present and len(ties.first) == len(present)
    for v, p in enumerate(present):
        expected = order[patterns[order] == p][:: fused.TIE_STRIDE].numpy()
        assert ties.positions[ties.first[v] : ties.first[v] + expected.size].tolist() == expected.tolist()
    ks = [1, 2, 3, 4, 100, 12_345, 25_000, 37_001, n - 1]
    for k, (t, cut) in zip(ks, fused.keep_largest(delta, ks)):
        assert torch.equal(keep_mask(delta, t, cut), reference_top_k(delta.abs().float(), k)), k


def test_keep_largest_handles_few_distinct_values_and_edges():
    delta = torch.tensor([0.5, -0.5, 0.25, 0.5, 0.0, -0.25, 0.5, 0.0] * 300)
    for k in range(0, delta.numel() + 1, 97):
        ((t, cut),) = fused.keep_largest(delta, [k])
        assert torch.equal(keep_mask(delta, t, cut), reference_top_k(delta.abs(), k))


def test_magnitude_index_follows_in_place_changes():
    delta = torch.randn(5000)
    before = fused.magnitude_index(delta)
    delta.mul_(3.0)
    after = fused.magnitude_index(delta)
    assert after is not before
    np.testing.assert_allclose(after.edges, before.edges * 3, rtol=1e-6)


@pytest.mark.parametrize("host_numpy", [True, False])  # numpy's keyed sort on the CPU; torch's stable sort
def test_row_rank_fractions_are_stable_ranks_within_each_row(monkeypatch, host_numpy):
    monkeypatch.setattr(fast, "HOST_NUMPY", host_numpy)
    delta = torch.randn(700, 77)  # several blocks of rows
    delta[:, ::5] = 0.5  # ties, broken by position
    delta[:, 1::7] = -0.5
    delta[:, 2::9] = torch.tensor([0.0, -0.0]).repeat(700, 5)[:, : delta[:, 2::9].shape[1]]
    delta[:, 3] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0))  # one ulp above a tie: after it
    expected = delta.abs().argsort(dim=1, stable=True).argsort(dim=1)
    stored = fused.row_rank_fractions(delta)
    assert stored.dtype == torch.float16
    assert torch.equal((stored.float() * 76).round().long(), expected)  # exact ranks below 2049 wide
    torch.testing.assert_close(fused.row_rank_fractions(torch.arange(5.0)).float(), torch.arange(5) / 4)  # 1-D: one row
    wide = torch.randn(3, 40_000)  # fp16 rounds the fraction by at most 2⁻¹²
    got = fused.row_rank_fractions(wide).float()
    ranks = wide.abs().argsort(dim=1, stable=True).argsort(dim=1)
    assert (got - ranks / 39_999).abs().max() <= 2**-12


@pytest.mark.parametrize("width", [1, 2, 3, 17, 1024, 2816, 5000, 40_000])
def test_row_order_is_a_stable_sort_of_each_row(width):
    """The CPU row sort keys on a value's top bits and the position, then orders again the runs whose values
    share those top bits (`_reorder_runs`): the result is torch's stable sort, for fp32 values (many such runs,
    some with exact ties), values one ulp apart, ties at zero, and 16-bit values, whose low bits need no look."""
    g = torch.Generator().manual_seed(width)
    rows = 3 if width > 5000 else 40
    gaussian = torch.randn(rows, width, generator=g).abs() * 1e-3
    near = torch.full((rows, width), 0.25)  # one top-bits run: values a few ulps apart, ties among them
    near.view(torch.int32).add_(torch.randint(0, 4, (rows, width), generator=g, dtype=torch.int32))
    quantized = torch.randint(0, 5, (rows, width), generator=g).float() * 0.125  # exact ties, zeros
    cases = [(gaussian, 23), (near, 23), (quantized, 23), (gaussian.bfloat16().float(), 23)]
    cases += [(gaussian.bfloat16().float(), 7), (gaussian.half().float(), 10)]
    for values, mantissa in cases:
        expected = values.sort(dim=1, stable=True).indices
        assert torch.equal(fused._row_order(values.contiguous(), mantissa), expected)


def test_della_keep_probability_rises_with_rank():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(2000, 500, generator=g)
    out = merge_deltas(
        "della_linear",
        torch.zeros_like(delta),
        [delta],
        [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}],
        seed=4,
        key="k",
    )
    kept = out != 0
    ranks = (fused.row_rank_fractions(delta).float() * 499).round().long()
    assert abs(kept.float().mean().item() - 0.5) < 0.005
    low, high = kept[ranks < 50].float().mean().item(), kept[ranks >= 450].float().mean().item()
    assert abs(low - 0.31) < 0.02 and abs(high - 0.69) < 0.02  # p = 0.3 + 0.4·rank/499 averaged over each band


def test_random_bits_are_uniform_independent_and_position_keyed():
    idx = torch.arange(1 << 20)
    a = fused.random_bits(idx, fused.seed_word(12345))
    b = fused.random_bits(idx, fused.seed_word(12346))
    assert int(a.min()) >= 0 and int(a.max()) < 1 << fused.RANDOM_BITS
    for density in (0.1, 0.5, 0.9):
        thr = fused.density_threshold(density)
        ka, kb = a < thr, b < thr
        n = idx.numel()
        sd = math.sqrt(n * density * (1 - density))
        assert abs(int(ka.sum()) - density * n) < 6 * sd
        # neighbouring seeds are independent: overlap ≈ density², not density
        assert abs(int((ka & kb).sum()) - density**2 * n) < 6 * math.sqrt(n * density**2 * (1 - density**2))
        # neighbouring positions are independent too
        assert abs(int((ka[1:] & ka[:-1]).sum()) - density**2 * (n - 1)) < 6 * math.sqrt(
            n * density**2 * (1 - density**2)
        )
    # a chunk starting at offset s draws what the whole tensor draws there
    assert torch.equal(fused.random_bits(idx[5000:9000], 77), fused.random_bits(idx, 77)[5000:9000])


def test_density_threshold_rounds_to_the_grid_and_never_to_zero():
    step = 1 << (fused.RANDOM_BITS - fused.DENSITY_BITS)
    assert fused.density_threshold(0.3) == round(0.3 * 2**fused.DENSITY_BITS) * step
    assert fused.density_threshold(1e-9) == step and fused.density_threshold(0.0) == 0
    assert fused.density_threshold(1.0) == 1 << fused.RANDOM_BITS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_norm_tables_equal_the_direct_pass(dtype):
    """mergekit's l1 rescale of DARE and DELLA masks read from the per-seed tables, against summing the mask."""
    g = torch.Generator().manual_seed(8)
    delta = (torch.randn(1100, 1000, generator=g) * 0.01).to(dtype)
    fractions = fused.row_rank_fractions(delta)
    for kind in ("random", "rank"):
        for density in (0.2, 0.3, 0.5, 0.77, 0.85):
            fp, ip = fused.source_params(kind, [delta], [density], [0.0], [42], torch.float32, [0.1])
            rank = fractions if kind == "rank" else None
            (direct,) = fused.kept_and_whole_l1(kind, [delta], fp, ip, [rank] if rank is not None else [])[0]
            fused.tabled_kept_l1(kind, delta, fp, ip, rank)  # DELLA: the first sight of a (seed, ε) is not tabulated
            assert fused.tabled_kept_l1(kind, delta, fp, ip, rank) == pytest.approx(direct, rel=1e-6), (kind, density)
    assert fused.tabled_kept_l1("random", delta[:10], fp, ip) is None  # small tensors: the direct pass
    delta.mul_(2)  # an in-place change rebuilds the table
    fp, ip = fused.source_params("random", [delta], [0.3], [0.0], [42], torch.float32)
    assert fused.tabled_kept_l1("random", delta, fp, ip) == pytest.approx(
        fused.kept_and_whole_l1("random", [delta], fp, ip)[0][0], rel=1e-6
    )


def test_della_with_a_new_epsilon_every_candidate_builds_no_table():
    delta = torch.randn(1100, 1000)
    fractions = fused.row_rank_fractions(delta)
    for eps in (0.05, 0.06, 0.07, 0.08) * 3:
        fp, ip = fused.source_params("rank", [delta], [0.5], [0.0], [1], torch.float32, [eps])
        assert fused.tabled_kept_l1("rank", delta, fp, ip, fractions) is None
    assert list(fused._kept_l1_tables(delta)) == ["last"]  # bounded: nothing accumulates


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_della_codes_a_repeated_seed_and_epsilon_and_merges_the_same(dtype):
    """A (seed, ε) seen twice in a row turns the rank fractions into margin codes, in place; every merge still
    equals the first-sight merge of fresh copies (fractions and hashing), and a new ε brings the fractions back."""
    g = torch.Generator().manual_seed(21)
    base = torch.randn(600, 500, generator=g).to(dtype)
    deltas = [(torch.randn(600, 500, generator=g) * 0.01).to(dtype) for _ in range(2)]

    def merge(densities, epsilons, on):
        params = [{"weight": 0.7, "density": d, "epsilon": e} for d, e in zip(densities, epsilons)]
        return merge_deltas("della", base, on, params, seed=5, key="w")

    fractions = [fused.row_rank_fractions(d) for d in deltas]
    steps = [(0.5, 0.6), (0.3, 0.8), (0.45, 1.0), (0.7, 0.2), (0.5, 0.6)]
    for n, densities in enumerate(steps):
        assert torch.equal(
            merge(densities, (0.1, 0.15), deltas), merge(densities, (0.1, 0.15), [d.clone() for d in deltas])
        )
        states = [fused._della_state(d) for d in deltas]
        assert all((s["coded_for"] is not None) == (n > 0) for s in states), n
    coded = fused._della_state(deltas[0])["values"]
    assert not torch.equal(coded, fractions[0])  # overwritten in place: no second buffer
    assert int(fused._code_steps(coded).min()) >= -1 and int(fused._code_steps(coded).max()) < 1 << fused.DENSITY_BITS
    assert torch.equal(
        merge((0.5, 0.6), (0.1, 0.2), deltas), merge((0.5, 0.6), (0.1, 0.2), [d.clone() for d in deltas])
    )
    first, second = (fused._della_state(d) for d in deltas)
    assert first["coded_for"] is not None and second["coded_for"] is None and second["given_up"]
    assert torch.equal(second["values"], fractions[1])  # sorted again
    for _ in range(2):  # the second source never codes again, and mixed kinds merge the same
        assert torch.equal(
            merge((0.4, 0.5), (0.1, 0.2), deltas), merge((0.4, 0.5), (0.1, 0.2), [d.clone() for d in deltas])
        )
    kinds, _ = fused.della_inputs(
        deltas, *fused.source_params("rank", deltas, [0.4, 0.5], [0.0] * 2, [1, 2], torch.float32, [0.1, 0.2])
    )
    assert kinds == ("rank", "rank")  # another seed word: a new key for the first source, too


def test_della_kept_norm_tables_from_codes_equal_the_direct_pass():
    g = torch.Generator().manual_seed(9)
    delta = torch.randn(1100, 1000, generator=g) * 0.01
    fractions = fused.row_rank_fractions(delta)
    for density in (0.2, 0.5, 0.85):
        fp, ip = fused.source_params("rank", [delta], [density], [0.0], [42], torch.float32, [0.1])
        (direct,) = fused.kept_and_whole_l1("rank", [delta], fp.clone(), ip, [fractions])[0]
        kinds, values = fused.della_inputs([delta], fp, ip)
        if kinds == ("rank",):  # first sight of (seed, ε)
            kinds, values = fused.della_inputs([delta], fp, ip)
        assert kinds == ("coded",)
        assert fused.kept_and_whole_l1(kinds, [delta], fp, ip, values)[0][0] == pytest.approx(direct, rel=1e-9)
        assert fused.tabled_kept_l1("coded", delta, fp, ip, values[0]) == pytest.approx(direct, rel=1e-6)


def test_the_direct_kept_norm_sums_each_sources_mask_in_one_pass():
    deltas = [torch.randn(5000), torch.randn(5000) * 3]
    fp, ip = fused.source_params("random", deltas, [0.3, 0.6], [0.0, 0.0], [42, 7], torch.float32)
    expected = []
    for delta, seed, row in zip(deltas, (42, 7), ip):
        mask = fused.random_bits(torch.arange(delta.numel()), fused.seed_word(seed)) < int(row[3])
        expected.append(float(delta.abs().double()[mask].sum()))
    kept, whole = fused.kept_and_whole_l1("random", deltas, fp, ip)
    assert kept == pytest.approx(expected, rel=1e-9)
    assert whole == pytest.approx([fast.delta_l1(d) for d in deltas], rel=1e-9)  # ‖δ‖₁ from the same pass


def test_dare_keeps_the_density_and_rescales_each_source():
    base = torch.zeros(200_000)
    delta = torch.randn(200_000)
    out = merge_deltas(
        "dare_linear",
        base,
        [delta],
        [{"weight": 1.0, "density": 0.2}],
        {"rescale_mode": "inverse_density"},
        seed=0,
        key="k",
    )
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.2) < 0.005
    torch.testing.assert_close(
        out[kept], delta[kept] / (fused.density_threshold(0.2) / 2**fused.RANDOM_BITS)
    )  # 1/P(keep)


def test_ties_fused_equals_reference_trim_and_election():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(300, 200, generator=g)
    deltas = [torch.randn(300, 200, generator=g) * 0.01 for _ in range(3)]
    weights, density = [0.7, 0.5, 0.9], 0.4
    got = merge_deltas("ties", base, deltas, [{"weight": w, "density": density} for w in weights])
    kept = torch.stack([magnitude(d, density) * w for d, w in zip(deltas, weights)])
    elected = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(kept) == elected
    w = torch.tensor(weights).view(3, 1, 1)
    div = (agree * w).sum(0)
    expected = base + (kept * agree).sum(0) / torch.where(div == 0, 1.0, div)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,dtype",
    [
        ("ties", torch.float32),
        ("dare_ties", torch.float32),
        ("breadcrumbs_ties", torch.float32),
        ("dare_linear", torch.float32),
        ("della", torch.float32),
        ("ties", torch.bfloat16),
        ("task_arithmetic", torch.bfloat16),
        ("linear", torch.float32),
        ("slerp", torch.float32),
        ("model_stock", torch.float32),
        ("dare_ties", torch.bfloat16),
        ("breadcrumbs_ties", torch.bfloat16),
        ("della", torch.bfloat16),  # 16-bit lane tiling
    ],
)
def test_compiled_kernels_match_eager(method, dtype, monkeypatch):
    """torch.compile'd merge (inductor) against the eager chunked code on the same inputs."""
    g = torch.Generator().manual_seed(5)
    shape = (1100, 1000)  # > one chunk, odd tail
    base = torch.randn(shape, generator=g).to(dtype)
    deltas = [(torch.randn(shape, generator=g) * 0.01).to(dtype) for _ in range(2)]
    params = [{"weight": 0.6, "density": 0.3}, {"weight": 0.8, "density": 0.7}]
    global_params = {}
    if method.startswith("breadcrumbs"):
        params = [dict(p, gamma=0.02) for p in params]
    if method == "della":
        params = [dict(p, epsilon=0.1) for p in params]
    if method in ("linear", "task_arithmetic"):
        params = [{"weight": p["weight"]} for p in params]
    if method == "slerp":
        params, global_params, deltas = [], {"t": 0.3}, deltas[:1]
    if method == "model_stock":
        params = []
    monkeypatch.setenv("EVOMERGE_COMPILE", "off")
    eager = merge_deltas(method, base, deltas, params, global_params, seed=9, key="layer.0")
    monkeypatch.setenv("EVOMERGE_COMPILE", "on")
    compiled = merge_deltas(method, base, deltas, params, global_params, seed=9, key="layer.0")
    assert not fused._compile_failed, "torch.compile failed; the eager fallback ran instead"
    tol = (
        {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-5}
    )  # bf16: one rounding step
    torch.testing.assert_close(compiled, eager, **tol)
    if method == "della":  # that was the second sight of its (seed, ε): margin codes; fresh copies hash instead
        assert fused._della_state(deltas[0])["coded_for"] is not None
        torch.testing.assert_close(
            merge_deltas(method, base, [d.clone() for d in deltas], params, global_params, seed=9, key="layer.0"),
            eager,
            **tol,
        )


@pytest.mark.slow
def test_small_tensors_reuse_kernels_compiled_for_large_ones(monkeypatch):
    """Below COMPILE_MIN_NUMEL a fused merge runs code compiled already for a larger tensor (one call instead of
    ~100 eager ops of a few µs); a one-entry tensor stays eager (inductor would compile again for size 1).
    The large tensor is a matrix, the small ones vectors: their flattened views must not compile again."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "auto")
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 1 << 16)  # a smaller "large" tensor: a quicker test
    g = torch.Generator().manual_seed(11)
    params = [{"weight": 0.6, "density": 0.4, "epsilon": 0.1}, {"weight": 0.8, "density": 0.6, "epsilon": 0.1}]

    def inputs(*shape):
        return torch.randn(shape, generator=g), [torch.randn(shape, generator=g) * 0.01 for _ in range(2)]

    large = inputs(1 << 9, 1 << 8)
    merge_deltas("della", *large, params, seed=3, key="k")  # compiles the merge and the kept-norm pass
    assert not fused._compile_failed
    graphs = counters["stats"]["unique_graphs"]
    eager_chunks = []
    body = fused._merge_body
    monkeypatch.setattr(fused, "_merge_body", lambda *a, **kw: (eager_chunks.append(1), body(*a, **kw))[1])
    for n, reused in ((1000, True), (2, True), (1, False)):
        base, deltas = inputs(n)
        eager_chunks.clear()
        got = merge_deltas("della", base, deltas, params, seed=3, key="k")
        assert (not eager_chunks) == reused, n
        monkeypatch.setenv("EVOMERGE_COMPILE", "off")
        torch.testing.assert_close(
            got, merge_deltas("della", base, deltas, params, seed=3, key="k"), rtol=1e-6, atol=1e-7
        )
        monkeypatch.setenv("EVOMERGE_COMPILE", "auto")
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled again


@pytest.mark.slow
def test_16bit_merges_compile_with_16bit_lanes(monkeypatch):
    """inductor alone tiles our bf16 TIES kernel by fp32 lanes (partial-vector copies on every bf16 load);
    `_tile_by_16bit_lanes` must make it pick 16 lanes, on a torch whose internals it knows."""
    cpp = pytest.importorskip("torch._inductor.codegen.cpp")
    if not hasattr(getattr(cpp, "TilingSelect", None), "select_tiling"):
        pytest.skip("this torch has no TilingSelect: the tiling hook does nothing")
    import torch._inductor.config as inductor_config

    factors = []
    select = cpp.TilingSelect.select_tiling

    def spy(self, fn_list, var_sizes_list):
        result = select(self, fn_list, var_sizes_list)
        factors.append((len(fn_list), result[0]))  # the merge is the kernel fusing the most loop bodies
        return result

    monkeypatch.setattr(cpp.TilingSelect, "select_tiling", spy)
    monkeypatch.setenv("EVOMERGE_COMPILE", "on")
    torch._dynamo.reset()
    monkeypatch.setattr(fused, "_dynamo_kernels", {})
    base = torch.randn(1 << 20).bfloat16()
    deltas = [(torch.randn(1 << 20) * 0.01).bfloat16() for _ in range(3)]  # 3 sources: one fused body is fp32-only
    # generate code, do not load it (config.patch: an alias setting that monkeypatch would leave broken behind it)
    with inductor_config.patch(force_disable_caches=True):
        merge_deltas("ties", base, deltas, [{"weight": 1.0, "density": 0.5}] * 3, seed=0, key="k")
    assert not fused._compile_failed
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    lanes = pick_vec_isa().nelements(torch.bfloat16)  # 16 with AVX2, 32 with AVX-512 (twice the fp32 lanes)
    assert max(factors)[1] == [lanes], factors


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("EVOMERGE_COMPILE", "on")

    def broken(*_args, **_kw):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(fused, "_compile", broken)
    monkeypatch.setattr(fused, "_dynamo_kernels", {})
    monkeypatch.setattr(fused, "_compile_failed", False)
    base, delta = torch.randn(4000), torch.randn(4000)
    got = merge_deltas("dare_ties", base, [delta], [{"weight": 1.0, "density": 0.5}], seed=1, key="k")
    assert fused._compile_failed
    monkeypatch.setenv("EVOMERGE_COMPILE", "off")
    torch.testing.assert_close(
        got, merge_deltas("dare_ties", base, [delta], [{"weight": 1.0, "density": 0.5}], seed=1, key="k")
    )


def test_scratch_and_outputs_are_reused_not_reallocated():
    base = torch.randn(10_000)
    deltas = [torch.randn(10_000) * 0.01 for _ in range(2)]
    out = torch.empty_like(base)
    ptr = out.data_ptr()
    for d in (0.2, 0.6):
        merge_deltas("ties", base, deltas, [{"weight": 1.0, "density": d}] * 2, out=out)
    assert out.data_ptr() == ptr
    assert (
        fast.scratch(10_000, torch.bool, base.device, slot=70).data_ptr()
        == fast.scratch(10_000, torch.bool, base.device, slot=70).data_ptr()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "method",
    ["ties", "dare_ties", "dare_linear", "breadcrumbs_ties", "della", "task_arithmetic", "slerp", "model_stock"],
)
def test_cuda_merge_matches_cpu(method, dtype, monkeypatch):
    """The GPU path (Triton through torch.compile) against the CPU's: same thresholds, same random bits.
    The base is as small as the task vectors, so a single entry kept on one side and not the other shows."""
    monkeypatch.setenv("EVOMERGE_COMPILE", "on")
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(1500, 1000, generator=g) * 0.01).to(dtype)
    deltas = [(torch.randn(1500, 1000, generator=g) * 0.01).to(dtype) for _ in range(3)]
    params = [{"weight": 0.5, "density": 0.4}] * 3
    if method.startswith("breadcrumbs"):
        params = [dict(p, gamma=0.02) for p in params]
    if method == "della":
        params = [dict(p, epsilon=0.1) for p in params]
    if method in ("task_arithmetic", "slerp", "model_stock"):
        params = [{"weight": 0.5}] * 3 if method == "task_arithmetic" else []
    n = 1 if method == "slerp" else 3
    glob = {"t": 0.3} if method == "slerp" else {}
    cpu = merge_deltas(method, base, deltas[:n], params, glob, seed=3, key="w")
    gpu = merge_deltas(method, base.cuda(), [d.cuda() for d in deltas[:n]], params, glob, seed=3, key="w")
    assert gpu.dtype == dtype and gpu.is_cuda
    if dtype == torch.float32:
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-7)
    else:  # fp32 arithmetic rounded once to bf16: at most one bf16 step apart, and rarely that
        diff = (gpu.cpu().float() - cpu.float()).abs()
        assert float((diff > cpu.float().abs() * 2**-7 + 1e-9).float().mean()) == 0.0
        assert float((diff > 0).float().mean()) < 0.01


def test_dare_codes_give_the_masks_of_hashing_positions(monkeypatch):
    """A search's DARE keeps each small task vector's codes (its random bits on the density grid) instead of
    hashing every position per candidate: the same merge, to the bit, as a one-off merge that hashes."""
    used = []
    real = fused.dare_inputs
    monkeypatch.setattr(fused, "dare_inputs", lambda d, ip: used.append(real(d, ip)[0]) or real(d, ip))
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=g)
    deltas = [torch.randn(3000, generator=g) * 0.1 for _ in range(3)]
    params = [{"weight": 0.7, "density": d} for d in (0.3, 0.55, 0.9)]
    for method in ("dare_ties", "dare_linear"):
        coded = merge_deltas(method, base, deltas, params, {}, seed=5, key="t")
        again = merge_deltas(method, base, deltas, params, {}, seed=5, key="t")  # the codes from the cache
        with fast.one_shot():
            hashed = merge_deltas(method, base, deltas, params, {}, seed=5, key="t")
        assert torch.equal(coded, hashed) and torch.equal(again, hashed)
        other_seed = merge_deltas(method, base, deltas, params, {}, seed=6, key="t")
        assert not torch.equal(other_seed, hashed)
    assert used.count(("dare_coded",) * 3) == 6 and used.count(("random",) * 3) == 2


def test_a_long_search_compiles_small_tensors_on_the_cpu(monkeypatch):
    monkeypatch.setenv("EVOMERGE_COMPILE", "auto")
    monkeypatch.setattr(fused, "_expected_candidates", 1)
    small = torch.zeros(1000)
    assert not fused._use_compiled(small)
    fused.expect_candidates(fused.MANY_CANDIDATES)
    assert fused._use_compiled(small) and not fused._use_compiled(torch.zeros(1))
    with fast.one_shot():
        assert not fused._use_compiled(small)
