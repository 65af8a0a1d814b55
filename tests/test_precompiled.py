"""One-off CPU merges run the fused kernels built ahead of time (AOTInductor), loaded without dynamo."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from evomerge.methods import fast, fused, merge_deltas, precompiled

PARAMS = {
    "ties": [{"weight": 0.6, "density": 0.4}, {"weight": 0.8, "density": 0.7}],
    "dare_ties": [{"weight": 0.6, "density": 0.4}, {"weight": 0.8, "density": 0.7}],
}


def inputs(n: int = 6000):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, generator=g), [torch.randn(n, generator=g) * 0.01 for _ in range(2)]


def one_off(method: str, base, deltas) -> torch.Tensor:
    with fast.one_shot(entries=1 << 40):  # as `evomerge merge` of a model large enough to compile for
        return merge_deltas(method, base, deltas, PARAMS[method], seed=4, key="w")


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """Packages built into an empty folder, so none comes from an earlier run; compiled code for tensors of
    4K entries and up."""
    monkeypatch.setattr(precompiled, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(precompiled, "_loaded", {})
    monkeypatch.setattr(fused, "COMPILE_MIN_NUMEL", 1 << 12)
    monkeypatch.setattr(fused, "_dynamo_kernels", {})
    monkeypatch.setattr(fused, "_aot_failed", set())
    monkeypatch.setattr(fused, "_ran", set())
    monkeypatch.setattr(fused, "_compile_failed", False)
    monkeypatch.setenv("EVOMERGE_COMPILE", "auto")
    return tmp_path


def eager(method: str, base, deltas, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("EVOMERGE_COMPILE", "off")
    try:
        return one_off(method, base, deltas)
    finally:
        monkeypatch.setenv("EVOMERGE_COMPILE", "auto")


@pytest.mark.slow
def test_one_off_merges_build_kernels_once_then_load_them_without_dynamo(kernels, monkeypatch):
    base, deltas = inputs()
    built = {}
    for method in ("ties", "dare_ties"):  # TIES: the merge; DARE-TIES: its kept-norm pass and its merge
        got = one_off(method, base, deltas)
        torch.testing.assert_close(got, eager(method, base, deltas, monkeypatch), rtol=1e-6, atol=1e-7)
        built[method] = sorted(p.name for p in kernels.glob("*.pt2"))
    assert not fused._compile_failed and not fused._aot_failed and not fused._dynamo_kernels
    assert len(built["ties"]) == 1 and len(built["dare_ties"]) == 3
    assert not list(kernels.glob(".partial-*")), "a build left its temporary file"

    # another size, another process: the same packages, loaded, not built again, and dynamo never imported
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        import torch
        from evomerge.methods import fast, fused, merge_deltas, precompiled
        precompiled.cache_dir = lambda: Path({str(kernels)!r})
        precompiled._build = None  # building would fail
        fused.COMPILE_MIN_NUMEL = 1 << 12
        base, delta = torch.randn(9000), [torch.randn(9000) * 0.01 for _ in range(2)]
        with fast.one_shot(entries=1 << 40):
            for method, params in {PARAMS!r}.items():
                merge_deltas(method, base, delta, params, seed=4, key="w")
        print(len(fused._ran), bool(fused._aot_failed), fused._compile_failed, "torch._dynamo" in sys.modules)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "EVOMERGE_COMPILE": "auto"},
        check=False,
    )
    assert run.stdout.split() == ["3", "False", "False", "False"], run.stdout + run.stderr
    assert sorted(p.name for p in kernels.glob("*.pt2")) == built["dare_ties"]


def test_a_kernel_that_cannot_be_built_ahead_runs_through_torch_compile(kernels, monkeypatch):
    def cannot(*_args):
        raise RuntimeError("export does not support this")

    monkeypatch.setattr(precompiled, "_build", cannot)
    monkeypatch.setattr(fused, "_compile", lambda body: body)  # "compiled": the body itself, to see it called
    base, deltas = inputs()
    got = one_off("ties", base, deltas)
    assert [key[0] for key in fused._aot_failed] == ["merge"] and list(fused._dynamo_kernels) == list(fused._aot_failed)
    assert not fused._compile_failed
    torch.testing.assert_close(got, eager("ties", base, deltas, monkeypatch), rtol=1e-6, atol=1e-7)


def test_packages_are_keyed_by_what_their_code_depends_on(tmp_path, monkeypatch):
    monkeypatch.setattr(precompiled, "cache_dir", lambda: tmp_path)
    body = fused._merge_kernel(("magnitude",) * 2, True, True, torch.float32)
    key = ("merge", ("magnitude",) * 2)

    def path(*args):
        flat, layout = precompiled._flatten(args)
        return precompiled._package_path(key, body, flat, layout)

    a, b = torch.zeros(100), torch.zeros(7)
    fp = torch.zeros(2, 4)
    same = path(a, a, [a, a], fp)
    assert path(b, b, [b, b], fp) == same  # any length of the 1-D tensors: one dynamic size
    assert path(a, a, [a, a, a], fp) != same  # the number of sources
    assert path(a, a, [a, a.bfloat16()], fp) != same  # a dtype
    assert path(a, a, [a, a], torch.zeros(3, 4)) != same  # the shape of a parameter table
    one = torch.zeros(1)
    assert path(one, one, [one, one], fp) != same  # a length of 1 is a fixed size, not the dynamic one
    assert precompiled._package_path(("kept_l1",) + key[1:], body, *precompiled._flatten((a, a, [a, a], fp))) != same
    with pytest.raises(TypeError):
        precompiled._flatten((a, 3))
    with pytest.raises(TypeError, match="contiguous"):
        precompiled.call(key, body, (torch.zeros(4, 4).t(),))
