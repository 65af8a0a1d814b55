import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.zoo.build import SMALL, TASKS_VERSION, build_zoo, finetunes
from evomerge.zoo.world import OPS, make_world, math_items


def _digest(root):
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".jsonl"):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_small_build_loads_with_transformers_and_has_manifest(small_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = json.loads((small_zoo / "manifest.json").read_text())
    assert set(m["experts"]) == {"expert_math", "expert_lang_b", "expert_reverse"}
    assert len(m["soup_ingredients"]) >= 2
    assert m["composed_task"] == "math_b"
    for path in [m["base"], *m["experts"].values(), *m["soup_ingredients"].values()]:
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        ids = tok("add 1 and 2 =", return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        assert model(ids).logits.shape[-1] == len(tok)
    for name, per_split in m["scores"].items():
        assert set(per_split["test"]) == {t["name"] for t in m["tasks"]}
    for split_file in (small_zoo / "tasks" / "lm_eval").glob("*.yaml"):
        assert str(small_zoo.resolve()) in split_file.read_text()


def test_task_splits_are_disjoint(small_zoo):
    m = json.loads((small_zoo / "manifest.json").read_text())
    operands = lambda f: {tuple(sorted(json.loads(line)["prompt"].split()[1:4:2])) for line in open(f)}  # noqa: E731
    for t in m["tasks"]:
        assert set(t["files"]) == {"search", "select", "test"}
        lines = {split: set(open(path)) for split, path in t["files"].items()}
        assert all(lines.values()), t["name"]
        assert not (
            lines["search"] & lines["select"] or lines["search"] & lines["test"] or lines["select"] & lines["test"]
        )
        if t["name"].startswith("math"):  # no operand pair in two splits
            pairs = {split: operands(path) for split, path in t["files"].items()}
            assert not (pairs["search"] & pairs["select"] or pairs["select"] & pairs["test"]), t["name"]


def test_a_zoo_built_before_select_splits_gets_them_without_retraining(small_zoo, tmp_path):
    old = tmp_path / "zoo"
    shutil.copytree(small_zoo, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for t in manifest["tasks"]:
        search = Path(t["files"].pop("search").replace(str(small_zoo), str(old)))
        select = Path(t["files"].pop("select").replace(str(small_zoo), str(old)))
        search.write_text(search.read_text() + select.read_text())  # the search split as it was
        select.unlink()
        t["files"] = {k: v.replace(str(small_zoo), str(old)) for k, v in {**t["files"], "search": str(search)}.items()}
    del manifest["tasks_version"]
    manifest["scores"] = {k: {"search": v["search"], "test": v["test"]} for k, v in manifest["scores"].items()}
    (old / "manifest.json").write_text(json.dumps(manifest))
    weights = (old / "models" / "base" / "model.safetensors").stat().st_mtime_ns
    assert build_zoo(old, SMALL) == old
    updated = json.loads((old / "manifest.json").read_text())
    assert updated["tasks_version"] == TASKS_VERSION
    for t in updated["tasks"]:
        assert set(t["files"]) == {"search", "select", "test"}
        for split, path in t["files"].items():
            assert Path(path).read_text() == (small_zoo / Path(path).relative_to(old)).read_text()
    assert updated["scores"] == json.loads((small_zoo / "manifest.json").read_text())["scores"]
    assert (old / "models" / "base" / "model.safetensors").stat().st_mtime_ns == weights


def test_math_training_pairs_exclude_held_out_pairs():
    w = make_world(0)
    unordered = {k: {tuple(sorted(p)) for p in w.pair_split[k]} for k in ("train", "search", "test")}
    assert not unordered["train"] & unordered["search"] and not unordered["train"] & unordered["test"]
    assert not unordered["search"] & unordered["test"]


def test_eval_splits_ask_every_held_out_pair_with_every_op():
    w = make_world(0)
    search, test = math_items(w, "search", False, 4), math_items(w, "test", True, 4)
    assert len(search) == len(test) == 4 * len(w.pair_split["search"]) == 1000
    assert {item["prompt"].split()[0] for item in search} == set(OPS)
    assert len({item["prompt"] for item in search}) == len(search)  # no prompt asked twice
    operands = lambda items: {tuple(sorted(map(int, (i["prompt"].split()[1], i["prompt"].split()[3])))) for i in items}  # noqa: E731
    assert not operands(search) & operands(math_items(w, "test", False, 4))
    assert math_items(w, "search", False, 1) == search[::4]  # one op per pair: the first of each four


def test_language_b_is_a_cipher_into_new_tokens():
    w = make_world(0)
    b = w.to_b("add 12 and 30 =")
    assert b.split()[1:] == ["12", w.to_b("and"), "30", "="]
    assert all(c.isupper() for c in b.split()[0]) and b != "add 12 and 30 ="


class Killed(BaseException):
    pass


@pytest.mark.slow
def test_a_killed_build_resumes_per_model_and_equals_an_uninterrupted_one(tmp_path, small_zoo):
    legacy = tmp_path / ".again.tmp-abc123"  # what builds before resuming existed left behind
    legacy.mkdir()

    def kill_during_reverse(name, step, total, loss):  # the third fine-tune: a worker finished one before it
        if name == "expert_reverse" and step == 3:
            raise Killed

    with pytest.raises(Killed):
        build_zoo(tmp_path / "again", SMALL, on_step=kill_during_reverse)
    partial = tmp_path / ".again.partial"
    done = {p.name for p in (partial / "models").iterdir() if not p.name.startswith(".")}
    assert "base" in done and done & {"expert_math", "expert_lang_b"} and "expert_reverse" not in done
    assert all((partial / "models" / name / "model.safetensors").is_file() for name in done)  # whole models only
    assert not legacy.exists()
    messages, trained = [], set()
    again = build_zoo(tmp_path / "again", SMALL, progress=messages.append, on_step=lambda n, *_: trained.add(n))
    assert trained == {job.name for job in finetunes(SMALL)} - done  # each model trained once, in either build
    assert any("resuming" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no partial build, lock or temporary left
    assert _digest(again) == _digest(small_zoo)
    m1 = json.loads((small_zoo / "manifest.json").read_text())
    m2 = json.loads((again / "manifest.json").read_text())
    assert m1["scores"] == m2["scores"]


def test_reuses_a_complete_build(small_zoo):
    before = (small_zoo / "manifest.json").stat().st_mtime_ns
    assert build_zoo(small_zoo, SMALL) == small_zoo
    assert (small_zoo / "manifest.json").stat().st_mtime_ns == before


def test_a_packed_batch_has_the_loss_and_gradient_of_one_document_per_row():
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.train import packed

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    docs = [torch.randint(3, 40, (n,)).tolist() for n in (17, 5, 30, 9, 12, 25, 3)]
    width = max(map(len, docs))
    padded = torch.zeros(len(docs), width, dtype=torch.long)
    labels = torch.full_like(padded, -100)
    for r, doc in enumerate(docs):
        padded[r, : len(doc)] = labels[r, : len(doc)] = torch.tensor(doc)
    expected = model(input_ids=padded, attention_mask=(labels != -100).long(), labels=labels).loss
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    inp, lab, positions, mask = packed(docs, pad=0, width=32)
    assert inp.shape == (4, 32)  # 101 tokens in 4 rows of 32 (first fit, longest first), not 7 rows of 30
    loss = model(input_ids=inp, attention_mask=mask, position_ids=positions, labels=lab).loss
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-6)
    same_length = [doc[:9] for doc in docs if len(doc) >= 9]  # packing would not save a fifth: one per row
    inp, lab, positions, mask = packed(same_length, pad=0, width=16)
    assert inp.shape == (len(same_length), 9) and mask.shape == inp.shape and lab[:, 0].eq(-100).all()
