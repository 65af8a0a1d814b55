import pytest
import yaml

from evomerge.recipe import Recipe, RecipeError
from evomerge.space import SearchSpace

NAMES = (
    ["model.embed_tokens.weight"]
    + [
        f"model.layers.{i}.{p}"
        for i in range(4)
        for p in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight")
    ]
    + ["model.norm.weight", "lm_head.weight"]
)
SPACES = [
    "sakana_ps",
    "sakana_ps_sum",
    "sakana_knots",
    "layerwise_ties",
    "method_choice",
    "mergekit_evolve_like",
    "global_task_arithmetic",
]


def bound(name, **over):
    from pathlib import Path

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "search_spaces" / f"{name}.yaml").read_text())
    data.update(over)
    return SearchSpace.model_validate(data).bind("/b", ["/s/a", "/s/b"], NAMES, 4)


@pytest.mark.parametrize("name", SPACES)
def test_shipped_spaces_decode_deterministically_to_valid_recipes(name):
    space = bound(name)
    x = [((i * 37) % 100) / 100 for i in range(space.dim)]
    r1, r2 = space.decode(space.from_unit(x)), space.decode(space.from_unit(x))
    assert r1 == r2
    assert Recipe.from_dict(yaml.safe_load(r1.to_yaml())) == r1
    for n in NAMES:
        r1.plan(n, 4)


def test_layer_granularity_gives_each_layer_and_io_group_its_own_genes():
    space = bound("sakana_ps")
    assert space.dim == 6 * 2 * 2  # (embed, L0..L3, head) × sources × (weight, density)
    params = {g.name: 0.1 for g in space.genes}
    params["weight[b]@L2"] = 0.9
    params["weight[a]@embed"] = 0.7
    r = space.decode(params)
    assert r.plan("model.layers.2.mlp.up_proj.weight", 4).source_params[1]["weight"] == pytest.approx(0.9)
    assert r.plan("model.layers.1.mlp.up_proj.weight", 4).source_params[1]["weight"] == pytest.approx(0.1)
    assert r.plan("model.embed_tokens.weight", 4).source_params[0]["weight"] == pytest.approx(0.7)
    assert Recipe.from_dict(r.to_mergekit()).plan("model.layers.2.self_attn.q_proj.weight", 4) == r.plan(
        "model.layers.2.self_attn.q_proj.weight", 4
    )


def test_split_attention_and_mlp():
    space = bound("layerwise_ties")
    params = {g.name: 0.5 for g in space.genes}
    params["density[a]@L1.mlp"] = 0.2
    params["density[a]@L1.attn"] = 0.9
    r = space.decode(params)
    assert r.plan("model.layers.1.mlp.up_proj.weight", 4).source_params[0]["density"] == pytest.approx(0.2)
    assert r.plan("model.layers.1.self_attn.q_proj.weight", 4).source_params[0]["density"] == pytest.approx(0.9)


def test_smooth_filters_interpolate_between_block_genes_as_mergekit_evolve_does():
    """Blocks of 2 layers, an `mlp` filter with genes of its own, no embedding/head genes: a block's genes are
    anchors of a gradient over depth (layer i at t = i/3); embeddings and head at t = 0, where mergekit reads a
    gradient list outside the layers."""
    space = bound("sakana_ps", granularity="block", block_size=2, filters=["mlp"], smooth=True, embed_head_genes=False)
    assert space.dim == 2 * 2 * 2 * 2  # (L0-1, L2-3) × (mlp, rest) × sources × (weight, density)
    params = {g.name: 0.5 for g in space.genes}
    params["weight[a]@L0-1.mlp"], params["weight[a]@L2-3.mlp"] = 0.2, 0.8
    params["weight[a]@L0-1"], params["weight[a]@L2-3"] = 0.1, 0.4
    r = space.decode(params)
    weight = lambda name: r.plan(name, 4).source_params[0]["weight"]  # noqa: E731
    assert weight("model.layers.1.mlp.up_proj.weight") == pytest.approx(0.2 + (0.8 - 0.2) / 3)
    assert weight("model.layers.3.mlp.up_proj.weight") == pytest.approx(0.8)
    assert weight("model.layers.2.self_attn.q_proj.weight") == pytest.approx(0.1 + (0.4 - 0.1) * 2 / 3)
    assert weight("model.embed_tokens.weight") == pytest.approx(0.1)
    assert weight("lm_head.weight") == pytest.approx(0.1)
    with pytest.raises(Exception, match="smooth interpolates between layer groups"):
        bound("sakana_ps", granularity="global", smooth=True)


