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
def test_the_replayed_partitions_keep_what_torchs_sort_keeps(dtype):
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


def test_equal_values_are_not_kept_by_position():
    """The test above could pass for a stable sort too; here a stable order would keep other entries."""
    a = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5] * 40)
    got = sort_order.sorted_slice(a, 0, 70, descending=True)
    ties = torch.nonzero(a == 2.0).view(-1)
    assert torch.equal(got, torch_slice(a, 0, 70, True))
    assert not torch.equal(got.nonzero().view(-1), ties[:70])


def test_a_path_that_would_turn_to_heapsort_sorts_for_real(monkeypatch):
    a = (torch.randn(3000) * 0.05).to(torch.bfloat16).abs()
    monkeypatch.setattr(sort_order, "_slice_mask", lambda v, pos, lo, hi: None)
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
