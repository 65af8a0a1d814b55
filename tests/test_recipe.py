import pytest
import yaml

from evomerge.recipe import Recipe, RecipeError, SlicesNotAligned

MERGEKIT_TIES = """
models:
  - model: /m/base
  - model: /m/math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: /m/ja
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: /m/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_imports_a_mergekit_config_and_resolves_gradients_and_filters():
    r = Recipe.from_dict(yaml.safe_load(MERGEKIT_TIES))
    assert [m.model for m in r.source_entries()] == ["/m/math", "/m/ja"]
    mid = r.plan("model.layers.2.mlp.up_proj.weight", num_layers=5)  # t = 0.5
    assert mid.method == "ties"
    assert mid.source_params[0]["density"] == pytest.approx(0.7)
    assert mid.source_params[1] == {"density": 0.5, "weight": 0.5}
    assert mid.global_params == {"normalize": True}
    last = r.plan("model.layers.4.self_attn.q_proj.weight", num_layers=5)  # t = 1, not mlp
    assert last.source_params[0]["density"] == pytest.approx(0.1)
    assert last.source_params[1]["weight"] == 0
    embed = r.plan("model.embed_tokens.weight", num_layers=5)  # pre-layer tensors sit at t = 0
    assert embed.source_params[0]["density"] == pytest.approx(1.0)


def test_mergekit_export_round_trips():
    r = Recipe.from_dict(yaml.safe_load(MERGEKIT_TIES))
    again = Recipe.from_dict(r.to_mergekit())
    for name in ["model.layers.1.mlp.down_proj.weight", "lm_head.weight"]:
        assert again.plan(name, 5) == r.plan(name, 5)


def test_per_layer_rules_and_method_rules():
    r = Recipe.from_dict(
        {
            "merge_method": "ties",
            "base_model": "/b",
            "models": [
                {
                    "model": "/a",
                    "parameters": {"weight": [{"layers": [0, 1], "value": 0.2}, {"value": 0.9}], "density": 0.5},
                }
            ],
            "method_rules": [{"filter": "attn", "method": "dare_ties"}],
        }
    )
    p = r.plan("model.layers.1.self_attn.k_proj.weight", 4)
    assert p.method == "dare_ties" and p.source_params[0]["weight"] == 0.2
    p = r.plan("model.layers.3.mlp.gate_proj.weight", 4)
    assert p.method == "ties" and p.source_params[0]["weight"] == 0.9
    with pytest.raises(RecipeError, match="one merge_method per config"):
        r.to_mergekit()


def test_layer_index_rules_cannot_be_exported_to_mergekit():
    r = Recipe.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/b",
            "models": [{"model": "/a", "parameters": {"weight": [{"layers": [0], "value": 1.0}, {"value": 0.5}]}}],
        }
    )
    with pytest.raises(RecipeError, match="layers by index"):
        r.to_mergekit()


@pytest.mark.parametrize(
    "data,match",
    [
        ({"merge_method": "tiez", "base_model": "/b", "models": [{"model": "/a"}]}, "unknown merge method 'tiez'"),
        ({"merge_method": "ties", "models": [{"model": "/a"}]}, "needs base_model"),
        (
            {"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a", "parameters": {"densty": 0.5}}]},
            r"densty",
        ),
        ({"merge_method": "ties", "base_model": "/b", "slices": []}, "slices"),
        ({"merge_method": "ties", "base_model": "/b", "models": [], "tokenizer_source": "/c"}, "base, union or one"),
        ({"merge_method": "ties", "base_model": "/b", "models": [], "tokenizer": {"sauce": "union"}}, "give source"),
        ({"merge_method": "ties", "base_model": "/b", "models": [], "pad_to_multiple_of": 8}, "tokenizer_source too"),
        (
            {
                "merge_method": "ties",
                "base_model": "/b",
                "models": [],
                "tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "/b"}}}},
            },
            "tokens.x.source",
        ),
    ],
)
def test_bad_recipes_are_explained(data, match):
    with pytest.raises(RecipeError, match=match):
        Recipe.from_dict(data)


def test_yaml_save_and_load(tmp_path):
    r = Recipe.from_dict(yaml.safe_load(MERGEKIT_TIES))
    r.save(tmp_path / "r.yaml")
    assert Recipe.load(tmp_path / "r.yaml") == r


def test_a_linear_merge_with_an_unlisted_base_model_is_refused_as_mergekit_refuses_it():
    config = {
        "merge_method": "linear",
        "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"weight": 0.5}}, {"model": "/m/b", "parameters": {"weight": 0.5}}],
    }
    with pytest.raises(RecipeError, match="list /m/base among the models with a weight"):
        Recipe.from_dict(config)
    config["models"].insert(0, {"model": "/m/base", "parameters": {"weight": 0.0}})
    assert [m.model for m in Recipe.from_dict(config).source_entries()] == ["/m/a", "/m/b"]


def test_slices_that_do_not_tile_the_stack_in_order_are_not_one_recipe(tmp_path):
    """Only slices that merge the same models over the whole stack in order are a plain recipe; the others are
    told apart (SlicesNotAligned: `load_any_recipe` merges them slice by slice) or refused in one line."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"num_hidden_layers": 4}')
    m = str(tmp_path / "m")

    def config(*ranges):
        pieces = [{"sources": [{"model": m, "layer_range": r}]} for r in ranges]
        return {"merge_method": "ties", "base_model": m, "slices": pieces}

    for data, why, error in [
        (config([0, 2]), r"the slices end at layer 2, not at the last layer \(4\)", SlicesNotAligned),
        (config([0, 2], [3, 4]), "the same consecutive layers of every model", SlicesNotAligned),
        (config([2, 4], [0, 2]), "the same consecutive layers of every model", SlicesNotAligned),
        ({**config([0, 4]), "models": [{"model": m}]}, "models or slices, not both", RecipeError),
        (config([0, 4]) | {"slices": [{"sources": [{"model": "/nowhere", "layer_range": [0, 4]}]}]}, "no config.json",
         RecipeError),
    ]:  # fmt: skip
        with pytest.raises(error, match=why):
            Recipe.from_dict(data)
    whole = Recipe.from_dict(config([0, 4]))
    assert [e.model for e in whole.models] == [m] and whole.base_model == m


def test_mergekits_tokenizer_spelling_reads_as_tokenizer_source_tokens_and_padding():
    data = {"merge_method": "linear", "models": [{"model": "/a", "parameters": {"weight": 1}}]}
    assert Recipe.from_dict({**data, "tokenizer": {"source": "base"}}).tokenizer_source == "base"
    tokenizer = {"tokens": {"<x>": {"source": {"kind": "zero"}}, "y": {"source": "/a", "force": True}}}
    recipe = Recipe.from_dict({**data, "tokenizer": {**tokenizer, "pad_to_multiple_of": 8}})
    assert recipe.tokenizer_source == "union"  # mergekit's default source
    assert recipe.pad_to_multiple_of == 8 and recipe.tokens["y"].force and recipe.tokens["<x>"].source.kind == "zero"
    assert recipe.to_mergekit()["tokenizer"] == {"source": "union", **tokenizer, "pad_to_multiple_of": 8}
