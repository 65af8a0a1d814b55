import json

import pytest
import torch

from evomerge.evaluate.fitness import Fitness
from evomerge.evaluate.native import EvalResult, NativeEvaluator
from evomerge.evaluate.tasks import HeldOutError, load_specs, load_task, searching


@pytest.fixture(scope="module")
def zoo_model(small_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = json.loads((small_zoo / "manifest.json").read_text())
    path = m["experts"]["expert_math"]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), small_zoo


def test_test_split_cannot_be_loaded_during_a_search(small_zoo):
    spec = load_specs(small_zoo, ["math_b"])[0]
    with searching():
        assert load_task(spec, "search").items
        with pytest.raises(HeldOutError, match="held out"):
            load_task(spec, "test")
    assert load_task(spec, "test").items  # fine once the search is over


def test_native_evaluator_is_deterministic_and_subsets_work(zoo_model):
    model, tok, zoo = zoo_model
    tasks = [load_task(s, "search") for s in load_specs(zoo)]
    ev = NativeEvaluator(model, tok, tasks, batch_size=16)
    a, b = ev.evaluate(), ev.evaluate()
    assert a.scores == b.scores and a.per_item == b.per_item
    sub = ev.evaluate({"facts_a": [0, 1, 2], "math_a": [5]})
    assert set(sub.per_item) == {"facts_a", "math_a"} and len(sub.per_item["facts_a"]) == 3
    assert all(sub.per_item["facts_a"][i] == a.per_item["facts_a"][i] for i in (0, 1, 2))


def test_batches_side_by_side_give_the_results_of_one_after_another(zoo_model):
    model, tok, zoo = zoo_model
    tasks = [load_task(s, "search") for s in load_specs(zoo, ["math_a", "facts_b", "reverse_a"])]
    one = NativeEvaluator(model, tok, tasks, batch_size=16, workers=1)
    two = NativeEvaluator(model, tok, tasks, batch_size=16, workers=2)
    threads = torch.get_num_threads()
    assert two.evaluate().per_item == one.evaluate().per_item
    assert two.generate(tasks[0]) == one.generate(tasks[0])
    assert torch.get_num_threads() == threads  # restored


def test_batch_size_does_not_change_results(zoo_model):
    model, tok, zoo = zoo_model
    tasks = [load_task(s, "search") for s in load_specs(zoo, ["math_a", "facts_b"])]
    assert (
        NativeEvaluator(model, tok, tasks, batch_size=7).evaluate().per_item
        == NativeEvaluator(model, tok, tasks, batch_size=64).evaluate().per_item
    )


class FakeEvaluator:
    """Items are correct per a fixed table: lets racing be tested exactly."""

    def __init__(self, correct):
        from types import SimpleNamespace

        self.correct = correct
        self.tasks = [SimpleNamespace(name="t", items=list(range(len(correct))), spec=SimpleNamespace(weight=1.0))]
        self.calls = []

    def evaluate(self, subset=None):
        idx = subset["t"] if subset else range(len(self.correct))
        self.calls.append(list(idx))
        per = {i: float(self.correct[i]) for i in idx}
        return EvalResult({"t": sum(per.values()) / len(per)}, {"t": per}, len(per))


def test_racing_bound_prunes_only_hopeless_candidates():
    ev = FakeEvaluator([1] * 80 + [0] * 20)
    fit = Fitness(ev, racing="bound", rungs=(0.25, 0.5, 1.0))
    assert fit().value == pytest.approx(0.8)
    ev.correct = [0] * 100  # can't reach 0.8 once more than 20 items are wrong
    res = fit()
    assert res.pruned and res.n_examples < 100
    ev.correct = [0] * 15 + [1] * 85  # starts badly but ends at 0.85 > 0.8: must not be pruned
    res = fit()
    assert not res.pruned and res.value == pytest.approx(0.85)


def test_halving_compares_to_best_at_the_same_rung():
    ev = FakeEvaluator([1] * 50 + [0] * 50)
    fit = Fitness(ev, racing="halving", rungs=(0.25, 1.0), seed=1)
    fit()
    ev.correct = [0] * 100
    res = fit()
    assert res.pruned and res.rung == 0 and res.n_examples == 25


