"""The command line as a new user meets it: fast help, one-line errors with exit 2, nothing written on failure,
validation before the first trial, sensible defaults, readable outputs."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


def run_cli(*args, env=None):
    """`python -m evomerge ...` in a fresh process (what a user's shell runs)."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, env=e, timeout=300)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("evomerge ") and ": error: " in err, err
    return err


# ---- start-up ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["search", "--trials", "many"], ["frobnicate"]])
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from evomerge.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules, 'optuna' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False False False", out.stdout + out.stderr


def test_openmp_wait_policy_is_set_before_torch_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import os, sys; import evomerge.cli; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["PASSIVE", "False"]


def test_every_option_has_help():
    from evomerge.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if action.dest != "help" and not action.help and not hasattr(action, "_name_parser_map"):
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"
            for name, sub in getattr(action, "_name_parser_map", {}).items():
                yield from walk(sub, f"{path} {name}")

    assert list(walk(build_parser(), "evomerge")) == []


def test_help_shows_defaults():
    out = run_cli("search", "--help").stdout
    assert "(default: 100)" in out and "(default: cma)" in out


# ---- one line, exit 2, nothing written --------------------------------------------------------------------
def test_linear_weights_summing_to_zero(tmp_path, llama_family, capsys):
    base, fts = llama_family
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(fts[0]), "parameters": {"weight": 1.0}},
            {"model": str(fts[1]), "parameters": {"weight": -1.0}},
        ],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "weights sum to zero" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def write_task_arithmetic_recipe(path, base, source):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(source)}]}
    recipe["models"][0]["parameters"] = {"weight": 1.0}
    path.write_text(yaml.safe_dump(recipe))


def test_out_pointing_at_an_existing_file(tmp_path, llama_family, capsys):
    base, fts = llama_family
    write_task_arithmetic_recipe(tmp_path / "r.yaml", base, fts[0])
    (tmp_path / "existing").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "existing"), *extra]) == 2
        assert "is a file, not a model directory" in one_line_error(capsys)
    assert (tmp_path / "existing").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "r.yaml"]


def test_eval_of_a_missing_model_is_one_line_and_never_asks_the_hub(tmp_path, small_zoo):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    typo = str(small_zoo / "models" / "expert_mathh")
    for model in (str(tmp_path / "nonexistent_model"), typo, "expert_mathh"):
        out = run_cli("eval", model, "--tasks", str(small_zoo), env=env)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "not a model directory" in lines[0], out.stderr


def test_invalid_recipe_names_the_reason_on_the_first_line(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]})
    )
    assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "invalid recipe: merge method ties needs base_model" in one_line_error(capsys)
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": {"filter": "mlp"}}}],
            }
        )
    )
    assert main(["export-mergekit", str(tmp_path / "r.yaml")]) == 2
    assert "models.0.parameters.weight: {'filter': 'mlp'} is not a valid value" in one_line_error(capsys)


def test_mergekit_single_conditional_parameter_is_accepted():
    from evomerge.recipe import Recipe

    recipe = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": "b",
            "models": [{"model": "a", "parameters": {"weight": {"filter": "mlp", "value": 0.5}, "density": 0.5}}],
        }
    )
    assert recipe.models[0].parameters["weight"][0].filter == "mlp"


def search_args(zoo, runs, name="r", space="sakana_ps.yaml", *extra):
    return [
        "search",
        "--zoo",
        str(zoo),
        "--space",
        str(space if Path(space).is_absolute() else SPACES / space),
        "--trials",
        "2",
        "--popsize",
        "2",
        "--runs-dir",
        str(runs),
        "--name",
        name,
        "--no-baselines",
        *extra,
    ]


def test_gene_bounds_outside_a_parameter_range_fail_before_anything_is_written(small_zoo, tmp_path, capsys):
    space = yaml.safe_load((SPACES / "sakana_ps.yaml").read_text())
    space["genes"]["density"]["high"] = 1.5
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(space))
    assert main(search_args(small_zoo, tmp_path / "runs", "r", tmp_path / "bad.yaml")) == 2
    err = one_line_error(capsys)
    assert "invalid search space: genes.density: bounds [0.1, 1.5] leave [0, 1]" in err
    assert not (tmp_path / "runs").exists()


def test_a_malformed_test_split_fails_before_the_first_trial(small_zoo, tmp_path, capsys):
    manifest = json.loads((small_zoo / "manifest.json").read_text())
    spec = next(t for t in manifest["tasks"] if t["name"] == "math_b")
    bad_test = tmp_path / "test.jsonl"
    bad_test.write_text(Path(spec["files"]["test"]).read_text() + '{"prompt": "no answer here"}\n')
    spec["files"]["test"] = str(bad_test)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([spec]))
    assert (
        main(search_args(small_zoo, tmp_path / "runs", "r", "sakana_ps.yaml", "--tasks", str(tmp_path / "tasks.yaml")))
        == 2
    )
    err = one_line_error(capsys)
    assert f"{bad_test}:" in err and "missing field(s) ['answer']" in err
    assert not (tmp_path / "runs").exists()


