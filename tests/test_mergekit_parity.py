"""Deterministic methods must equal mergekit 0.1.5's output (fixtures in ../shared) to 1e-6."""

import json

import pytest
from conftest import SHARED
from safetensors.torch import load_file

from evomerge.methods import merge_tensors

FIXTURES = SHARED / "fixtures" / "mergekit"
if not (FIXTURES / "cases.json").is_file():
    pytest.skip(f"mergekit fixtures not found at {FIXTURES}", allow_module_level=True)
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]


@pytest.fixture(scope="module")
def tensors():
    return load_file(FIXTURES / "inputs.safetensors"), load_file(FIXTURES / "expected.safetensors")


def test_fixtures_cover_every_deterministic_method():
    assert {c["method"] for c in CASES} >= {
        "linear",
        "task_arithmetic",
        "ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "slerp",
    }


@pytest.mark.parametrize("case", CASES, ids=[c["case"] + "-" + c["method"] for c in CASES])
def test_matches_mergekit(case, tensors):
    inputs, expected = tensors
    params = case["params"]
    base = inputs[case["base"]] if case["base"] else None
    others = [inputs[n] for n in case["inputs"] if n != case["base"]]
    per_source = [{k: v[i] for k, v in params.items() if isinstance(v, list)} for i in range(len(others))]
    merge_wide = {k: v for k, v in params.items() if not isinstance(v, list)}
    out = merge_tensors(case["method"], others, per_source, merge_wide, base=base)
    assert (out - expected[case["case"]]).abs().max().item() <= 1e-6
