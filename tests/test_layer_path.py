"""Layer paths (data-flow-space merging): in-memory paths, folding scales into a checkpoint, mergekit export, the DFS
genome and the PS+DFS search."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.errors import RecipeError
from evomerge.layer_path import LayerPaths, PathRecipe, load_any_recipe, load_participants
from evomerge.path_fold import path_to_mergekit, residual_writers
from evomerge.path_space import PathSpace, load_space
from evomerge.zoo.tokenizer import build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[3, 5, 7, 9, 11, 4, 6, 8], [12, 2, 14, 3, 3, 9, 1, 5]])


def tiny(kind: str, hidden: int = 32, layers: int = 3):
    tok = build_char_tokenizer("abcdefghijklmnopqrstuvwxyz0123456789 +-=?")
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    if kind == "llama":
        cfg = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            eos_token_id=tok.eos_token_id,
            **common,
        )
        return LlamaForCausalLM(cfg), tok
    if kind == "gpt2":
        cfg = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, eos_token_id=tok.eos_token_id, **common
        )
        return GPT2LMHeadModel(cfg), tok
    cfg = OPTConfig(  # post-norm (OPT-350m style): the residual stream is normalized after each block
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        word_embed_proj_dim=hidden,
        max_position_embeddings=64,
        do_layer_norm_before=False,
        eos_token_id=tok.eos_token_id,
        **common,
    )
    return OPTForCausalLM(cfg), tok


def family(root: Path, kind: str = "llama", n: int = 2, **kw) -> list[Path]:
    """Fine-tune-like participants of one architecture, their embeddings at a trained model's scale (a random
    init's embeddings are ~0.02, where the norms' ε is no longer negligible)."""
    torch.manual_seed(0)
    base, tok = tiny(kind, **kw)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(50)
    dirs = []
    for i in range(n):
        model, _ = tiny(kind, **kw)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        d = root / f"{kind}{i}"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    return family(tmp_path_factory.mktemp("llamas"))


def recipe(dirs, steps, **kw) -> PathRecipe:
    return PathRecipe.from_dict(
        {
            "models": [{"model": str(d)} for d in dirs],
            "layer_path": [{"model": p, "layer": i, "scale": s} for p, i, s in steps],
            **kw,
        }
    )


def resident(dirs):
    r = recipe(dirs, [(0, 0, 1.0)])
    return LayerPaths(load_participants(r), [p.label for p in r.models])


def test_a_path_of_a_models_own_layers_is_that_model_bit_for_bit(llamas):
    paths = resident(llamas)
    host, own = paths.use(paths.identity(0)), paths.participants[0]
    with torch.no_grad():
        assert torch.equal(host(input_ids=TOKENS).logits, own(input_ids=TOKENS).logits)
        assert torch.equal(
            host.generate(TOKENS, max_new_tokens=5, do_sample=False),
            own.generate(TOKENS, max_new_tokens=5, do_sample=False),
        )
    assert host.config.num_hidden_layers == 3 and own.config is not host.config


def test_a_repeated_layer_keeps_its_own_kv_cache_entry(llamas, tmp_path):
    """Cached and uncached greedy decoding agree on a path that runs layers twice, in HF generate and in the native
    evaluator (which decodes with the cache)."""
    from transformers import AutoTokenizer

    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import TaskSpec, load_task

    paths = resident(llamas)
    host = paths.use([(0, 0, 1.0), (1, 1, 1.3), (0, 1, 1.0), (1, 1, 0.7), (0, 2, 1.0), (0, 2, 1.0)])
    assert host.config.num_hidden_layers == 6
    with torch.no_grad():
        cached = host.generate(TOKENS, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = host.generate(TOKENS, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

    tok = AutoTokenizer.from_pretrained(llamas[0])
    prompts = ["abc", "hello world", "1+2=", "zz"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
    spec = TaskSpec.from_dict(
        {"name": "t", "kind": "generate", "files": {"search": str(tmp_path / "t.jsonl")}, "max_new_tokens": 6}
    )
    task = load_task(spec, "search")
    native = NativeEvaluator(host, tok, [task], batch_size=4).generate(task)
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = host.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, eos_token_id=None)
        assert native[i] == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_lm_eval_scores_a_repeated_layer_path_as_the_native_evaluator_does(llamas, tmp_path):
    """lm-eval generates through HF generate with the cache: on a path that runs layers twice its answers must be
    the native evaluator's. Half the answers are the path's own greedy output, half are not."""
    from transformers import AutoTokenizer

    from evomerge.evaluate.evaluator import Evaluator, with_twins
    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import TaskSpec, load_task

    host = resident(llamas).use([(0, 0, 1.0), (1, 1, 1.3), (0, 1, 1.0), (1, 1, 0.7), (0, 2, 1.0)])
    tok = AutoTokenizer.from_pretrained(llamas[0])
    prompts = ["abc", "hello world", "1+2=", "zz", "the cat", "9-4=", "q", "xyz xyz"]
    spec = {"name": "echo", "kind": "generate", "max_new_tokens": 4, "stop": ["\n"], "metric": "exact_match"}
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "-"}) + "\n" for p in prompts))
    probe = load_task(TaskSpec.from_dict({**spec, "files": {"search": str(tmp_path / "p.jsonl")}}), "search")
    outputs = NativeEvaluator(host, tok, [probe], batch_size=8).generate(probe)
    rows = [{"prompt": p, "answer": outputs[i] if i % 2 == 0 else "no"} for i, p in enumerate(prompts)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = str(tmp_path / "t.jsonl")
    spec = TaskSpec.from_dict({**spec, "files": {"search": t, "test": t}})
    per_item = {}
    for mode in ("native", "lm-eval"):
        task = load_task(with_twins([spec], mode)[0], "search")
        per_item[mode] = Evaluator(host, tok, [task], 4, mode).evaluate().per_item[task.name]
    assert per_item["native"] == per_item["lm-eval"]
    assert sum(per_item["native"].values()) == 4 and all(v == 1.0 for i, v in per_item["native"].items() if i % 2 == 0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_writes_a_path_whose_logits_equal_the_in_memory_path(kind, tmp_path):
    dirs = family(tmp_path, kind)
    steps = [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.6), (0, 1, 0.6), (1, 0, 1.0), (1, 2, 1.25), (0, 2, 1.0)]
    r = recipe(dirs, steps)
    r.save(tmp_path / "path.yaml")
    assert main(["merge", str(tmp_path / "path.yaml"), "--out", str(tmp_path / "out")]) == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # no custom code
    assert written.config.num_hidden_layers == len(steps)
    host = resident(dirs).use(steps)
    with torch.no_grad():
        want, got = host(input_ids=TOKENS).logits, written(input_ids=TOKENS).logits
    assert float((got - want).norm() / want.norm()) <= 1e-4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Layer path" in card and "layer_path" in card


def test_mergekit_passthrough_slices_import_as_a_path_with_the_last_slices_head(llamas, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llamas[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(llamas[1]), "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    }
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(config))
    assert main(["import-mergekit", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "path.yaml")]) == 0
    r = PathRecipe.from_dict(yaml.safe_load((tmp_path / "path.yaml").read_text()))
    assert r.steps() == [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (1, 2, 1.0)] and (r.embed_model, r.head) == (0, 1)
    assert main(["merge", str(tmp_path / "mk.yml"), "--out", str(tmp_path / "out")]) == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    paths = LayerPaths(load_participants(r), [p.label for p in r.models], 0, head=1)
    host = paths.use(r.steps())
    with torch.no_grad():
        assert torch.equal(written(input_ids=TOKENS).logits, host(input_ids=TOKENS).logits)
    assert (
        host.lm_head is paths.participants[1].lm_head
        and host.model.embed_tokens is paths.participants[0].model.embed_tokens
    )
    # mergekit's slice `scale` multiplies that slice's tensors (and the embeddings the first slice gives)
    config["slices"][0]["sources"][0]["parameters"] = {"scale": 0.5}
    (tmp_path / "scaled.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "scaled.yml"), "--out", str(tmp_path / "out2")]) == 0
    plain, scaled = Checkpoint.open(tmp_path / "out"), Checkpoint.open(tmp_path / "out2")
    for n in plain.tensor_names():
        half = n.startswith(("model.layers.0.", "model.layers.1.", "model.embed_tokens."))
        assert torch.equal(scaled.get(n), plain.get(n) * (0.5 if half else 1.0)), n
    r = load_any_recipe(tmp_path / "scaled.yml")
    assert PathRecipe.from_mergekit(r.to_mergekit({})).tensor_scale == r.tensor_scale  # exported and read back


def test_residual_writers_are_measured_on_the_model(llamas, tmp_path):
    llama = load_participants(recipe(llamas, [(0, 0, 1.0)]))[0]
    assert residual_writers(llama, "model.layers") == {i: ["self_attn.o_proj", "mlp.down_proj"] for i in range(3)}
    gpt2 = load_participants(recipe(family(tmp_path, "gpt2", n=1), [(0, 0, 1.0)]))[0]
    assert residual_writers(gpt2, "transformer.h")[0] == ["attn.c_proj", "mlp.c_proj"]


def test_scales_are_refused_for_post_norm_layers_and_kept_for_unscaled_paths(tmp_path, capsys):
    dirs = family(tmp_path, "opt")
    r = recipe(dirs, [(0, 0, 1.0), (1, 1, 1.5), (0, 2, 1.0)])
    r.save(tmp_path / "scaled.yaml")
    assert main(["merge", str(tmp_path / "scaled.yaml"), "--out", str(tmp_path / "a")]) == 2
    assert "cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    recipe(dirs, [(0, 0, 1.0), (1, 1, 1.0), (0, 2, 1.0)]).save(tmp_path / "plain.yaml")
    assert main(["merge", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.num_hidden_layers == 3


def test_participants_of_other_architectures_are_refused(llamas, tmp_path, capsys):
    wide = family(tmp_path, "llama", n=1, hidden=48)[0].rename(tmp_path / "wide")
    recipe([llamas[0], wide], [(0, 0, 1.0), (1, 0, 1.0)]).save(tmp_path / "r.yaml")
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hidden_size" in err and "one architecture" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="names no layer"):
        resident(llamas).use([(0, 3, 1.0)])


def test_paths_export_as_mergekit_passthrough_slices(llamas):
    plain = recipe(llamas, [(0, 0, 1.0), (0, 1, 1.0), (1, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0)]).to_mergekit({})
    assert plain["merge_method"] == "passthrough"
    ranges = [(Path(s["sources"][0]["model"]).name, s["sources"][0]["layer_range"]) for s in plain["slices"]]
    assert ranges == [("llama0", [0, 2]), ("llama1", [1, 3]), ("llama0", [2, 3])]
    scaled = path_to_mergekit(recipe(llamas, [(0, 0, 1.0), (1, 1, 2.0), (0, 2, 1.0)]))
    scale = scaled["slices"][1]["sources"][0]["parameters"]["scale"]
    assert scale == [
        {"filter": "mlp.down_proj", "value": 0.5},
        {"filter": "self_attn.o_proj", "value": 0.5},
        {"value": 1.0},
    ]
    with pytest.raises(RecipeError, match="head from the last"):
        recipe(llamas, [(0, 0, 1.0), (1, 1, 1.0)]).to_mergekit({})


def test_the_dfs_genome_decodes_slots_in_order_with_model_pair_scales(llamas):
    space = load_space(ROOT / "search_spaces" / "sakana_dfs.yaml")
    space = space.model_copy(update={"participants": recipe(llamas, [(0, 0, 1.0)]).models})
    bound = space.bind([3, 3])
    assert bound.dim == 6 * 3 + 4  # T = M·r indicator genes, a scale per (from, to) model pair
    first = bound.decode(bound.initial())
    assert first.steps() == [(0, 0, 1.0), (0, 1, 1.0), (0, 2, 1.0)]  # the first participant's own layers
    params = {g.name: -1.0 for g in bound.genes if g.name.startswith("on@")}
    for t in (0, 1, 4, 7, 8, 15):  # global layers a0 a1 | b1 | a1 a2 (repetition 2) | b0 (repetition 3)
        params[f"on@{t}"] = 1.0
    a, b = "llama0", "llama1"
    params.update({f"scale@{a}>{a}": 1.0, f"scale@{a}>{b}": 1.1, f"scale@{b}>{a}": 1.2, f"scale@{b}>{b}": 1.3})
    steps = bound.decode(params).steps()
    assert [(p, i) for p, i, _ in steps] == [(0, 0), (0, 1), (1, 1), (0, 1), (0, 2), (1, 0)]
    assert [s for _, _, s in steps] == [1.0, 1.0, 1.1, 1.2, 1.0, 1.1]  # a1→a2 is a's own next layer: 1
    with pytest.raises(RecipeError, match="no slot"):
        bound.decode({g.name: -1.0 if g.name.startswith("on@") else 1.0 for g in bound.genes})
    pairs = space.model_copy(update={"dfs": space.dfs.model_copy(update={"scales": "pairs"})}).bind([3, 3])
    assert pairs.dim == 6 * 3 + 36  # the paper's M×M matrix


def test_ps_dfs_search_runs_resumes_and_merges(small_zoo, tmp_path, capsys):
    args = [
        "search",
        "--zoo",
        str(small_zoo),
        "--space",
        str(ROOT / "search_spaces" / "sakana_ps_dfs.yaml"),
        "--trials",
        "5",
        "--popsize",
        "3",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "pd",
    ]
    assert main(args) == 0
    assert_first_trial_is_the_start_point(tmp_path / "pd")  # cma: the PS merge's own path first
    report = json.loads((tmp_path / "pd" / "report.json").read_text())
    assert list(report["rows"]) == ["ps", "expert_math", "expert_lang_b", "expert_reverse", "evolved", "best on search"]
    assert (tmp_path / "pd-ps" / "report.json").is_file()
    best = yaml.safe_load((tmp_path / "pd" / "best_recipe.yaml").read_text())
    assert best["models"][0]["name"] == "ps" and best["models"][0]["recipe"]["merge_method"] == "dare_ties"
    trials = (tmp_path / "pd" / "trials.csv").read_text()
    assert main(args) == 0  # the same command resumes both stages: nothing new is evaluated
    assert (tmp_path / "pd" / "trials.csv").read_text() == trials
    assert main(["merge", str(tmp_path / "pd" / "best_recipe.yaml"), "--out", str(tmp_path / "m")]) == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert written.config.num_hidden_layers == len(best["layer_path"])


@pytest.mark.parametrize("optimizer", ["tpe", "random"])
def test_optuna_samplers_search_the_dfs_genome(small_zoo, tmp_path, optimizer):
    space = str(ROOT / "search_spaces" / "sakana_dfs.yaml")
    args = ["search", "--zoo", str(small_zoo), "--space", space, "--optimizer", optimizer, "--trials", "4"]
    assert main(args + ["--runs-dir", str(tmp_path), "--name", "d"]) == 0
    rows = (tmp_path / "d" / "trials.csv").read_text().splitlines()
    assert len(rows) == 5 and "on@0" in rows[0] and "scale@expert_math>expert_lang_b" in rows[0]
    assert_first_trial_is_the_start_point(tmp_path / "d")


def assert_first_trial_is_the_start_point(run: Path) -> None:
    """A layer-path search scores its start point (the first participant's own layers) first."""
    import optuna

    from evomerge.path_space import space_from_dict

    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    first = min(study.get_trials(deepcopy=False), key=lambda t: t.number)
    space = space_from_dict(json.loads((run / "config.json").read_text())["space"])
    want = space.bind([2] * len(space.participants)).initial()  # the small zoo's models have 2 layers
    assert first.params == pytest.approx(want)


def test_ps_recipe_flag_is_refused_for_parameter_space_spaces(small_zoo, tmp_path, capsys):
    code = main(
        ["search", "--zoo", str(small_zoo), "--ps-recipe", str(tmp_path / "x.yaml"), "--runs-dir", str(tmp_path)]
    )
    assert code == 2 and "layer-path" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_path_space_files_validate(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\ndfs: {repeats: 0}\n")
    with pytest.raises(RecipeError, match="repeats"):
        load_space(tmp_path / "bad.yaml")
    assert isinstance(load_space(ROOT / "search_spaces" / "sakana_ps_dfs.yaml"), PathSpace)


def test_demo_puts_ps_dfs_and_ps_dfs_side_by_side(small_zoo, tmp_path, capsys):
    args = ["demo", "--small", "--zoo", str(small_zoo), "--space", str(ROOT / "search_spaces" / "sakana_ps_dfs.yaml")]
    assert main(args + ["--trials", "4", "--popsize", "2", "--seeds", "0", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("seed 0: held-out test split") :]
    for row in ("expert_math", "DARE-TIES", "PS ", "DFS", "PS+DFS"):
        assert row in table
    run = "demo-small-sakana_ps_dfs-seed0"
    assert {p.name for p in tmp_path.iterdir()} == {f"{run}-ps", f"{run}-dfs", run}