def test_subsample_is_seeded_per_call():
    ev = FakeEvaluator([1, 0] * 50)
    fit = Fitness(ev, subsample=10, seed=3)
    fit(call=1)
    fit(call=1)
    fit(call=2)
    assert ev.calls[0] == ev.calls[1] and ev.calls[0] != ev.calls[2] and len(ev.calls[0]) == 10


def test_fitness_rejects_unknown_task_weights():
    with pytest.raises(ValueError, match="unknown task"):
        Fitness(FakeEvaluator([1]), weights={"nope": 1.0})


@pytest.mark.parametrize("evaluator", ["native", "lm-eval"])
def test_eval_cli_prints_a_table(small_zoo, evaluator, capsys):
    from evomerge.cli import main

    m = json.loads((small_zoo / "manifest.json").read_text())
    assert (
        main(
            [
                "eval",
                m["experts"]["expert_math"],
                "--tasks",
                str(small_zoo),
                "--task-names",
                "facts_a",
                "math_a",
                "--split",
                "search",
                "--evaluator",
                evaluator,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = m["scores"]["expert_math"]["search"]["facts_a"]
    assert "facts_a" in out and "math_a" in out and f"{expected:.3f}" in out


def test_a_multi_token_stop_string_cuts_the_answer_and_ends_generation_early(llama_family, tmp_path):
    """What the model generates is cut at the first stop string (lm-eval's `until`), and a batch whose rows all
    have one stops decoding there instead of at the token limit; the answers are those of decoding to the limit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.tasks import TaskSpec

    base, _ = llama_family
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    prompts = ["abc", "hello", "12 + 3 ="]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))

    def outputs(stop: list[str], which: list[int]) -> tuple[dict[int, str], int]:
        spec = TaskSpec.from_dict(
            {
                "name": "g",
                "kind": "generate",
                "files": {"search": str(tmp_path / "s.jsonl"), "test": "x"},
                "stop": stop,
                "max_new_tokens": 24,
            }
        )
        ev = NativeEvaluator(model, tok, [load_task(spec, "search")], workers=1)
        calls = []
        forward = model.forward
        model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        try:
            return ev.generate(ev.tasks[0], which), len(calls)
        finally:
            model.forward = forward

    full, _ = outputs([], [0, 1, 2])
    stop = full[0][4:6]  # two characters the model does write: two tokens of this character tokenizer
    assert len(tok(stop, add_special_tokens=False)["input_ids"]) == 2
    cut, _ = outputs([stop], [0, 1, 2])
    assert cut == {i: text.split(stop, 1)[0] for i, text in full.items()}
    _, calls_to_limit = outputs([], [0])
    _, calls_to_stop = outputs([stop], [0])
    assert calls_to_stop < calls_to_limit == 24


def test_shared_prefix_multiple_choice_gives_the_whole_sequences_log_likelihoods(zoo_model):
    """With `shared_prefix`, an item's common context runs once and each choice only its own tokens: the same
    log-likelihood sums up to float rounding, and the same choices."""
    import dataclasses

    model, tok, zoo = zoo_model
    spec = load_specs(zoo, ["facts_a"])[0]
    task = load_task(spec, "search")
    shared = dataclasses.replace(task, spec=dataclasses.replace(spec, shared_prefix=True))
    plain_ev, shared_ev = NativeEvaluator(model, tok, [task]), NativeEvaluator(model, tok, [shared], batch_size=7)
    rows = plain_ev._prepared[task.name]["rows"]
    which = list(range(len(task.items)))
    with torch.inference_mode():
        whole = {k: v for b in plain_ev._mc_batches(rows, which) for k, v in plain_ev._loglik(b).items()}
        once = {k: v for b in shared_ev._shared_batches(shared, which) for k, v in shared_ev._loglik_shared(b).items()}
    assert whole.keys() == once.keys()
    assert max(abs(whole[k] - once[k]) for k in whole) < 1e-4
    assert shared_ev.evaluate().per_item == plain_ev.evaluate().per_item


def test_bound_racing_stops_between_rounds_of_batches():
    """With an evaluator that scores `granularity` items per round, bound racing stops a candidate at the round
    where it falls behind, not at the next rung; a candidate that can still win is never stopped."""
    ev = FakeEvaluator([1] * 80 + [0] * 20)
    fit = Fitness(ev, racing="bound", rungs=(1.0,))
    fit()
    ev.correct = [0] * 100
    assert not fit().pruned  # one rung: nothing to stop between
    ev.granularity = 10
    fit = Fitness(ev, racing="bound", rungs=(1.0,))
    ev.correct = [1] * 80 + [0] * 20
    assert fit().value == pytest.approx(0.8) and all(len(c) <= 10 for c in ev.calls[-10:])
    ev.correct = [0] * 100
    res = fit()
    assert res.pruned and res.n_examples == 30  # 21 wrong make 0.8 unreachable: the round ending at 30
    ev.correct = [0] * 20 + [1] * 80  # 0.8 exactly at the end: never below the bound before
    res = fit()
    assert not res.pruned and res.value == pytest.approx(0.8)


def test_a_numeric_answer_ends_generation_once_its_number_is_complete(llama_family, tmp_path):
    """The numeric metric reads the first number: once more text cannot change it, the row has its answer.
    Scores equal those of decoding to the limit; a batch of such rows stops early."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate.tasks import TaskSpec, number_final, score_generation

    assert [number_final(t) for t in ("12", "12 ", "12.", "12.5x", "12.x", "-", "a-3,")] == [
        False,
        True,
        False,
        True,
        True,
        False,
        True,
    ]
    base, _ = llama_family
    model, tok = AutoModelForCausalLM.from_pretrained(base).eval(), AutoTokenizer.from_pretrained(base)
    prompts = ["abc", "hello", "12 + 3 =", "7 7 7", "x=1+", "99-", "a1b2", "zz 4"]
    answers = ["7", "1", "0", "7", "97", "3", "7", "7"]
    (tmp_path / "s.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in zip(prompts, answers))
    )

    def run(metric: str, which: list[int]):
        files = {"search": str(tmp_path / "s.jsonl"), "test": "x"}
        spec = TaskSpec.from_dict(
            {"name": "g", "kind": "generate", "files": files, "stop": [], "max_new_tokens": 24, "metric": metric}
        )
        ev = NativeEvaluator(model, tok, [load_task(spec, "search")], workers=1)
        calls, forward = [], model.forward
        model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
        try:
            return ev.evaluate({"g": which}).per_item["g"], ev.generate(ev.tasks[0], which), len(calls)
        finally:
            model.forward = forward

    every = list(range(len(prompts)))
    _, full, _ = run("exact_match", every)
    scores, _, _ = run("numeric", every)
    assert scores == {i: score_generation("numeric", full[i], answers[i]) for i in every}
    assert 0 < sum(scores.values()) < len(every)
    _, _, to_limit = run("exact_match", [0])
    _, _, answered = run("numeric", [0])  # "h7c…": its number is complete after 3 characters
    assert answered < to_limit / 2


@pytest.mark.parametrize("decoder", ["static", "graphs"])
def test_a_static_cache_decodes_the_answers_of_the_dynamic_cache_and_of_hf_generate(zoo_model, decoder):
    """The preallocated cache (and its compiled decode step: CUDA graphs on a GPU, inductor here) gives the
    dynamic cache's greedy answers, which are HF `generate`'s; batches of different widths and a short last batch
    share the one cache; a candidate with NaN weights leaves nothing behind in it."""
    from evomerge.evaluate.native import NonFiniteLogits

    model, tok, zoo = zoo_model
    tasks = [load_task(s, "search") for s in load_specs(zoo, ["math_a", "reverse_a"])]
    dynamic = NativeEvaluator(model, tok, tasks, batch_size=16, decoder="dynamic")
    static = NativeEvaluator(model, tok, tasks, batch_size=16, decoder=decoder)
    assert static.workers == 1 and len(tasks[1].items) % 16  # one cache, a short last batch
    for task in tasks:
        assert static.generate(task) == dynamic.generate(task)
    expected = dynamic.evaluate()
    assert static.evaluate().per_item == expected.per_item
    # the select and test evaluators of the same model take turns with its one cache
    other = NativeEvaluator(model, tok, tasks[:1], batch_size=8, decoder=decoder)
    assert other._decoder() is static._decoder()

    prep = dynamic._prepared[tasks[1].name]
    batch = dynamic._batches_for(tasks[1], prep["encoded"], list(range(len(tasks[1].items))))[0]
    with torch.inference_mode():
        ids = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=tasks[1].spec.max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(prep["stop_ids"] | {tok.eos_token_id}),
            pad_token_id=tok.pad_token_id,
        )[:, batch.input_ids.shape[1] :]
    hf = [tok.decode([t for t in row if t not in prep["stop_ids"]], skip_special_tokens=True) for row in ids.tolist()]
    ours = dynamic.generate(tasks[1], batch.index)
    assert [ours[i] for i in batch.index] == [text.split("\n")[0] for text in hf]

    weight = model.model.layers[0].mlp.down_proj.weight
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLogits):
        static.evaluate()
    with torch.no_grad():
        weight.copy_(kept)
    assert static.evaluate().per_item == expected.per_item


def test_the_static_caches_logits_are_the_dynamic_caches_step_by_step(llama_family):
    """Sharper than equal answers: every step's logits agree to float rounding, for left-padded rows of a short
    batch in a cache longer than needed, with the previous batch's entries still in the cache."""
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate.decoding import Growing, Static

    base, _ = llama_family
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :5] = 0
    with torch.inference_mode():
        static = Static(model, "cache", {"logits_to_keep": 1}, batch_size=4, max_len=20, compiled=False)
        static.start(ids.flip(0)[:, :5], mask[:, :5], 6)  # an earlier batch leaves its entries behind
        for _ in range(4):
            static.step(torch.ones(3, dtype=torch.long))
        growing = Growing(model, "cache", {"logits_to_keep": 1})
        a, b = growing.start(ids, mask, 8), static.start(ids, mask, 8)
        for _ in range(8):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            nxt = a.argmax(-1)
            a, b = growing.step(nxt), static.step(nxt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decoding_gives_the_greedy_answers_of_eager_decoding(zoo_model):
    """On a GPU the default decoder steps a static cache through a CUDA graph: the zoo model's answers and
    scores are those of the dynamic cache, over two evaluations (the graph replays with the weights of the
    moment: a merge writes them in place between trials)."""
    model, tok, zoo = zoo_model
    cuda = type(model).from_pretrained(model.name_or_path).cuda().eval()
    tasks = [load_task(s, "search") for s in load_specs(zoo, ["math_a", "reverse_a"])]
    graphs = NativeEvaluator(cuda, tok, tasks, batch_size=16)
    assert graphs.decoder == "graphs"
    eager = NativeEvaluator(cuda, tok, tasks, batch_size=16, decoder="dynamic")
    assert graphs.evaluate().per_item == eager.evaluate().per_item
    with torch.no_grad():
        for p in cuda.parameters():
            p.mul_(1.01)
    assert graphs.evaluate().per_item == eager.evaluate().per_item
    assert graphs.generate(tasks[1]) == eager.generate(tasks[1])


def test_a_decode_step_that_cannot_be_compiled_is_run_uncompiled_with_a_warning(zoo_model, monkeypatch, caplog):
    model, tok, zoo = zoo_model

    def untraceable(fn, **options):
        def step(**inputs):
            raise RuntimeError("dynamo cannot trace this model")

        return step

    monkeypatch.setattr(torch, "compile", untraceable)
    model = type(model).from_pretrained(model.name_or_path).eval()  # none of the other tests' decoders
    tasks = [load_task(s, "search") for s in load_specs(zoo, ["math_a"])]
    graphs = NativeEvaluator(model, tok, tasks, batch_size=16, decoder="graphs")
    with caplog.at_level("WARNING"):
        scored = graphs.evaluate()
    assert "could not be compiled (dynamo cannot trace this model)" in caplog.text
    assert scored.per_item == NativeEvaluator(model, tok, tasks, batch_size=16, decoder="dynamic").evaluate().per_item
