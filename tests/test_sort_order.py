"""mergekit's TIES and breadcrumbs keep a slice of torch's CPU sort of |δ|; where equal |δ| straddle the cut,
evomerge replays that sort's partitions (`sort_order`) to keep the same entries."""

import random
from pathlib import Path

import pytest
import torch

from evomerge.engine import Engine
from evomerge.methods import sort_order
from evomerge.recipe import Recipe

HERE = Path(__file__).resolve().parent / "fixtures" / "mergekit_configs"


def torch_slice(a: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    order = torch.sort(a.reshape(-1).float(), descending=descending).indices
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[order[lo:hi]] = True
    return mask.view(a.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, "few values"])
@pytest.mark.parametrize("small_spans", [False, True])
def test_the_replayed_partitions_keep_what_torchs_sort_keeps(dtype, small_spans, monkeypatch):
    """small_spans: positions written in many spans, partitions from 64 entries on two threads, and their swaps
    found in windows of 16-entry blocks."""
    if small_spans:
        monkeypatch.setattr(sort_order, "POSITIONS", 1000)
        monkeypatch.setattr(sort_order, "PAIR_MIN", 64)
        monkeypatch.setattr(sort_order, "WINDOW_BLOCK", 16)
    replay = sort_order._replay  # the real sort, where the replay gives up, would pass this test whatever it did
    monkeypatch.setattr(sort_order, "_replay", lambda *args: replay(*args) or pytest.fail("the replay gave up"))
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(60):
        n = rng.choice([2, 16, 17, 33, 500, 4097, 60_000])
        x = torch.randn(n) * 0.05
        a = torch.randint(0, 4, (n,)).float() if dtype == "few values" else x.to(dtype).abs()
        lo = rng.randrange(n)
        hi = rng.randrange(lo + 1, n + 1)
        for descending in (True, False):
            got = sort_order.sorted_slice(a, lo, hi, descending)
            assert torch.equal(got, torch_slice(a, lo, hi, descending)), (n, lo, hi, descending)


def test_a_swap_window_that_misses_stops_falls_back_to_the_whole_scans(monkeypatch):
    """`_swap_window` bounds where a partition's swaps lie; a window too small must not change the result (nor
    send it to the real sort, which a wrong partition would, by running out of depth)."""
    monkeypatch.setattr(sort_order, "_swap_window", lambda stops, right: (min(stops.size, 40), max(0, stops.size - 40)))
    replay = sort_order._replay
    monkeypatch.setattr(sort_order, "_replay", lambda *args: replay(*args) or pytest.fail("the replay gave up"))
    torch.manual_seed(5)
    for a in (torch.randn(5000).abs(), torch.randint(0, 4, (5000,)).float()):
        for lo, hi in ((0, 2500), (100, 4000)):
            for descending in (True, False):
                assert torch.equal(sort_order.sorted_slice(a, lo, hi, descending), torch_slice(a, lo, hi, descending))


def test_equal_values_are_not_kept_by_position():
    """The test above could pass for a stable sort too; here a stable order would keep other entries."""
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5] * 40)
    got = sort_order.sorted_slice(a, 0, 70, descending=True)
    ties = torch.nonzero(a == 2.0).view(-1)
    assert torch.equal(got, torch_slice(a, 0, 70, True))
    assert not torch.equal(got.nonzero().view(-1), ties[:70])


def test_a_path_that_would_turn_to_heapsort_sorts_for_real(monkeypatch):
    a = (torch.randn(3000) * 0.05).to(torch.bfloat16).abs()
    monkeypatch.setattr(sort_order, "_replay", lambda items, lo, hi: None)
    assert torch.equal(sort_order.sorted_slice(a, 10, 2000, False), torch_slice(a, 10, 2000, False))


@pytest.mark.parametrize("config", ["bf16_ties_fp32", "bf16_breadcrumbs_fp32"])
def test_the_engine_keeps_a_recipes_tie_order(config):
    """Resident task vectors (a search's engine) merge bf16 ties in the order the recipe asks: mergekit's by
    default (equal to what mergekit wrote for the config), first positions first for a search's candidates."""
    import yaml
    from safetensors.torch import load_file

    text = (HERE / "configs" / f"{config}.yml").read_text().replace("MODELS_BF16/", f"{HERE / 'models_bf16'}/")
    data = yaml.safe_load(text)
    engine = Engine(data["base_model"], [m["model"] for m in data["models"]], dtype="float32")
    want = load_file(HERE / "expected" / f"{config}.safetensors")
    mergekit_order = engine.merged(Recipe.from_dict(data))
    by_position = engine.merged(Recipe.from_dict({**data, "tie_order": "position"}))
    assert all(torch.equal(mergekit_order[n], want[n]) for n in want)
    assert sum(int((by_position[n] != want[n]).sum()) for n in want) > 0


