"""Whole mergekit configs merge to mergekit 0.1.5's output (fixtures: tests/fixtures/mergekit_configs, written by
its generate.py with mergekit itself): gradients over depth and outside the layers, conditionals, densities at the
edges, the base listed among the models, scientific notation, passthrough frankenmerges, bf16 sources, models whose
vocabularies differ (tokenizer_source)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main

HERE = Path(__file__).resolve().parent / "fixtures" / "mergekit_configs"
CONFIGS = sorted((HERE / "configs").glob("*.yml"))


def within_bf16_rounding(got: torch.Tensor, want: torch.Tensor, operands: list[torch.Tensor]) -> bool:
    """mergekit rounds after every bf16 operation (δ, w·δ, the sum, + base: up to ½ step each), evomerge
    accumulates in fp32 and rounds once: at most two bf16 steps apart, a step at the scale of the operands (base +
    Σ wᵢδᵢ rounds at the base's scale, even where it cancels)."""
    big = torch.stack([got.float().abs(), want.float().abs(), *(t.float().abs() for t in operands)]).amax(0)
    step = torch.exp2(torch.floor(torch.log2(big.clamp(min=2**-126))) - 7)
    return bool(((got.float() - want.float()).abs() <= 2 * step).all())


def by_mergekits_ids(got: dict[str, torch.Tensor], out: Path, want_vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """The same tokens as mergekit's output tokenizer, and the tables' rows reordered to mergekit's ids: mergekit
    numbers the tokens a union adds in a hash map's order, which changes from run to run (see `vocabulary`)."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert set(vocab) == set(want_vocab)
    tables = ("model.embed_tokens.weight", "lm_head.weight")
    assert AutoConfig.from_pretrained(out).vocab_size == got[tables[0]].shape[0]
    order = torch.tensor([vocab[t] for t, _ in sorted(want_vocab.items(), key=lambda item: item[1])])
    order = torch.cat([order, torch.arange(len(order), got[tables[0]].shape[0])])  # padding rows stay
    return {n: t[order] if n in tables else t for n, t in got.items()}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_evomerge_merge_equals_mergekit(config, tmp_path):
    check_config(config, tmp_path)


ENTRYWISE = ["linear_filtered", "ta_gradient", "bf16_ta_no_dtype", "slerp_gradient", "model_stock_weight"]


@pytest.mark.parametrize("stem", ENTRYWISE)
def test_task_vectors_made_a_chunk_at_a_time_merge_the_same(stem, tmp_path, monkeypatch):
    """`merge` makes the task vectors of linear, task arithmetic, SLERP and Model Stock a few million entries at a
    time; with chunks of 7 entries every tensor spans several, and the output is still mergekit's."""
    import evomerge.engine

    monkeypatch.setattr(evomerge.engine, "ELEMENTWISE_CHUNK", 7)
    check_config(HERE / "configs" / f"{stem}.yml", tmp_path)


def check_config(config: Path, tmp_path: Path) -> None:
    text = config.read_text().replace("MODELS_BF16/", f"{HERE / 'models_bf16'}/")
    text = text.replace("MODELS_VOCAB/", f"{HERE / 'models_vocab'}/")
    (tmp_path / "config.yml").write_text(text.replace("MODELS/", f"{HERE / 'models'}/"))
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(HERE / "expected" / f"{config.stem}.safetensors")
    vocab = HERE / "expected" / f"{config.stem}.vocab.json"
    if vocab.is_file():  # the output tokenizer mergekit wrote, and a config that says how many rows the tables have
        got = by_mergekits_ids(got, tmp_path / "out", json.loads(vocab.read_text()))
    assert set(got) == set(want)
    assert {n: t.dtype for n, t in got.items()} == {n: t.dtype for n, t in want.items()}
    operands = [load_file(HERE / "models_bf16" / m / "model.safetensors") for m in ("base", "ft0", "ft1")]
    for n in want:
        if want[n].dtype == torch.bfloat16:
            assert within_bf16_rounding(got[n], want[n], [o[n] for o in operands]), f"{config.stem}: {n}"
        else:
            diff = float((got[n] - want[n]).abs().max())
            assert diff <= 1e-6, f"{config.stem}: {n} differs by {diff:.3g}"


RANDOM = sorted((HERE / "configs_random").glob("*.yml"))


@pytest.mark.parametrize("config", RANDOM, ids=[c.stem for c in RANDOM])
def test_random_mask_merges_have_mergekits_statistics(config, tmp_path):
    """DARE and DELLA draw other masks than mergekit (a counter-based hash, not torch's generator), so the outputs
    are compared as distributions over the model's 7,920 entries: the share left at the base (no task vector
    kept there) within four standard errors of a difference of two binomial shares, and ‖merged − base‖₁ (what
    the rescale preserves) within 5 %."""
    text = config.read_text().replace("MODELS/", f"{HERE / 'models'}/")
    (tmp_path / "config.yml").write_text(text)
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(HERE / "expected" / f"{config.stem}.safetensors")
    base = load_file(HERE / "models" / "base" / "model.safetensors")
    names = sorted(want)
    b, g, w = (torch.cat([d[n].flatten().float() for n in names]) for d in (base, got, want))
    p_got, p_want = (g == b).float().mean().item(), (w == b).float().mean().item()
    p = (p_got + p_want) / 2
    assert abs(p_got - p_want) <= 4 * (2 * p * (1 - p) / b.numel()) ** 0.5, (p_got, p_want)
    l1_got, l1_want = (g - b).abs().sum().item(), (w - b).abs().sum().item()
    assert abs(l1_got / l1_want - 1) <= 0.05, (l1_got, l1_want)


def test_sliced_configs_import_export_and_merge_as_given(tmp_path, caplog):
    """A config whose slices take other layers imports as itself (the mergekit form is its recipe), exports
    unchanged, merges from the imported file to mergekit's output, and says where it follows mergekit's pairing of
    the last slice's sources with the first slice's weights."""
    import yaml

    text = (HERE / "configs" / "slices_bf16_ta.yml").read_text().replace("MODELS_BF16/", f"{HERE / 'models_bf16'}/")
    (tmp_path / "config.yml").write_text(text)
    assert main(["import-mergekit", str(tmp_path / "config.yml"), "--out", str(tmp_path / "recipe.yml")]) == 0
    assert yaml.safe_load((tmp_path / "recipe.yml").read_text()) == yaml.safe_load(text)
    assert main(["export-mergekit", str(tmp_path / "recipe.yml"), "--out", str(tmp_path / "back.yml")]) == 0
    assert yaml.safe_load((tmp_path / "back.yml").read_text()) == yaml.safe_load(text)
    with caplog.at_level("WARNING"):
        assert main(["merge", str(tmp_path / "recipe.yml"), "--out", str(tmp_path / "out")]) == 0
    assert "first 2 sources only" in caplog.text and "ft1 left out" in caplog.text
    got, want = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(HERE / "expected" / "slices_bf16_ta.safetensors"),
    )
    assert (
        set(got) == set(want) and json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    )


def src(model: str, *span: int) -> dict:
    return {"model": f"MODELS/{model}", "layer_range": list(span)} if span else {"model": f"MODELS/{model}"}


@pytest.mark.parametrize(
    "slices,why",
    [
        ([{"sources": [src("ft0", 0, 2), src("ft1", 0, 1)]}], "layer ranges must be of one length"),
        (
            [{"sources": [src("base", 0, 1), src("ft0", 2, 3)]}, {"sources": [src("ft0", 0, 2), src("ft1", 0, 2)]}],
            "slice 1 merges onto .*base, which is not among its sources",
        ),
        ([{"sources": [src("base", 2, 4), src("ft0", 0, 2)]}], "has no tensor model.layers.3"),
        ([{"sources": [src("base", 0, 1), src("ft0")]}], "every source needs a model and a layer_range"),
    ],
)
def test_a_sliced_config_that_cannot_merge_fails_in_one_line_and_writes_nothing(slices, why, tmp_path, capsys):
    import re

    import yaml

    config = {"merge_method": "ties", "base_model": "MODELS/base", "slices": slices, "parameters": {"density": 0.5}}
    text = yaml.safe_dump(config).replace("MODELS/", f"{HERE / 'models'}/")
    (tmp_path / "config.yml").write_text(text)
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert re.search(why, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_sliced_layers_keep_their_kind_and_come_from_their_sources_layers(tmp_path):
    """In a model whose layers differ in kind (Qwen2: full, full, sliding, sliding attention), an output layer is
    the merge of its sources' own layers and keeps that layer's kind; the written model loads."""
    import yaml
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=40,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    )
    models = {}
    for i, name in enumerate(("a", "b")):
        torch.manual_seed(i)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / name)
        models[name] = load_file(tmp_path / name / "model.safetensors")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    config = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [2, 4]}]},
            {"sources": [{"model": a, "layer_range": [0, 1]}, {"model": b, "layer_range": [1, 2]}]},
        ],
        "parameters": {"weight": 0.5},
        "dtype": "float32",
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "config.yml"), "--out", str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    got = load_file(tmp_path / "out" / "model.safetensors")
    for out, (la, lb) in enumerate([(2, 2), (3, 3), (0, 1)]):
        name = "model.layers.{}.self_attn.q_proj.weight"
        want = (models["a"][name.format(la)] + models["b"][name.format(lb)]) / 2
        torch.testing.assert_close(got[name.format(out)], want)
    assert "model.layers.3.self_attn.q_proj.weight" not in got
