"""lm-eval tasks as fitness: specs, the search/test partition, per-document scores through lm-eval and through
native compilation (equal), search and mergekit-evolve configs, and bad input."""

import csv
import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.errors import HeldOutError, TaskError
from evomerge.evaluate.evaluator import Evaluator
from evomerge.evaluate.lm_eval_adapter import check_lm_eval_task
from evomerge.evaluate.native import NativeEvaluator
from evomerge.evaluate.tasks import Task, TaskSpec, load_specs, load_task, searching, write_jsonl

GSM8K_STYLE = {  # the filters and metric of lm-eval's gsm8k task, over local files
    "output_type": "generate_until",
    "doc_to_text": "{{question}}",
    "doc_to_target": "{{answer.split('####')[-1].strip()}}",
    "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 6},
    "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True, "ignore_case": True}],
    "filter_list": [
        {
            "name": "strict-match",
            "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"}, {"function": "take_first"}],
        },
        {
            "name": "flexible-extract",
            "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"},
            ],
        },
    ],
}


def write_task(folder: Path, name: str, rows: list[dict], **cfg) -> None:
    write_jsonl(folder / f"{name}.jsonl", rows)
    body = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(folder / f"{name}.jsonl")}},
        "test_split": "test",
        **cfg,
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(body, sort_keys=False))


def spec(task: str, folder: Path, **kw) -> TaskSpec:
    return TaskSpec.from_dict({"lm_eval": task, "include_path": str(folder), **kw})


