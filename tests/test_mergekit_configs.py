"""Whole mergekit configs merge to mergekit 0.1.5's output (fixtures: tests/fixtures/mergekit_configs, written by
its generate.py with mergekit itself): gradients over depth and outside the layers, conditionals, densities at the
edges, the base listed among the models, scientific notation, passthrough frankenmerges, bf16 sources."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main

HERE = Path(__file__).resolve().parent / "fixtures" / "mergekit_configs"
CONFIGS = sorted((HERE / "configs").glob("*.yml"))


def within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, operands: list[torch.Tensor]) -> bool:
    """mergekit rounds after every bf16 operation (δ, w·δ, the sum, + base: up to ½ step each), evomerge
    accumulates in fp32 and rounds once: at most two bf16 steps apart, a step at the scale of the operands (base +
    Σ wᵢδᵢ rounds at the base's scale, even where it cancels)."""
    big = torch.stack([got.float().abs(), want.float().abs(), *(t.float().abs() for t in operands)]).amax(0)
    step = torch.exp2(torch.floor(torch.log2(big.clamp(min=2**-126))) - 7)
    return bool(((got.float() - want.float()).abs() <= 2 * step).all())


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_evomerge_merge_equals_mergekit(config, tmp_path):
    text = config.read_text().replace("MODELS_BF16/", f"{HERE / 'models_bf16'}/")
    (tmp_path / "config.yml").write_text(text.replace("MODELS/", f"{HERE / 'models'}/"))
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(HERE / "expected" / f"{config.stem}.safetensors")
    assert set(got) == set(want)
    assert {n: t.dtype for n, t in got.items()} == {n: t.dtype for n, t in want.items()}
    operands = [load_file(HERE / "models_bf16" / m / "model.safetensors") for m in ("base", "ft0", "ft1")]
    for n in want:
        if want[n].dtype == torch.bfloat16:
            assert within_bf16_rounding(got[n], want[n], [o[n] for o in operands]), f"{config.stem}: {n}"
        else:
            diff = float((got[n] - want[n]).abs().max())
            assert diff <= 1e-6, f"{config.stem}: {n} differs by {diff:.3g}"


RANDOM = sorted((HERE / "configs_random").glob("*.yml"))


@pytest.mark.parametrize("config", RANDOM, ids=[c.stem for c in RANDOM])
def test_random_mask_merges_have_mergekits_statistics(config, tmp_path):
    """DARE and DELLA draw other masks than mergekit (a counter-based hash, not torch's generator), so the outputs
    are compared as distributions over the model's 7,920 entries: the share left at the base (no task vector
    kept there) within four standard errors of a difference of two binomial shares, and ‖merged − base‖₁ (what
    the rescale preserves) within 5 %."""
    text = config.read_text().replace("MODELS/", f"{HERE / 'models'}/")
    (tmp_path / "config.yml").write_text(text)
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(HERE / "expected" / f"{config.stem}.safetensors")
    base = load_file(HERE / "models" / "base" / "model.safetensors")
    names = sorted(want)
    b, g, w = (torch.cat([d[n].flatten().float() for n in names]) for d in (base, got, want))
    p_got, p_want = (g == b).float().mean().item(), (w == b).float().mean().item()
    p = (p_got + p_want) / 2
    assert abs(p_got - p_want) <= 4 * (2 * p * (1 - p) / b.numel()) ** 0.5, (p_got, p_want)
    l1_got, l1_want = (g - b).abs().sum().item(), (w - b).abs().sum().item()
    assert abs(l1_got / l1_want - 1) <= 0.05, (l1_got, l1_want)
