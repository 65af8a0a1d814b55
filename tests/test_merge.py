import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.engine import Engine
from evomerge.methods import METHODS
from evomerge.recipe import Recipe


def recipe_dict(base, fts, method="dare_ties", **params):
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(d), "parameters": {"weight": [0.3, 0.7], "density": 0.6}} for d in fts],
        "parameters": params,
        "dtype": "float32",
        "seed": 7,
    }


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_cli_output_loads_in_transformers_and_matches_engine(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, fts = llama_family
    rpath = write_yaml(tmp_path / "r.yaml", recipe_dict(base, fts))
    out = tmp_path / "merged"
    assert main(["merge", str(rpath), "--out", str(out), "--max-shard-size", "0.00002"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("12+3=", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 4)
    assert "dare_ties" in (out / "README.md").read_text()
    # the streaming writer and the resident engine produce the same weights
    engine = Engine(base, fts)
    merged = engine.merged(Recipe.load(rpath))
    written = Checkpoint.open(out)
    for name in engine.names:
        assert torch.allclose(written.get(name), merged[name], atol=1e-6), name


def test_engine_writes_candidates_in_place_into_one_model(llama_family):
    base, fts = llama_family
    engine = Engine(base, fts)
    assert not engine.base_ckpt._handles and not any(
        c._handles for c in engine.source_ckpts
    )  # files unmapped once resident
    model = engine.load_target_model()
    target = engine.bind(model)
    ptrs = {n: t.data_ptr() for n, t in target.items()}
    r1 = Recipe.from_dict(recipe_dict(base, fts, method="ties"))
    r2 = Recipe.from_dict(recipe_dict(base, fts, method="task_arithmetic"))
    engine.materialize(r1, target)
    first = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    engine.materialize(r2, target)
    assert {n: t.data_ptr() for n, t in target.items()} == ptrs
    assert not torch.equal(first, model.model.layers[0].mlp.up_proj.weight)
    expected = engine.merged(r2)["model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, expected)


def test_della_candidates_of_a_search_equal_a_fresh_engines_merge(llama_family):
    """From the second candidate with the same ε, the resident engine's DELLA reads margin codes instead of
    rank fractions; every candidate must still be what a fresh engine (first sight: fractions) merges."""
    from evomerge.methods import fused

    base, fts = llama_family
    engine = Engine(base, fts)
    model = engine.load_target_model()
    target = engine.bind(model)
    for density in (0.5, 0.7, 0.4):
        data = recipe_dict(base, fts, method="della")
        for m in data["models"]:
            m["parameters"] = {"weight": [0.3, 0.7], "density": density, "epsilon": 0.1}
        recipe = Recipe.from_dict(data)
        engine.materialize(recipe, target)
        expected = Engine(base, fts).merged(recipe)
        state = model.state_dict()
        for name in engine.names:
            assert torch.equal(state[name], expected[name]), (density, name)
    assert any(fused._della_state(d)["coded_for"] is not None for ds in engine.deltas.values() for d in ds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "task_arithmetic"])
def test_cuda_engine_materializes_what_the_cpu_engine_does(llama_family, method):
    """A search on the GPU: task vectors resident there, candidates written into a target model there that
    runs a forward pass, with the CPU engine's weights."""
    base, fts = llama_family
    recipe = Recipe.from_dict(recipe_dict(base, fts, method=method))
    gpu = Engine(base, fts, device="cuda")
    assert all(t.is_cuda for t in gpu.base.values()) and all(d.is_cuda for ds in gpu.deltas.values() for d in ds)
    model = gpu.load_target_model()
    gpu.materialize(recipe, gpu.bind(model))
    expected = Engine(base, fts).merged(recipe)
    state = model.state_dict()
    for name in gpu.names:
        torch.testing.assert_close(state[name].cpu(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2, 7]], device="cuda")).logits
    assert logits.is_cuda and torch.isfinite(logits).all()


def test_target_model_is_the_base_built_from_resident_tensors(llama_family):
    """The target is filled from the engine's base tensors (no second read or mapping of the base file) and
    computes what from_pretrained's model computes."""
    from transformers import AutoModelForCausalLM

    base, fts = llama_family
    engine = Engine(base, fts)
    model = engine.load_target_model()
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: no parameter lives in a mapping of the base's files
        ranges = [
            [int(x, 16) for x in line.split()[0].split("-")]
            for line in maps.read_text().splitlines()
            if str(Path(base).resolve()) in line
        ]
        assert not [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert model.generation_config.to_dict() == reference.generation_config.to_dict()


def test_non_finite_source_fails_with_tensor_name_and_writes_nothing(tmp_path, llama_family, capsys):
    base, fts = llama_family
    bad = tmp_path / "bad"
    shutil.copytree(fts[0], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    rpath = write_yaml(tmp_path / "r.yaml", recipe_dict(base, [bad, fts[1]]))
    out = tmp_path / "out"
    assert main(["merge", str(rpath), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight" in err and "non-finite" in err and "bad" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "r.yaml"]


def test_merge_cli_reports_shape_mismatch_and_exits_nonzero(tmp_path, llama_family, capsys):
    base, fts = llama_family
    bad = tmp_path / "bad"
    shutil.copytree(fts[0], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    rpath = write_yaml(tmp_path / "r.yaml", recipe_dict(base, [bad]))
    assert main(["merge", str(rpath), "--out", str(tmp_path / "out")]) == 2
    assert "lm_head.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_linear_without_base_and_bf16_output(tmp_path, llama_family):
    base, fts = llama_family
    data = {
        "merge_method": "linear",
        "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in fts[:2]],
        "dtype": "float32",
    }
    rpath = write_yaml(tmp_path / "r.yaml", data)
    out = tmp_path / "soup"
    assert main(["merge", str(rpath), "--out", str(out), "--dtype", "bfloat16"]) == 0
    got = Checkpoint.open(out).get("model.norm.weight")
    a, b = (Checkpoint.open(d).get("model.norm.weight") for d in fts[:2])
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), (a + b) / 2, atol=1e-2)


def test_export_mergekit_cli(tmp_path, llama_family, capsys):
    base, fts = llama_family
    rpath = write_yaml(tmp_path / "r.yaml", recipe_dict(base, fts, method="ties"))
    assert main(["export-mergekit", str(rpath)]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == str(base)
    assert cfg["models"][0]["parameters"]["density"] == 0.6
    assert Recipe.from_dict(cfg).plan("model.layers.1.mlp.up_proj.weight", 2) == Recipe.load(rpath).plan(
        "model.layers.1.mlp.up_proj.weight", 2
    )


def test_missing_recipe_file_is_a_clean_error(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_models_stored_in_different_dtypes_merge_in_the_one_that_holds_them_all(tmp_path, llama_family, caplog):
    base, fts = llama_family
    stored = {}
    for d, dtype in zip(fts[:2], (torch.bfloat16, torch.float16)):
        copy = tmp_path / f"{d.name}-{str(dtype).removeprefix('torch.')}"
        shutil.copytree(d, copy)
        tensors = load_file(copy / "model.safetensors")
        save_file({k: v.to(dtype) for k, v in tensors.items()}, copy / "model.safetensors", metadata={"format": "pt"})
        stored[copy] = dtype
    bf16, fp16 = stored
    for models, want in (([bf16, bf16], torch.bfloat16), ([bf16, fp16], torch.float32)):
        recipe = {
            "merge_method": "linear",
            "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        }
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        caplog.clear()
        assert main(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), "--out", str(out)]) == 0
        got = Checkpoint.open(out).get("model.norm.weight")
        assert got.dtype == want
        card = (out / "README.md").read_text()
        if want == torch.float32:  # bf16 + fp16: neither holds the other; both are exact in float32
            sources = [Checkpoint.open(m).get("model.norm.weight").float() for m in models]
            assert torch.equal(got, (sources[0] + sources[1]) / 2)
            note = f"({bf16.name} bfloat16, {fp16.name} float16): merged in float32, written in float32"
            assert note in card and note in caplog.text
        else:
            assert "different dtypes" not in card and "different dtypes" not in caplog.text


@pytest.mark.parametrize(
    "method, params",
    [
        ("nuslerp", {}),
        ("multislerp", {}),
        ("karcher", {}),
        ("sce", {"select_topk": 0.5}),
        ("nearswap", {"t": 0.01}),
        ("arcee_fusion", {}),
        ("ram", {"epsilon": 0.01}),
        ("ramplus_tl", {"epsilon": 0.01, "r": 0.5}),
    ],
)
def test_the_engine_merges_the_newer_mergekit_methods_as_merge_writes_them(tmp_path, llama_family, method, params):
    base, fts = llama_family
    n = {"nuslerp": 2, "nearswap": 1, "arcee_fusion": 1}.get(method, len(fts))
    weighted = "weight" in METHODS[method].source_params
    models = [{"model": str(d), "parameters": {"weight": 0.3 + i} if weighted else {}} for i, d in enumerate(fts[:n])]
    data = {"merge_method": method, "base_model": str(base), "models": models, "parameters": params}
    engine = Engine(base, fts[:n])
    in_memory = engine.merged(Recipe.from_dict(data))
    assert main(["merge", str(write_yaml(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "out")]) == 0
    written = Checkpoint.open(tmp_path / "out")
    changed = 0
    for name, tensor in in_memory.items():
        torch.testing.assert_close(tensor, written.get(name), rtol=0, atol=1e-6, msg=name)
        changed += not torch.equal(tensor, engine.base[name])
    assert changed > len(in_memory) // 2


def test_a_chat_template_as_mergekit_sets_it_jinja_or_the_models_most_common(tmp_path, llama_family, capsys):
    from transformers import AutoTokenizer

    base, fts = llama_family
    models = []
    for i, template in enumerate(["{{ 'A' }}", "{{ 'B' }}", "{{ 'B' }}"]):  # base, then two fine-tunes
        copy = tmp_path / f"m{i}"
        shutil.copytree(base if i == 0 else fts[i - 1], copy)
        (copy / "chat_template.jinja").write_text(template)
        models.append(copy)
    recipe = recipe_dict(models[0], models[1:], method="task_arithmetic")
    for given, want in (("{% for m in messages %}{{ m['content'] }}{% endfor %}", None), ("auto", "{{ 'B' }}")):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        path = write_yaml(tmp_path / "r.yaml", {**recipe, "chat_template": given})
        assert main(["merge", str(path), "--out", str(out)]) == 0
        assert AutoTokenizer.from_pretrained(out).chat_template == (want or given)
    path = write_yaml(tmp_path / "r.yaml", {**recipe, "chat_template": "chatml"})
    assert main(["merge", str(path), "--out", str(tmp_path / "named")]) == 2
    assert "give the template's Jinja text or 'auto'" in capsys.readouterr().err
    assert not (tmp_path / "named").exists()


def test_a_tokens_entry_naming_a_token_the_model_lacks_is_one_line(tmp_path, llama_family, capsys):
    base, fts = llama_family
    recipe = recipe_dict(base, fts, method="task_arithmetic")
    recipe["tokenizer"] = {
        "source": "union",
        "tokens": {"<new>": {"source": {"kind": "model_token", "model": str(base), "token": "<nope>"}}},
    }
    assert main(["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'<nope>' is not in" in err[0]
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_finite_check_clears_large_finite_weights_and_catches_nan_and_inf(dtype):
    from evomerge.checkpoint import CheckpointError, check_finite

    big = torch.full((1000,), 3e38 if dtype != torch.float64 else 1e300, dtype=dtype)  # its fp32 sum overflows
    check_finite("w", big, "f")
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(1000, dtype=dtype)
        t[537] = bad
        with pytest.raises(CheckpointError, match="1 non-finite"):
            check_finite("w", t, "f")