@pytest.fixture(scope="module")
def random_model(small_zoo):
    """A random-init model emits varied text: a demanding check of identical decoding."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = small_zoo / "models" / "base"
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base)).eval(), AutoTokenizer.from_pretrained(
        base
    )


@pytest.fixture(scope="module")
def local_tasks(small_zoo, random_model, tmp_path_factory):
    """Local YAML tasks: a generation task whose answers are the model's own greedy outputs (so it scores 1.0
    only if both paths decode the same text), a GSM8K-style task with regex answer filters whose answers
    are numbers found in those outputs, a multiple-choice task (acc and acc_norm) and a group of both MC
    tasks."""
    model, tok = random_model
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    math = load_task(load_specs(small_zoo, ["math_b"])[0], "search")
    outputs = NativeEvaluator(model, tok, [math]).generate(math)
    echo = [{"prompt": it["prompt"], "answer": outputs[i]} for i, it in enumerate(math.items) if outputs[i].strip()]
    write_task(
        folder,
        "echo",
        echo,
        output_type="generate_until",
        doc_to_text="{{prompt}}",
        doc_to_target="{{answer}}",
        generation_kwargs={"until": ["\n"], "do_sample": False, "max_gen_toks": 4},
        metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    )
    numbers = [re.findall(r"-?[0-9]+", outputs[i]) for i in range(len(math.items))]
    gsm = [
        {"question": it["prompt"], "answer": f"so the answer is #### {n[-1] if n else 12345}"}
        for it, n in zip(math.items, numbers)
    ]
    write_task(folder, "gsm_local", gsm, **GSM8K_STYLE)
    # the same filter names with another regex (the first digit): a group's subtasks filter each by their own
    first_digit = [{**f, "filter": [{"function": "regex", "regex_pattern": "([0-9])"}, {"function": "take_first"}]}
                   for f in GSM8K_STYLE["filter_list"]]  # fmt: skip
    digits = [{"question": g["question"], "answer": "#### " + (n[-1][:1] if n else "x")} for g, n in zip(gsm, numbers)]
    write_task(folder, "gsm_digits", digits, **{**GSM8K_STYLE, "filter_list": first_digit})
    (folder / "gsm_group.yaml").write_text(yaml.safe_dump({"group": "gsm_group", "task": ["gsm_local", "gsm_digits"]}))
    facts = [item for name in ("facts_a", "facts_b") for split in ("search", "select")
             for item in load_task(load_specs(small_zoo, [name])[0], split).items]  # fmt: skip
    mc = {
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean"}, {"metric": "acc_norm", "aggregation": "mean"}],
    }
    write_task(folder, "facts_local", facts, **mc)
    write_task(folder, "facts_g1", facts[:20], **mc)
    write_task(folder, "facts_g2", facts[20:], **mc)
    (folder / "facts_group.yaml").write_text(yaml.safe_dump({"group": "facts_group", "task": ["facts_g1", "facts_g2"]}))
    write_jsonl(folder / "facts_train.jsonl", facts[:12])
    few = {"test": str(folder / "facts_fewshot.jsonl"), "train": str(folder / "facts_train.jsonl")}
    write_task(
        folder,
        "facts_fewshot",
        facts[12:],
        **{**mc, "dataset_kwargs": {"data_files": few}},
        training_split="train",
        num_fewshot=2,
    )
    rolling = {
        "output_type": "loglikelihood",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{choices[label]}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean"}],
    }
    write_task(folder, "facts_loglik", facts, **rolling)
    return folder


def test_specs_round_trip_and_reject_what_they_cannot_mean(tmp_path):
    s = TaskSpec.from_dict({"lm_eval": "arc_easy", "weight": 2, "search_fraction": 0.3, "split_seed": 4})
    assert s.kind == "lm_eval" and s.metric == "acc,none" and s.name == "arc_easy"
    assert TaskSpec.from_dict(s.to_dict()) == s
    assert TaskSpec.from_dict({"lm_eval": "t", "metric": "exact_match"}).metric == "exact_match,none"
    rel = TaskSpec.from_dict({"lm_eval": "t", "include_path": "yaml"}, root=tmp_path)
    assert rel.lm_eval["include_path"] == str(tmp_path / "yaml")
    for bad, why in [
        ({"lm_eval": "t", "search_fraction": 1.0}, "search_fraction must be a number in \\(0, 1\\)"),
        ({"lm_eval": "t", "search_fraction": 0.5, "search_split": "validation"}, "not both"),
        ({"lm_eval": "t", "select_fraction": 0.2, "select_split": "validation"}, "not both"),
        ({"lm_eval": "t", "select_fraction": 0}, "select_fraction must be a number in \\(0, 1\\)"),
        ({"lm_eval": "t", "limit": 3}, "unknown key"),
        ({"lm_eval": ""}, "must name an lm-eval task"),
    ]:
        with pytest.raises(TaskError, match=why):
            TaskSpec.from_dict(bad)


def test_documents_split_once_seeded_disjoint_and_complete(local_tasks):
    a = spec("facts_local", local_tasks, search_fraction=0.25)
    search, test = load_task(a, "search"), load_task(a, "test")
    assert len(search.items) == round(0.25 * (len(search.items) + len(test.items)))
    assert not set(search.items) & set(test.items)
    assert load_task(a, "search").items == search.items  # deterministic
    other = spec("facts_local", local_tasks, search_fraction=0.25, split_seed=1)
    assert load_task(other, "search").items != search.items
    with searching():
        assert load_task(a, "search").items == search.items
        with pytest.raises(HeldOutError):
            load_task(a, "test")


def test_a_select_fraction_is_carved_from_the_search_part_and_leaves_the_test_part_as_it_was(local_tasks):
    plain = spec("facts_local", local_tasks, search_fraction=0.5)
    carved = spec("facts_local", local_tasks, search_fraction=0.5, select_fraction=0.25)
    parts = {split: set(load_task(carved, split).items) for split in ("search", "select", "test")}
    assert parts["test"] == set(load_task(plain, "test").items)
    assert parts["search"] | parts["select"] == set(load_task(plain, "search").items)
    assert not parts["search"] & parts["select"] and len(parts["select"]) == round(0.25 * 16)
    with searching(), pytest.raises(HeldOutError):
        load_task(carved, "select")
    assert check_lm_eval_task(carved) == {"search": 12, "select": 4, "test": 16}
    assert "select" not in check_lm_eval_task(plain)


def test_zoo_tasks_search_their_validation_split_and_report_their_test_split(small_zoo):
    native = load_specs(small_zoo, ["facts_a"])[0]
    twin = spec("zoo_facts_a", small_zoo / "tasks" / "lm_eval", select_split="select")
    for split in ("search", "select", "test"):
        task = load_task(twin, split)
        docs = [task.source[leaf].eval_docs[i]["prompt"] for leaf, i in task.items]
        assert docs == [it["prompt"] for it in load_task(native, split).items]
    with pytest.raises(TaskError, match="select_split 'test' is also searched or tested"):
        check_lm_eval_task(spec("zoo_facts_a", small_zoo / "tasks" / "lm_eval", select_split="test"))


def test_compiled_native_scores_equal_lm_eval_per_document(random_model, local_tasks, caplog):
    model, tok = random_model
    specs = [
        spec("echo", local_tasks, metric="exact_match,none"),
        spec("gsm_local", local_tasks, metric="exact_match,flexible-extract"),
        spec("facts_local", local_tasks, metric="acc_norm,none", name="facts_norm"),
        spec("facts_group", local_tasks),
    ]
    tasks = [load_task(s, "search") for s in specs]
    with caplog.at_level(logging.WARNING):
        auto = Evaluator(model, tok, tasks, batch_size=16, mode="auto")
    assert auto.lm_eval is None and not caplog.records  # everything compiled
    through = Evaluator(model, tok, tasks, batch_size=16, mode="lm-eval")
    a, b = auto.evaluate(), through.evaluate()
    assert a.per_item == b.per_item and a.scores == b.scores
    assert a.scores["echo"] == 1.0 and 0 < a.scores["gsm_local"] < 1
    group = tasks[3]
    assert {leaf for leaf, _ in group.items} == {"facts_g1", "facts_g2"}  # a group: all its subtasks' documents
    subset = {"gsm_local": [0, 3, 5], "facts_group": [1, 2, len(group.items) - 1]}
    assert auto.evaluate(subset).per_item == through.evaluate(subset).per_item
    assert through.evaluate() == b  # task objects are reusable


def test_a_groups_subtasks_are_scored_by_their_own_filters(random_model, local_tasks):
    model, tok = random_model
    task = load_task(spec("gsm_group", local_tasks, metric="exact_match,flexible-extract"), "search")
    compiled = Evaluator(model, tok, [task], batch_size=16, mode="native").evaluate()
    through = Evaluator(model, tok, [task], batch_size=16, mode="lm-eval").evaluate()
    assert compiled.per_item == through.per_item
    digits = [i for i, (leaf, _) in enumerate(task.items) if leaf == "gsm_digits"]
    assert 0 < sum(through.per_item["gsm_group"][i] for i in digits) < len(digits)


def test_few_shot_examples_belong_to_the_document_not_to_the_subset_scored(random_model, local_tasks):
    """lm-eval draws few-shot examples in sequence; evomerge seeds them per document, so a subsample scores a
    document with the same prompt as the whole split does, through lm-eval and compiled alike."""
    model, tok = random_model
    task = load_task(spec("facts_fewshot", local_tasks), "search")
    compiled = Evaluator(model, tok, [task], batch_size=8, mode="native")
    through = Evaluator(model, tok, [task], batch_size=8, mode="lm-eval")
    leaf = task.source["facts_fewshot"]

    def prompts() -> dict[str, str]:
        return {inst.doc["prompt"]: inst.arguments[0] for inst in leaf.instances}

    whole = through.evaluate().per_item["facts_fewshot"]
    whole_prompts = prompts()
    subset = {"facts_fewshot": [1, 4, 6]}
    assert through.evaluate(subset).per_item["facts_fewshot"] == {i: whole[i] for i in (1, 4, 6)}
    assert all(whole_prompts[doc] == prompt for doc, prompt in prompts().items())
    assert all(prompt.count("\n\n") >= 2 for prompt in whole_prompts.values())  # two examples, then the question
    assert compiled.evaluate(subset).per_item == through.evaluate(subset).per_item
    assert compiled.evaluate().per_item["facts_fewshot"] == whole


def test_chat_templates_apply_alike_and_are_required_when_asked_for(random_model, local_tasks):
    import copy

    model, tok = random_model
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}<assistant>"
    task = load_task(spec("facts_local", local_tasks, apply_chat_template=True), "search")
    compiled = Evaluator(model, chat_tok, [task], batch_size=8, mode="native")
    assert "<user>" in task.source["facts_local"].instances[0].arguments[0]  # the prompts compiled
    through = Evaluator(model, chat_tok, [task], batch_size=8, mode="lm-eval")
    assert compiled.evaluate().per_item == through.evaluate().per_item
    with pytest.raises(TaskError, match="tokenizer has no chat template; set apply_chat_template: false"):
        Evaluator(model, tok, [task], mode="auto")


def test_a_task_that_cannot_be_compiled_goes_through_lm_eval_with_a_notice(random_model, local_tasks, caplog):
    model, tok = random_model
    task = load_task(spec("facts_loglik", local_tasks), "search")
    with caplog.at_level(logging.WARNING):
        ev = Evaluator(model, tok, [task], mode="auto")
    assert ev.native is None and "scored through lm-eval" in caplog.text
    assert 0 <= ev.evaluate().scores["facts_loglik"] <= 1
    with pytest.raises(TaskError, match="cannot be scored natively"):
        Evaluator(model, tok, [task], mode="native")


def _fitness_column(run: Path) -> list[str]:
    with open(run / "trials.csv") as fh:
        return [row["fitness"] for row in csv.DictReader(fh)]


def search(zoo: Path, runs: Path, name: str, *extra: str) -> list[str]:
    args = [
        "search",
        "--zoo",
        str(zoo),
        "--space",
        str(Path(__file__).parents[1] / "search_spaces" / "sakana_ps.yaml"),
        "--trials",
        "6",
        "--popsize",
        "3",
        "--runs-dir",
        str(runs),
        "--name",
        name,
        "--no-baselines",
        *extra,
    ]
    assert main(args) == 0
    return _fitness_column(runs / name)


def test_lm_eval_search_gives_the_native_fitness_trial_for_trial(small_zoo, tmp_path):
    tasks = [
        "--tasks",
        str(small_zoo),
        "--task-names",
        "facts_a",
        "facts_b",
        "math_b",
        "--subsample",
        "6",
        "--racing",
        "bound",
    ]
    native = search(small_zoo, tmp_path, "native", *tasks, "--evaluator", "native")
    through = search(small_zoo, tmp_path, "lm-eval", *tasks, "--evaluator", "lm-eval")
    assert native == through and len(set(native)) > 1
    report = json.loads((tmp_path / "lm-eval" / "report.json").read_text())
    assert (
        report["rows"]["evolved"]["facts_a"]
        == json.loads((tmp_path / "native" / "report.json").read_text())["rows"]["evolved"]["facts_a"]
    )


def test_a_mergekit_evolve_config_runs_to_a_report(small_zoo, tmp_path):
    m = json.loads((small_zoo / "manifest.json").read_text())
    config = {
        "genome": {
            "models": [m["base"], m["experts"]["expert_math"], m["experts"]["expert_lang_b"]],
            "merge_method": "dare_ties",
            "base_model": m["base"],
            "layer_granularity": 1,
            "filters": ["mlp"],
            "smooth": True,
        },
        "tasks": [{"name": "zoo_facts_b", "weight": 2.0}, {"name": "zoo_math_b", "metric": "exact_match,none"}],
        "limit": 8,
        "apply_chat_template": False,
        "fewshot_as_multiturn": False,
    }
    (tmp_path / "evol.yml").write_text(yaml.safe_dump(config))
    args = [
        "search",
        "--mergekit-evolve",
        str(tmp_path / "evol.yml"),
        "--include-path",
        str(small_zoo / "tasks" / "lm_eval"),
        "--trials",
        "3",
        "--popsize",
        "3",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--no-baselines",
    ]
    assert main(args) == 0
    run = tmp_path / "runs" / "evol"
    report = json.loads((run / "report.json").read_text())
    assert report["tasks"] == ["zoo_facts_b", "zoo_math_b"] and "evolved" in report["rows"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["subsample"] == 8 and cfg["space"]["smooth"] and cfg["space"]["filters"] == ["mlp"]
    assert len(cfg["sources"]) == 2  # the base is not a source
    best = yaml.safe_load((run / "best_recipe.yaml").read_text())
    weight = best["models"][0]["parameters"]["weight"]
    assert [r.get("filter") for r in weight] == ["mlp", None] and len(weight[0]["value"]) == 2  # 2 anchors, 2 layers


@pytest.mark.parametrize(
    "task, extra, message",
    [
        ({"lm_eval": "no_such_task"}, [], "unknown lm-eval task or group 'no_such_task'"),
        ({"lm_eval": "facts_local", "metric": "f1,none"}, [], "does not report 'f1,none'; it reports acc,none"),
        ({"lm_eval": "facts_group", "search_fraction": 0.01}, [], "no documents in its search part"),
        ({"lm_eval": "facts_local"}, ["--subsample", "1000"], "more than the 16 examples of its search part"),
    ],
)
def test_bad_lm_eval_input_fails_before_anything_is_written(
    small_zoo, local_tasks, tmp_path, capsys, task, extra, message
):
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([{**task, "include_path": str(local_tasks)}]))
    args = [
        "search",
        "--zoo",
        str(small_zoo),
        "--tasks",
        str(tmp_path / "tasks.yaml"),
        "--trials",
        "2",
        "--runs-dir",
        str(tmp_path / "runs"),
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_worker_joins_a_search_on_lm_eval_tasks(small_zoo, tmp_path):
    """The run's config carries the lm-eval specs to the worker, which rebuilds them and finishes the study."""
    import optuna

    include = str(small_zoo / "tasks" / "lm_eval")
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump([{"lm_eval": "zoo_facts_b", "include_path": include}]))
    args = ["search", "--zoo", str(small_zoo), "--tasks", str(tmp_path / "tasks.yaml"), "--optimizer", "tpe",
            "--trials", "2", "--runs-dir", str(tmp_path), "--name", "w", "--no-baselines"]  # fmt: skip
    assert main(args) == 0
    url = f"sqlite:///{tmp_path / 'w' / 'study.db'}"
    assert main(["worker", "--storage", url, "--study", "w", "--trials", "4"]) == 0
    done = [t for t in optuna.load_study(study_name="w", storage=url).trials if t.state.name == "COMPLETE"]
    assert len(done) == 4 and all("zoo_facts_b" in t.user_attrs["scores"] for t in done)
    assert json.loads((tmp_path / "w" / "report.json").read_text())["n_trials"] == 4


