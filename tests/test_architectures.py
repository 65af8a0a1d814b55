"""Every architecture people merge: each tensor's place read from the model's own module tree, every method merges,
role-filtered and layer-gradient recipes change exactly their tensors, the search binds and runs wherever an
evaluator fits, and the rest is refused in one line."""

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from test_methods import example  # the per-method parameters that change the base
from tiny_archs import ARCHS, CAUSAL, LAYERS, TOWERS, expected, make_family

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.engine import Engine, write_merged
from evomerge.layers import Layout
from evomerge.methods import METHODS
from evomerge.recipe import Recipe
from evomerge.vocabulary import vocabulary_tables

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.fixture(scope="module")
def zoo_tokenizer(small_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(json.loads((small_zoo / "manifest.json").read_text())["base"])


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory, zoo_tokenizer):
    arch = request.param
    base, sources = make_family(tmp_path_factory.mktemp(arch), arch, zoo_tokenizer)
    return arch, base, sources


def names_of(model_dir) -> list[str]:
    return Checkpoint.open(model_dir).tensor_names()


def test_every_tensor_is_placed_by_the_module_tree(family, caplog):
    arch, base, _ = family
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        layout = Layout.of(base, names_of(base))
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # nothing fell back to name patterns
    wrong = {
        n: ((i.tower, i.layer, i.group, i.part), expected(arch, n))
        for n, i in layout.infos.items()
        if (i.tower, i.layer, i.group, i.part) != expected(arch, n)
    }
    assert not wrong
    assert layout.towers == TOWERS.get(arch, {None: LAYERS})
    for info in layout.infos.values():
        if info.layer is not None:
            assert info.depth == layout.towers[info.tower]


def test_the_token_indexed_tables_are_the_models_own_embeddings(family):
    """What a tokenizer_source remaps: the tensors holding one row per token (input and output embeddings), from
    transformers' get_input_embeddings / get_output_embeddings; vision models have none."""
    arch, base, _ = family
    ckpt = Checkpoint.open(base)
    vocab = ckpt.config.get("vocab_size") or (ckpt.config.get("text_config") or {}).get("vocab_size")
    rows_per_token = {n for n in ckpt.tensor_names() if vocab and ckpt.shape(n) and ckpt.shape(n)[0] == vocab}
    assert vocabulary_tables(base, ckpt.tensor_names()) == {n: 0 for n in rows_per_token}
    assert bool(rows_per_token) == (arch not in ("vit", "clip_vision"))


def test_every_method_merges(family):
    arch, base, sources = family
    engine = Engine(base, sources)
    for method, spec in METHODS.items():
        n, per_source, merge_wide = example(method)
        recipe = Recipe.from_dict(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": ([{"model": str(base), "parameters": {"weight": 0.0}}] if spec.family == "linear" else [])
                + [{"model": str(s), "parameters": p} for s, p in zip(sources[:n], per_source)],
                "parameters": merge_wide,
            }
        )
        merged = engine.merged(recipe)
        assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point()), method
        assert any(not torch.equal(merged[k], engine.base[k]) for k in merged), f"{method} changed nothing"


def test_a_role_filter_and_a_layer_gradient_change_exactly_their_tensors(family):
    arch, base, sources = family
    engine = Engine(base, sources[:1])
    delta = {k: v[0] for k, v in engine.deltas.items()}

    def merged(weight) -> dict[str, torch.Tensor]:
        return engine.merged(
            Recipe.from_dict(
                {
                    "merge_method": "task_arithmetic",
                    "base_model": str(base),
                    "models": [{"model": str(sources[0]), "parameters": {"weight": weight}}],
                }
            )
        )

    def changed(out) -> set[str]:
        return {k for k in out if not torch.equal(out[k], engine.base[k])}

    roles = {n: expected(arch, n) for n in engine.names}
    assert changed(merged([{"filter": "mlp", "value": 1.0}, {"value": 0.0}])) == {
        n for n, e in roles.items() if e[2] == "mlp"
    }
    assert changed(merged([{"filter": "attn", "value": 1.0}, {"value": 0.0}])) == {
        n for n, e in roles.items() if e[2] == "attn"
    }
    if arch in ("mixtral", "qwen3_moe"):
        for part in ("experts", "router"):
            assert changed(merged([{"filter": part, "value": 1.0}, {"value": 0.0}])) == {
                n for n, e in roles.items() if e[3] == part
            }
    towers = TOWERS.get(arch, {None: LAYERS})
    for tower in towers if len(towers) > 1 else ():
        assert changed(merged([{"tower": tower, "value": 1.0}, {"value": 0.0}])) == {
            n for n, e in roles.items() if e[0] == tower
        }
    out = merged([0.0, 1.0])  # each tower's layer i at i/(L−1) of its own depth; outside the layers at 0
    for n, (tower, layer, _, _) in roles.items():
        t = layer / (towers[tower] - 1) if layer is not None else 0.0
        assert torch.allclose(out[n], engine.base[n] + t * delta[n], atol=1e-6), n