@pytest.mark.parametrize("method,gamma", [("ties", None), ("breadcrumbs_ties", 0.05)])
def test_a_merge_patched_where_mergekit_keeps_other_ties_equals_one_with_whole_masks(method, gamma, monkeypatch):
    """A TIES/breadcrumbs merge runs by the (t, cut) rules and is merged again only at the positions where
    mergekit's sort order keeps other tied entries (`where_mergekit_keeps_others`). Merging every position
    again, each source keeping its slice of torch's own sort, must give the same tensor."""
    from evomerge.methods import fused, kernels
    from evomerge.methods.registry import METHODS, resolve_params
    from evomerge.methods.sparsify import breadcrumbs_window, magnitude_k

    torch.manual_seed(3)
    base = torch.randn(300, 200).bfloat16()
    deltas = [(torch.randn(300, 200) * 0.01).bfloat16() for _ in range(3)]  # bf16 |δ|: long runs of ties
    given = [{"weight": w, "density": d} | ({"gamma": gamma} if gamma else {}) for w, d in ((0.5, 0.3), (0.7, 0.5))]
    spec = METHODS[method]
    source_params, global_params = resolve_params(spec, 3, given + [{"weight": 0.9, "density": 0.7}], {})
    patches = []
    only_where_needed = fused.where_mergekit_keeps_others

    def everywhere(kind, deltas, densities, gammas, fp, ip):
        patches.append(only_where_needed(kind, deltas, densities, gammas, fp, ip))
        masks = []
        for delta, d, g in zip(deltas, densities, gammas):
            n = delta.numel()
            if kind == "magnitude":  # mergekit: the first k of a descending sort
                lo, hi, descending = 0, magnitude_k(n, d), True
            else:  # a window of an ascending one
                keep_top, drop_top = breadcrumbs_window(n, d, g)
                lo, hi, descending = n - keep_top, n - drop_top, False
            masks.append(torch_slice(delta.abs(), lo, hi, descending).reshape(-1))
        return torch.arange(deltas[0].numel()), masks

    patched = kernels.task_arithmetic(spec, base, deltas, source_params, global_params)
    monkeypatch.setattr(fused, "where_mergekit_keeps_others", everywhere)
    whole = kernels.task_arithmetic(spec, base, deltas, source_params, global_params)
    assert patches[0] is not None and patches[0][0].numel() > 0  # the rules alone would keep other entries
    assert torch.equal(patched, whole)


def test_ties_with_an_l1_rescale_keeps_mergekits_tied_entries():
    """With an l1 rescale each source's kept norm counts: mergekit's tied entries and the rules' weigh the same.
    Against TIES written out from torch's own sort, on fp32 task vectors with long runs of equal |δ|."""
    from evomerge.methods import kernels
    from evomerge.methods.registry import METHODS, resolve_params
    from evomerge.methods.sparsify import magnitude_k, rescale_factor

    torch.manual_seed(4)
    base = torch.randn(400, 50)
    deltas = [torch.randint(-20, 21, (400, 50)).float() * 1e-3 for _ in range(3)]
    weights, densities = (0.5, 0.7, 0.9), (0.3, 0.5, 0.7)
    spec = METHODS["ties"]
    source_params, global_params = resolve_params(
        spec, 3, [{"weight": w, "density": d} for w, d in zip(weights, densities)], {"rescale": True}
    )
    got = kernels.task_arithmetic(spec, base, deltas, source_params, global_params)
    kept = []
    for delta, w, d in zip(deltas, weights, densities):
        mask = torch_slice(delta.abs(), 0, magnitude_k(delta.numel(), d), descending=True)
        k = delta * mask
        kept.append(w * k * rescale_factor(k, float(delta.abs().sum(dtype=torch.float64)), "l1", d))
    total = sum(kept)
    agree = [torch.where(total >= 0, k > 0, k < 0) for k in kept]
    mixed = sum(torch.where(a, k, 0.0) for a, k in zip(agree, kept))
    div = sum(torch.where(a, w, 0.0) for a, w in zip(agree, weights))
    torch.testing.assert_close(got, base + mixed / torch.where(div == 0, 1.0, div), rtol=1e-6, atol=1e-7)