def test_without_embedding_and_head_genes_the_head_follows_the_last_layer_as_mergekit_slices_give_it():
    space = bound("sakana_ps", granularity="block", block_size=2, embed_head_genes=False)
    params = {g.name: 0.5 for g in space.genes}
    params["weight[a]@L0-1"], params["weight[a]@L2-3"] = 0.1, 0.4
    r = space.decode(params)
    weight = lambda name: r.plan(name, 4).source_params[0]["weight"]  # noqa: E731
    assert weight("model.embed_tokens.weight") == pytest.approx(0.1)
    assert weight("lm_head.weight") == weight("model.norm.weight") == pytest.approx(0.4)


def test_knots_are_control_points_over_depth_with_values_interpolated_between_them():
    """3 knots over 4 layers: knot j at depth j/2, layer i at i/3, so layer 1 sits 2/3 of the way from knot 0 to
    knot 1. The embedding and head keep their own genes."""
    space = bound("sakana_ps", granularity="knots", knots=3)
    assert space.dim == (3 + 2) * 2 * 2  # (K0..K2, embed, head) × sources × (weight, density)
    params = {g.name: 0.5 for g in space.genes}
    params["weight[a]@K0"], params["weight[a]@K1"], params["weight[a]@K2"] = 0.0, 0.6, 0.9
    r = space.decode(params)
    weight = lambda name: r.plan(name, 4).source_params[0]["weight"]  # noqa: E731
    expected = [0.0, 0.6 * 2 / 3, 0.6 + 0.3 / 3, 0.9]
    for i, want in enumerate(expected):
        assert weight(f"model.layers.{i}.mlp.up_proj.weight") == pytest.approx(want)
    assert r.to_mergekit()["models"][0]["parameters"]["weight"][-1]["value"] == pytest.approx([0.0, 0.6, 0.9])
    assert space.decode(params) == r
    with pytest.raises(RecipeError, match="5 knots over 4 layers"):
        bound("sakana_ps", granularity="knots", knots=5)
    with pytest.raises(Exception, match="cannot be interpolated"):
        bound("method_choice", granularity="knots")


def test_method_choice_picks_a_method_per_block():
    space = bound("method_choice")
    params = {g.name: (g.choices[0] if g.choices else 0.5) for g in space.genes}
    params["method@L2-3"] = "breadcrumbs_ties"
    r = space.decode(params)
    assert r.plan("model.layers.3.mlp.up_proj.weight", 4).method == "breadcrumbs_ties"
    assert r.plan("model.layers.0.mlp.up_proj.weight", 4).method == "ties"
    with pytest.raises(RecipeError, match="one merge_method"):
        r.to_mergekit()


def test_unit_cube_mapping_round_trips_and_clips():
    space = bound("method_choice")
    params = space.from_unit([0.3] * space.dim)
    assert space.from_unit(space.to_unit(params)) == params
    assert all(g.low <= g.from_unit(5.0) <= g.high for g in space.genes if not g.choices)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"method": "ties", "method_choice": ["ties"]}, "exactly one"),
        ({"genes": {"wieght": {"low": 0, "high": 1}}}, "wieght"),
        ({"genes": {"weight": {"low": 1, "high": 0}}}, "low < high"),
        (
            {"genes": {"density": {"low": 0.1, "high": 1.5}}},
            r"bounds \[0.1, 1.5\] leave \[0, 1\], the range of density",
        ),
        ({"genes": {"density": {"low": -0.1, "high": 1.0}}}, "the range of density"),
        ({"parameters": {"density": 2.0}}, r"parameters.density: 2.0 is outside"),
        ({"method": "della", "genes": {"density": {"low": 0.1, "high": 0.9}}}, "density ± epsilon"),
        (
            {"method": "della", "genes": {"density": {"low": 0.3, "high": 0.8}, "epsilon": {"low": 0.0, "high": 0.25}}},
            "epsilon up to 0.25",
        ),
        ({"genes": {"weight": {"low": 0, "high": 1, "log": True}}}, "log-scaled"),
    ],
)
def test_invalid_spaces_are_explained(bad, match):
    data = {"name": "x", "method": "ties", "genes": {"weight": {"low": 0, "high": 1}}}
    data.update(bad)
    with pytest.raises(ValueError, match=match):
        SearchSpace.model_validate(data)


def test_a_della_space_inside_the_band_is_accepted():
    data = {
        "name": "x",
        "method": "della",
        "genes": {"density": {"low": 0.3, "high": 0.8}, "epsilon": {"low": 0.0, "high": 0.15}},
    }
    SearchSpace.model_validate(data)