def test_an_unreachable_storage_fails_before_the_models_load(small_zoo, tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/no/such/dir/study.db"
    assert main(search_args(small_zoo, tmp_path / "runs", "r", "sakana_ps.yaml", "--storage", url)) == 2
    assert "cannot connect" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_run_without_a_complete_trial_restarts_with_new_settings(small_zoo, tmp_path, capsys):
    import optuna

    runs = tmp_path / "runs"
    assert main(search_args(small_zoo, runs, "r", "sakana_ps.yaml", "--trials", "0")) == 0  # as if it died at start
    assert main(search_args(small_zoo, runs, "r", "sakana_ps.yaml", "--seed", "3")) == 0
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{runs / 'r' / 'study.db'}")
    assert study.user_attrs["evomerge_config"]["seed"] == 3
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2
    # once a trial is complete the run is an experiment: other settings are refused
    assert main(search_args(small_zoo, runs, "r", "sakana_ps.yaml", "--seed", "4")) == 2
    assert "different configuration (seed)" in one_line_error(capsys)


def test_tasks_without_task_names_means_every_listed_task(small_zoo, tmp_path):
    manifest = json.loads((small_zoo / "manifest.json").read_text())
    tasks = [t for t in manifest["tasks"] if t["name"] in ("facts_a", "reverse_a")]
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(tasks))
    args = search_args(
        small_zoo,
        tmp_path,
        "r",
        "global_task_arithmetic.yaml",
        "--tasks",
        str(tmp_path / "tasks.yaml"),
        "--optimizer",
        "random",
    )
    assert main(args) == 0
    header = (tmp_path / "r" / "trials.csv").read_text().splitlines()[0]
    assert "score:facts_a" in header and "score:reverse_a" in header and "score:math_b" not in header


# ---- outputs ----------------------------------------------------------------------------------------------
def test_outputs_follow_the_users_umask(tmp_path, llama_family):
    base, fts = llama_family
    write_task_arithmetic_recipe(tmp_path / "r.yaml", base, fts[0])
    old = os.umask(0o022)
    try:
        assert main(["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_demo_smoke_run_does_not_take_the_full_demos_run_names(small_zoo, tmp_path):
    assert (
        main(
            [
                "demo",
                "--small",
                "--zoo",
                str(small_zoo),
                "--trials",
                "2",
                "--popsize",
                "2",
                "--runs-dir",
                str(tmp_path),
                "--no-baselines",
                "--evaluator",
                "lm-eval",  # the demo runs through lm-eval too (its tasks as generated lm-eval YAMLs)
            ]
        )
        == 0
    )
    # the per-layer search, and the global one beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-small-global_task_arithmetic-seed0", "demo-small-seed0"]
    assert json.loads((tmp_path / "demo-small-seed0" / "config.json").read_text())["evaluator"] == "lm-eval"
    # an earlier demo with other settings (here: the native evaluator) keeps its run; this one takes another name
    earlier = sorted((tmp_path / "demo-small-seed0").iterdir())
    args = ["demo", "--small", "--zoo", str(small_zoo), "--trials", "2", "--popsize", "2", "--no-baselines"]
    assert main(args + ["--runs-dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir() if "global" not in p.name)
    assert len(names) == 2 and names[0] == "demo-small-seed0" and names[1].startswith("demo-small-seed0-")
    assert sorted((tmp_path / "demo-small-seed0").iterdir()) == earlier
    assert main(args + ["--runs-dir", str(tmp_path)]) == 0  # the same settings again: that run, resumed
    assert sorted(p.name for p in tmp_path.iterdir() if "global" not in p.name) == names
    assert len([p for p in tmp_path.iterdir() if "global" in p.name]) == 2  # the global search's runs: the same


def test_models_without_an_evaluator_for_the_tasks_are_refused_in_one_line(small_zoo, tmp_path, capsys):
    """A BERT checkpoint would load under BertLMHeadModel and be scored as a left-to-right LM; T5 generates (a
    seq2seq LM) but cannot score multiple choice."""
    from transformers import BertConfig, BertForMaskedLM, T5Config, T5ForConditionalGeneration

    tiny = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    BertForMaskedLM(BertConfig(vocab_size=64, num_hidden_layers=2, **tiny)).save_pretrained(tmp_path / "bert")
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)
    T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    for name, kind in (("bert", "BertForMaskedLM"), ("t5", "T5ForConditionalGeneration")):
        model = str(tmp_path / name)
        runs = str(tmp_path / "runs")
        for args in (
            ["eval", model, "--tasks", str(small_zoo)],
            ["search", "--base", model, "--sources", model, "--tasks", str(small_zoo), "--runs-dir", runs],
            ["soup", model, model, "--tasks", str(small_zoo), "--out", str(tmp_path / "soup")],
        ):
            assert main(args) == 2, args
            err = capsys.readouterr().err
            why = "not a causal language model" if name == "bert" else "cannot score task(s) facts_a (multiple_choice)"
            assert f"a {kind}" in err and why in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists() and not (tmp_path / "soup").exists()
