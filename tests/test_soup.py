import json
import shutil

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main


def test_greedy_soup_is_at_least_the_best_ingredient_on_search(small_zoo, tmp_path, capsys):
    m = json.loads((small_zoo / "manifest.json").read_text())
    ingredients = list(m["soup_ingredients"].values()) + [m["experts"]["expert_math"]]
    out = tmp_path / "soup"
    assert (
        main(["soup", *ingredients, "--tasks", str(small_zoo), "--task-names", "math_a", "facts_a", "--out", str(out)])
        == 0
    )
    card = (out / "README.md").read_text()
    assert "Greedy soup" in card and "uniform soup" in card
    import yaml

    front = yaml.safe_load(card.split("---")[1])
    chosen = [line[2:] for line in card.split("ingredients:")[1].split("\n\n")[1].splitlines()]
    assert front["base_model"] == chosen  # the card names exactly the soup's members
    assert Checkpoint.open(out).tensor_names()


def test_greedy_soup_by_construction(small_zoo):
    from transformers import AutoTokenizer

    from evomerge.engine import Engine
    from evomerge.evaluate.fitness import Fitness
    from evomerge.evaluate.native import NativeEvaluator
    from evomerge.evaluate.tasks import load_specs, load_task, searching
    from evomerge.search.soup import greedy_soup

    m = json.loads((small_zoo / "manifest.json").read_text())
    ingredients = list(m["soup_ingredients"].values()) + [m["experts"]["expert_math"], m["experts"]["expert_reverse"]]
    engine = Engine(ingredients[0], ingredients[1:])
    model = engine.load_target_model()
    target = engine.bind(model)
    with searching():
        tasks = [load_task(s, "search") for s in load_specs(small_zoo, ["facts_a", "facts_b"])]
        fit = Fitness(NativeEvaluator(model, AutoTokenizer.from_pretrained(ingredients[0]), tasks))
        calls = []

        def score(recipe):
            engine.materialize(recipe, target)
            calls.append(recipe)
            return fit().value

        res = greedy_soup(engine, score, ingredients)
    assert res.score >= max(res.ingredient_scores.values())
    assert res.members[0] == max(ingredients, key=lambda i: res.ingredient_scores[i])
    assert len(calls) == len(ingredients) + len(ingredients) - 1
    kept = [s for s in res.steps if s["kept"]]
    assert len(res.members) == 1 + len(kept)


def test_soup_of_incompatible_models_fails_clearly(small_zoo, llama_family, tmp_path, capsys):
    m = json.loads((small_zoo / "manifest.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(llama_family[0], other)
    assert main(["soup", m["base"], str(other), "--tasks", str(small_zoo), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "other" in err
    assert not (tmp_path / "o").exists()


def test_greedy_soup_optimizer_in_the_search_loop(small_zoo, tmp_path):
    import optuna

    from evomerge.search.loop import SearchConfig, run_search
    from evomerge.space import SearchSpace

    m = json.loads((small_zoo / "manifest.json").read_text())
    names = list(m["soup_ingredients"]) + ["expert_math"]
    sources = list(m["soup_ingredients"].values()) + [m["experts"]["expert_math"]]
    from pathlib import Path

    space = SearchSpace.load(Path(__file__).resolve().parents[1] / "search_spaces" / "soup.yaml").model_dump()
    specs = [json.loads(json.dumps(t)) for t in m["tasks"] if t["name"] in ("facts_a", "facts_b")]
    cfg = SearchConfig(
        name="gs",
        space=space,
        base=m["base"],
        sources=sources,
        source_names=names,
        tasks=specs,
        optimizer="greedy-soup",
        trials=100,
        runs_dir=str(tmp_path),
        baselines=False,
    )
    outcome = run_search(cfg)
    study = optuna.load_study(study_name="gs", storage=cfg.storage_url())
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 * len(sources) - 1
    singles = [t.values[0] for t in done[: len(sources)]]
    assert outcome.best_fitness >= max(singles)
    chosen = [e.model for e in outcome.best_recipe.models if e.parameters["weight"] == 1.0]
    assert 1 <= len(chosen) <= len(sources)
    best_single = sources[singles.index(max(singles))]
    assert best_single in chosen  # the soup starts from the best ingredient
