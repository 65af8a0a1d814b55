import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint, CheckpointError, check_compatible, write_model_dir


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_opens_lazily_and_reads_tensors(llama_family):
    base, _ = llama_family
    ck = Checkpoint.open(base)
    names = ck.tensor_names()
    assert "model.layers.0.self_attn.q_proj.weight" in names
    ref = load_file(base / "model.safetensors")
    assert torch.equal(ck.get("model.norm.weight"), ref["model.norm.weight"])
    assert ck.shape("lm_head.weight") == tuple(ref["lm_head.weight"].shape)


def test_sharded_write_round_trips_and_leaves_no_temp(tmp_path, llama_family):
    base, _ = llama_family
    ck = Checkpoint.open(base)
    shapes = {n: (ck.shape(n), torch.float32) for n in ck.tensor_names()}
    out = write_model_dir(
        tmp_path / "out", shapes, ck.get, ck.config, copy_from=base, model_card="# card\n", max_shard_bytes=20_000
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = Checkpoint.open(out)
    assert set(back.tensor_names()) == set(ck.tensor_names())
    for n in ck.tensor_names():
        assert torch.equal(back.get(n), ck.get(n))
    assert (out / "tokenizer.json").is_file() and (out / "README.md").read_text() == "# card\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_write_leaves_nothing_behind(tmp_path, llama_family):
    base, _ = llama_family
    ck = Checkpoint.open(base)
    shapes = {n: (ck.shape(n), torch.float32) for n in ck.tensor_names()}
    calls = []

    def produce(name):
        calls.append(name)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return ck.get(name)

    with pytest.raises(RuntimeError, match="boom"):
        write_model_dir(tmp_path / "out", shapes, produce, ck.config, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_without_flag(tmp_path, llama_family):
    base, _ = llama_family
    ck = Checkpoint.open(base)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        write_model_dir(tmp_path / "out", {}, ck.get, ck.config)
    assert (tmp_path / "out" / "keep.txt").exists()


def _rewrite(dir_, fn):
    path = dir_ / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_shape_mismatch_names_file_and_tensor(tmp_path, llama_family):
    base, fts = llama_family
    bad = copy_dir(fts[0], tmp_path / "bad")
    _rewrite(bad, lambda t: t.__setitem__("model.norm.weight", torch.ones(7)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[7\]"):
        check_compatible(Checkpoint.open(base), [Checkpoint.open(bad)])


def test_missing_and_extra_tensors_are_listed(tmp_path, llama_family):
    base, fts = llama_family
    bad = copy_dir(fts[0], tmp_path / "bad")
    _rewrite(bad, lambda t: (t.pop("model.norm.weight"), t.__setitem__("extra.weight", torch.ones(2))))
    with pytest.raises(
        CheckpointError, match=r"missing 1 tensor.*model\.norm\.weight.*has 1 extra tensor.*extra\.weight"
    ):
        check_compatible(Checkpoint.open(base), [Checkpoint.open(bad)])


@pytest.mark.parametrize(
    "key,value,match", [("model_type", "mistral", "model_type is 'mistral'"), ("vocab_size", 999, "vocab size is 999")]
)
def test_config_mismatch_is_named(tmp_path, llama_family, key, value, match):
    base, fts = llama_family
    bad = copy_dir(fts[0], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        check_compatible(Checkpoint.open(base), [Checkpoint.open(bad)])


def test_different_tokenizer_is_refused(tmp_path, llama_family):
    from evomerge.zoo.tokenizer import build_char_tokenizer

    base, fts = llama_family
    bad = copy_dir(fts[0], tmp_path / "bad")
    build_char_tokenizer("zyxwvutsrqponmlkjihgfedcba9876543210 +-=?!").save_pretrained(bad)
    with pytest.raises(CheckpointError, match="tokenizer differs"):
        check_compatible(Checkpoint.open(base), [Checkpoint.open(bad)])


def test_truncated_file_is_detected(tmp_path, llama_family):
    base, _ = llama_family
    bad = copy_dir(base, tmp_path / "bad")
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: (truncated|not a readable)"):
        Checkpoint.open(bad)


def test_corrupt_header_is_detected(tmp_path, llama_family):
    base, _ = llama_family
    bad = copy_dir(base, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        Checkpoint.open(bad)


def test_pickle_checkpoints_need_allow_pickle(tmp_path, llama_family):
    base, _ = llama_family
    pk = tmp_path / "pk"
    pk.mkdir()
    shutil.copy(base / "config.json", pk / "config.json")
    torch.save(load_file(base / "model.safetensors"), pk / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint.open(pk)
    ck = Checkpoint.open(pk, allow_pickle=True)
    assert torch.equal(ck.get("model.norm.weight"), Checkpoint.open(base).get("model.norm.weight"))


def test_remote_code_models_are_refused(tmp_path, llama_family):
    base, _ = llama_family
    bad = copy_dir(base, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling.MyModel"}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="trust_remote_code"):
        Checkpoint.open(bad)