def classify_task(root, arch, tokenizer) -> dict:
    """A small classification task for a classifier family: texts (RoBERTa) or 16×16 images (ViT), 3 classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("search", 24), ("select", 12), ("test", 12)):
        labels = rng.integers(0, 3, n)
        if arch == "vit":
            files[split] = str(root / f"{split}.npz")
            np.savez(files[split], images=rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), labels=labels)
        else:
            files[split] = str(root / f"{split}.jsonl")
            lines = [
                json.dumps({"text": f"{rng.integers(0, 99)}+{rng.integers(0, 9)}=", "label": int(y)}) for y in labels
            ]
            (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {"name": "cls", "kind": "classify", "files": files}


def forward_inputs(arch, tokenizer) -> dict:
    ids = torch.tensor([tokenizer("12+3=").input_ids])
    if arch == "vit":
        return {"pixel_values": torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    if arch in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [*CAUSAL, "t5", "bart", "roberta", "vit"])
def test_the_search_binds_and_runs_three_trials(arch, small_zoo, zoo_tokenizer, tmp_path):
    """Renamed (Gemma-3, GPT-NeoX, ViT) and fused (MoE experts) parameters included, under each evaluator (causal LM,
    seq2seq generation, text and image classification): the candidate written into the resident model gives the
    outputs of the same recipe merged to disk and loaded by transformers."""
    from evomerge.evaluate.heads import load_model, model_head
    from evomerge.evaluate.tasks import load_specs
    from evomerge.search import loop

    base, sources = make_family(tmp_path / "models", arch, zoo_tokenizer)
    if arch in ("roberta", "vit"):
        (tmp_path / "task").mkdir()
        tasks = [classify_task(tmp_path / "task", arch, zoo_tokenizer)]
    else:
        tasks = [s.to_dict() for s in load_specs(small_zoo, ["math_a" if arch in ("t5", "bart") else "facts_a"])]
    cfg = loop.SearchConfig(
        name="arch",
        space=yaml.safe_load((SPACES / "sakana_ps.yaml").read_text()),
        base=str(base),
        sources=[str(s) for s in sources],
        tasks=tasks,
        trials=3,
        popsize=3,
        runs_dir=str(tmp_path / "runs"),
        baselines=False,
    )
    loop.run_search(cfg, test_report=False)
    assert len(list((tmp_path / "runs" / "arch").glob("trials.csv"))) == 1
    recipe = Recipe.load(tmp_path / "runs" / "arch" / "best_recipe.yaml")
    engine = Engine(base, sources)
    resident = engine.load_target_model()
    engine.materialize(recipe, engine.bind(resident))
    write_merged(recipe, tmp_path / "merged")
    loaded = load_model(tmp_path / "merged", model_head(base)).eval()
    inputs = forward_inputs(arch, zoo_tokenizer)
    with torch.no_grad():
        assert torch.allclose(resident(**inputs).logits, loaded(**inputs).logits, atol=1e-5)


@pytest.mark.parametrize(
    "arch, why",
    [
        ("bert", "not a causal language model, seq2seq model or classifier"),
        ("clip_vision", "not a causal language model, seq2seq model or classifier"),
        ("t5", "cannot score task(s) facts_a (multiple_choice)"),
        ("roberta", "cannot score task(s) math_a (generate)"),
        ("vit", "cannot score task(s) math_a (generate)"),
    ],
)
def test_models_without_an_evaluator_for_the_tasks_are_refused_in_one_line(
    arch, why, small_zoo, zoo_tokenizer, tmp_path, capsys
):
    base, sources = make_family(tmp_path / "models", arch, zoo_tokenizer, n_sources=1)
    runs = str(tmp_path / "runs")
    for args in (
        ["eval", str(base), "--tasks", str(small_zoo)],
        ["search", "--base", str(base), "--sources", str(sources[0]), "--tasks", str(small_zoo), "--runs-dir", runs],
        ["soup", str(base), str(sources[0]), "--tasks", str(small_zoo), "--out", str(tmp_path / "soup")],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "soup").exists()


@pytest.mark.parametrize("arch", ["t5", "gemma3"])
def test_layer_genes_and_knots_are_per_tower(arch, zoo_tokenizer, tmp_path):
    from evomerge.space import SearchSpace

    base, sources = make_family(tmp_path, arch, zoo_tokenizer, n_sources=1)
    layout = Layout.of(base, names_of(base))
    towers = TOWERS[arch]
    per_layer = yaml.safe_load((SPACES / "sakana_ps.yaml").read_text())
    space = SearchSpace.model_validate(per_layer).bind(str(base), [str(sources[0])], layout)
    layer_groups = {g.name for g in space.groups if g.layers is not None}
    assert layer_groups == {f"{t}.L{i}" for t, depth in towers.items() for i in range(depth)}
    second = list(towers)[1]
    params = {g.name: 0.2 for g in space.genes}
    params[f"weight[{sources[0].name}]@{second}.L1"] = 0.9
    recipe = space.decode(params)
    for name, info in layout.infos.items():
        weight = recipe.plan(info).source_params[0]["weight"]
        assert weight == pytest.approx(0.9 if (info.tower, info.layer) == (second, 1) else 0.2), name

    knots = dict(per_layer, granularity="knots", knots=2)
    space = SearchSpace.model_validate(knots).bind(str(base), [str(sources[0])], layout)
    params = {g.name: 0.0 for g in space.genes}
    params[f"weight[{sources[0].name}]@{second}.K1"] = 1.0  # the second tower's last layer
    recipe = space.decode(params)
    for name, info in layout.infos.items():
        t = info.layer / (towers[info.tower] - 1) if info.layer is not None and info.tower == second else 0.0
        assert recipe.plan(info).source_params[0]["weight"] == pytest.approx(t), name


def test_a_model_transformers_does_not_know_is_placed_by_name_with_a_warning(llama_family, tmp_path, caplog):
    import shutil

    base, _ = llama_family
    odd = tmp_path / "odd"
    shutil.copytree(base, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["NoSuchModel"], "model_type": "nosuch"}))
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        layout = Layout.of(odd, names_of(odd))
    assert "module tree could not be built" in caplog.text
    assert layout["model.layers.1.mlp.up_proj.weight"].layer == 1 and layout.num_layers == 2


def test_a_role_filter_that_mergekit_would_read_otherwise_is_named(zoo_tokenizer, tmp_path, caplog):
    """Qwen3's q/k norms sit in `self_attn`: mergekit's substring `attn` takes them, the role attn does not."""
    for arch, differs in (("llama", False), ("qwen3", True)):
        base, sources = make_family(tmp_path / arch, arch, zoo_tokenizer, n_sources=1)
        recipe = Recipe.from_dict(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [
                    {
                        "model": str(sources[0]),
                        "parameters": {"weight": [{"filter": "attn", "value": 1.0}, {"value": 0.5}]},
                    }
                ],
            }
        )
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="evomerge"):
            write_merged(recipe, tmp_path / f"{arch}-merged")
        assert ("write 'name:attn' for mergekit's reading" in caplog.text) == differs, caplog.text


def test_a_tree_that_cannot_be_read_falls_back_to_names_with_a_warning(llama_family, monkeypatch, caplog):
    from evomerge import layers, names

    def broken(model, views=True):
        raise names.CheckpointError("no strided view")

    base, _ = llama_family
    layers._structure.cache_clear()
    monkeypatch.setattr(names, "checkpoint_pieces", broken)
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        layout = Layout.of(base, names_of(base))
    layers._structure.cache_clear()
    assert "the module tree could not be read (CheckpointError: no strided view)" in caplog.text
    assert layout["model.layers.1.self_attn.q_proj.weight"].group == "attn" and layout.num_layers == 2


def test_moe_experts_and_router_get_genes_of_their_own(zoo_tokenizer, tmp_path):
    from evomerge.space import SearchSpace

    base, sources = make_family(tmp_path, "mixtral", zoo_tokenizer, n_sources=1)
    layout = Layout.of(base, names_of(base))
    space = yaml.safe_load((SPACES / "sakana_ps.yaml").read_text())
    space = SearchSpace.model_validate({**space, "filters": ["experts", "router"]})
    bound = space.bind(str(base), [str(sources[0])], layout)
    src = sources[0].name
    params = {g.name: 0.5 for g in bound.genes}
    params |= {f"weight[{src}]@L1.experts": 0.9, f"weight[{src}]@L1.router": 0.1}
    recipe = bound.decode(params)
    for name, info in layout.infos.items():
        want = {"experts": 0.9, "router": 0.1}.get(info.part, 0.5) if info.layer == 1 else 0.5
        assert recipe.plan(info).source_params[0]["weight"] == pytest.approx(want), name


def test_a_tower_the_model_does_not_have_is_refused_in_one_line(zoo_tokenizer, tmp_path, capsys):
    base, sources = make_family(tmp_path / "t5", "t5", zoo_tokenizer, n_sources=1)
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": str(sources[0]), "parameters": {"weight": [{"tower": "decoer", "value": 1.0}, {"value": 0}]}}
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "tower(s) ['decoer'] not in this model; its towers: decoder, encoder" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