def test_shared_prefix_on_a_compiled_multiple_choice_task_scores_as_lm_eval(random_model, local_tasks):
    model, tok = random_model
    once = load_task(spec("facts_local", local_tasks, metric="acc_norm,none", shared_prefix=True), "search")
    compiled = Evaluator(model, tok, [once], batch_size=4, mode="native")
    assert compiled.native.tasks[0].spec.shared_prefix
    through = Evaluator(model, tok, [once], batch_size=4, mode="lm-eval")
    assert compiled.evaluate().per_item == through.evaluate().per_item


def test_a_regex_answer_that_is_final_ends_its_generation_with_lm_evals_scores(small_zoo, random_model, tmp_path):
    """A subtask whose filter takes the first match of a regex stops decoding a row once that match is final: the
    scores equal lm-eval's own (which generates to the limit) while the native path runs fewer decode steps than
    for the last match (known only at the end)."""
    model, tok = random_model
    math = load_task(load_specs(small_zoo, ["math_b"])[0], "search")
    longer = Task(dataclasses.replace(math.spec, max_new_tokens=24, stop=[]), "search", math.items)
    outputs = NativeEvaluator(model, tok, [longer]).generate(longer)
    firsts = [re.findall(r"[0-9]", outputs[i])[:1] or ["x"] for i in range(len(math.items))]
    rows = [{"question": it["prompt"], "answer": "#### " + (first[0] if i % 3 else "7")}
            for i, (it, first) in enumerate(zip(math.items, firsts))]  # fmt: skip
    digit = {"function": "regex", "regex_pattern": "([0-9])"}
    write_task(
        tmp_path,
        "digits_long",
        rows,
        **{
            **GSM8K_STYLE,
            "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": 24},
            "filter_list": [
                {"name": "first", "filter": [digit, {"function": "take_first"}]},
                {"name": "last", "filter": [{**digit, "group_select": -1}, {"function": "take_first"}]},
            ],
        },
    )
    calls: list[int] = []
    counting = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        steps = {}
        for name in ("first", "last"):
            task = load_task(spec("digits_long", tmp_path, metric=f"exact_match,{name}"), "search")
            calls.clear()
            compiled = Evaluator(model, tok, [task], batch_size=8, mode="native").evaluate()
            steps[name] = len(calls)
            through = Evaluator(model, tok, [task], batch_size=8, mode="lm-eval").evaluate()
            assert compiled.per_item == through.per_item
            assert 0 < compiled.scores["digits_long"] < 1
    finally:
        counting.remove()
    assert steps["first"] < steps["last"] / 2
