"""Whole mergekit configs merge to mergekit 0.1.5's output (fixtures: tests/fixtures/mergekit_configs, written by
its generate.py with mergekit itself): gradients over depth and outside the layers, conditionals, the base listed
among the models, scientific notation."""

from pathlib import Path

import pytest
from safetensors.torch import load_file

from evomerge.cli import main

HERE = Path(__file__).resolve().parent / "fixtures" / "mergekit_configs"
CONFIGS = sorted((HERE / "configs").glob("*.yml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_evomerge_merge_equals_mergekit(config, tmp_path):
    text = config.read_text().replace("MODELS/", f"{HERE / 'models'}/")
    (tmp_path / "config.yml").write_text(text)
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(HERE / "expected" / f"{config.stem}.safetensors")
    assert set(got) == set(want)
    worst = max((float((got[n].float() - want[n].float()).abs().max()), n) for n in want)
    assert worst[0] <= 1e-6, f"{config.stem}: {worst[1]} differs by {worst[0]:.3g}"
