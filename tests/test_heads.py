"""Evaluators for models that are not causal LMs: classifiers (text and image) and seq2seq generation, checked
against the model's own outputs computed here by hand."""

import json

import numpy as np
import pytest
import torch
from tiny_archs import make_family

from evomerge.cli import main
from evomerge.evaluate.classify import ClassifierEvaluator
from evomerge.evaluate.heads import check_evaluable, load_model, load_processor, model_head
from evomerge.evaluate.seq2seq import Seq2SeqEvaluator
from evomerge.evaluate.tasks import TaskError, TaskSpec, load_task


@pytest.fixture(scope="module")
def zoo_tokenizer(small_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(json.loads((small_zoo / "manifest.json").read_text())["base"])


def task(tmp_path, files: dict, kind: str = "classify", **extra):
    return load_task(TaskSpec.from_dict({"name": "t", "kind": kind, "files": files, **extra}), "search")


def test_heads_are_read_from_the_checkpoint(zoo_tokenizer, tmp_path):
    heads = {}
    for arch in ("llama", "t5", "roberta", "vit", "bert"):
        base, _ = make_family(tmp_path / arch, arch, zoo_tokenizer, n_sources=0)
        heads[arch] = model_head(base)
    assert heads == {
        "llama": "causal_lm",
        "t5": "seq2seq_lm",
        "roberta": "sequence_classification",
        "vit": "image_classification",
        "bert": None,
    }


def test_text_classification_accuracy_is_the_argmax_of_the_models_logits(zoo_tokenizer, tmp_path):
    base, _ = make_family(tmp_path / "m", "roberta", zoo_tokenizer, n_sources=0)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps(
            {**config, "id2label": {"0": "neg", "1": "pos", "2": "neu"}, "label2id": {"neg": 0, "pos": 1, "neu": 2}}
        )
    )
    model, tok = load_model(base, "sequence_classification").eval(), load_processor(base, "sequence_classification")
    rng = np.random.default_rng(1)
    texts = [f"{rng.integers(0, 999)}+{rng.integers(0, 99)}=" for _ in range(40)]
    labels = rng.integers(0, 3, 40).tolist()
    names = ["neg", "pos", "neu"]
    (tmp_path / "s.jsonl").write_text(
        "".join(
            json.dumps({"text": t, "label": names[y] if i % 2 else y}) + "\n"
            for i, (t, y) in enumerate(zip(texts, labels))
        )
    )
    t = task(tmp_path, {"search": str(tmp_path / "s.jsonl"), "test": str(tmp_path / "s.jsonl")})
    result = ClassifierEvaluator(model, tok, [t], batch_size=7).evaluate()
    with torch.no_grad():
        want = [int(model(**tok(x, return_tensors="pt")).logits.argmax(-1)) == y for x, y in zip(texts, labels)]
    assert result.per_item["t"] == {i: float(w) for i, w in enumerate(want)}
    assert result.scores["t"] == pytest.approx(sum(want) / len(want))
    subset = ClassifierEvaluator(model, tok, [t]).evaluate({"t": [3, 5]})
    assert subset.per_item["t"] == {3: float(want[3]), 5: float(want[5])}


def test_image_splits_as_arrays_folders_and_files_score_the_same(zoo_tokenizer, tmp_path):
    from PIL import Image

    base, _ = make_family(tmp_path / "m", "vit", zoo_tokenizer, n_sources=0)
    model = load_model(base, "image_classification").eval()
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 12)
    np.savez(tmp_path / "s.npz", images=images, labels=labels)
    lines = []
    for i, (im, y) in enumerate(zip(images, labels)):
        (tmp_path / "folder" / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "folder" / str(y) / f"{i:02d}.png")
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
        lines.append(json.dumps({"image": f"{i:02d}.png", "label": int(y)}))
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        right = (model(pixel_values=pixels).logits.argmax(-1) == torch.from_numpy(labels)).float()
    for split in ("s.npz", "folder", "s.jsonl"):
        t = task(tmp_path, {"search": str(tmp_path / split), "test": str(tmp_path / split)})
        score = ClassifierEvaluator(model, None, [t], batch_size=5).evaluate().scores["t"]
        assert score == pytest.approx(float(right.mean())), split
    np.savez(tmp_path / "big.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=np.zeros(2, int))
    with pytest.raises(TaskError, match="the model takes 16×16"):
        ClassifierEvaluator(model, None, [task(tmp_path, {"search": str(tmp_path / "big.npz"), "test": "x"})])
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(tmp_path / "tall.png")
    (tmp_path / "mixed.jsonl").write_text(lines[0] + "\n" + json.dumps({"image": "tall.png", "label": 0}) + "\n")
    with pytest.raises(TaskError, match="images of 2 shapes"):
        ClassifierEvaluator(model, None, [task(tmp_path, {"search": str(tmp_path / "mixed.jsonl"), "test": "x"})])
    np.savez(tmp_path / "bad.npz", images=images[:2], labels=np.array([0, 7]))
    with pytest.raises(TaskError, match="label 7 outside the model's 3 classes"):
        ClassifierEvaluator(model, None, [task(tmp_path, {"search": str(tmp_path / "bad.npz"), "test": "x"})])


def test_seq2seq_answers_are_the_models_own_greedy_generation_whatever_the_batch(zoo_tokenizer, tmp_path):
    base, _ = make_family(tmp_path / "m", "t5", zoo_tokenizer, n_sources=0)
    model = load_model(base, "seq2seq_lm").eval()
    prompts = ["1+2=", "13+25=", "7+100=", "42+4=", "9+9="]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "3"}) + "\n" for p in prompts))
    t = task(tmp_path, {"search": str(tmp_path / "s.jsonl"), "test": "x"}, kind="generate", stop=[], max_new_tokens=5)
    got = Seq2SeqEvaluator(model, zoo_tokenizer, [t], batch_size=3).generate(t, list(range(len(prompts))))
    with torch.no_grad():
        for i, p in enumerate(prompts):  # one at a time: no padding
            ids = torch.tensor([zoo_tokenizer(p).input_ids])
            out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False, num_beams=1)
            assert got[i] == zoo_tokenizer.decode(out[0], skip_special_tokens=True), p


def test_eval_scores_a_classifier_from_the_command_line(zoo_tokenizer, tmp_path, capsys):
    base, _ = make_family(tmp_path / "m", "vit", zoo_tokenizer, n_sources=0)
    rng = np.random.default_rng(3)
    for split in ("search", "test"):
        np.savez(
            tmp_path / f"{split}.npz", images=rng.integers(0, 256, (6, 16, 16, 3), np.uint8), labels=np.ones(6, int)
        )
    files = {s: f"{s}.npz" for s in ("search", "test")}
    (tmp_path / "tasks.yaml").write_text(json.dumps([{"name": "shapes", "kind": "classify", "files": files}]))
    assert main(["eval", str(base), "--tasks", str(tmp_path / "tasks.yaml"), "--split", "test"]) == 0
    assert "shapes" in capsys.readouterr().out
    assert check_evaluable(base, [("shapes", "classify")]) == "image_classification"
