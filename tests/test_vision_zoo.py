"""The vision zoo and `evomerge soup` on image classifiers: the model-soups table, offline."""

import json
import re

import pytest
import torch

from evomerge.cli import main
from evomerge.evaluate.classify import ClassifierEvaluator
from evomerge.evaluate.heads import load_model
from evomerge.evaluate.tasks import load_specs, load_task


@pytest.fixture(scope="module")
def vision_zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "zoo"
    assert main(["zoo", "vision", "--small", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_the_zoo_records_what_the_evaluator_measures(vision_zoo):
    manifest = json.loads((vision_zoo / "manifest.json").read_text())
    assert set(manifest["ingredients"]) == {"ft-lr3e-4", "ft-lr1e-3", "ft-lr1e-3-wd", "ft-lr1e-3-aug"}
    assert {t["name"]: t["weight"] for t in manifest["tasks"]} == {"shapes": 1.0, "shapes_shifted": 0.0}
    tasks = [load_task(s, "test") for s in load_specs(vision_zoo)]
    for name, path in [("base", manifest["base"]), *manifest["ingredients"].items()]:
        model = load_model(path, "image_classification").eval()
        scores = ClassifierEvaluator(model, None, tasks).evaluate().scores
        assert scores == pytest.approx(manifest["scores"][name]["test"]), name
    # fine-tuning learned the downstream task (6 classes: chance is 1/6)
    assert max(manifest["scores"][n]["test"]["shapes"] for n in manifest["ingredients"]) > 0.4


@pytest.mark.slow
def test_soup_prints_the_model_soups_table_for_image_classifiers(vision_zoo, tmp_path, capsys):
    manifest = json.loads((vision_zoo / "manifest.json").read_text())
    ingredients = list(manifest["ingredients"].values())
    assert main(["soup", *ingredients, "--tasks", str(vision_zoo), "--out", str(tmp_path / "soup")]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if len(cells) == 5 and re.fullmatch(r"[\d.]+", cells[1]):
            rows[cells[0]] = [float(c) for c in cells[1:]]  # shapes, shapes_shifted, fitness, search
    assert {"best ingredient", "uniform soup", "greedy soup"} <= set(rows), out
    best = max((rows[n] for n in manifest["ingredients"]), key=lambda r: r[3])
    assert rows["best ingredient"] == best
    assert rows["greedy soup"][3] >= best[3]  # greedy keeps an ingredient only if the search score improves
    soup = load_model(tmp_path / "soup", "image_classification").eval()
    test = [load_task(s, "test") for s in load_specs(vision_zoo)]
    with torch.no_grad():
        scores = ClassifierEvaluator(soup, None, test).evaluate().scores
    assert [scores["shapes"], scores["shapes_shifted"]] == pytest.approx(rows["greedy soup"][:2], abs=1e-3)
