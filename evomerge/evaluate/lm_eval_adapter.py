"""lm-eval tasks as evomerge tasks.

A spec names a task the way mergekit-evolve does — `{lm_eval: <task or group>, metric: "acc,none", weight}`,
plus optionally `include_path`, `search_split`/`select_split`/`test_split`, `search_fraction`, `select_fraction`,
`split_seed`, `num_fewshot`.
Its task objects are built from the task's own YAML (`TaskManager(include_path, include_defaults=False)` when a
folder is given: the default scan of every bundled task costs ~9 s), and its documents are divided once into a
search part and a held-out test part:
- the splits the spec names (`search_split`, `test_split`), else
- the task's own `validation_split` (search) and `test_split` (test) when it defines both, else
- a seeded random `search_fraction` (default 0.5) of its evaluation documents for search, the rest for test;
and, when asked, a select part (choosing the run's recipe): the split `select_split` names, or a seeded random
`select_fraction` of the search part.
Every document is scored on its own (lm-eval's logged samples), so subsampling and racing work as for native
tasks, and a group scores the mean over all its subtasks' documents.

Scoring runs through one `HFLM(pretrained=model)` on the resident model and `lm_eval.evaluator.evaluate` (never
`simple_evaluate`, which rebuilds everything per call). Where a task is plain enough — multiple choice scored by
acc/acc_norm, or greedy generate_until — `compile_native` turns its requests, built by lm-eval itself and encoded
by the same HFLM, into native batched items whose outputs go through the task's own filters and
`process_results`: the same scores without lm-eval's per-call work.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import random
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import TaskError, one_line
from .native import EvalResult
from .tasks import SPLITS, Task, TaskSpec, has_select

DEFAULT_FRACTION = 0.5
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed, plus a number from each document
MC_METRICS = ("acc", "acc_norm")  # computed by process_results from log-likelihoods alone
SPEC_KEYS = {
    "name",
    "lm_eval",
    "metric",
    "weight",
    "include_path",
    "search_split",
    "select_split",
    "test_split",
    "search_fraction",
    "select_fraction",
    "split_seed",
    "num_fewshot",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "system_instruction",
    "shared_prefix",
}
PROMPT_KEYS = ("apply_chat_template", "fewshot_as_multiturn", "system_instruction")  # lm-eval's prompt options


# ---- specs ----------------------------------------------------------------------------------------
def spec_from_dict(d: dict[str, Any], root: Path | None = None) -> TaskSpec:
    """A TaskSpec of kind lm_eval; relative include paths are taken from the task file's folder."""
    where = f"lm-eval task spec {d.get('name', d.get('lm_eval', '?'))!r}"
    unknown = sorted(set(d) - SPEC_KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    task = d["lm_eval"]
    if not isinstance(task, str) or not task:
        raise TaskError(f"{where}: lm_eval must name an lm-eval task or group")
    opts: dict[str, Any] = {"task": task}
    if d.get("include_path"):
        include = Path(d["include_path"]).expanduser()
        opts["include_path"] = str((root / include) if root and not include.is_absolute() else include)
    for key in ("search_split", "select_split", "test_split"):
        if key in d:
            opts[key] = str(d[key])
    for key, named in (("search_fraction", "search_split"), ("select_fraction", "select_split")):
        if key not in d:
            continue
        fraction = d[key]
        if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise TaskError(f"{where}: {key} must be a number in (0, 1), got {fraction!r}")
        if named in d:
            raise TaskError(f"{where}: give {named} or {key}, not both")
        opts[key] = float(fraction)
    for key in ("split_seed", "num_fewshot"):
        if key in d:
            if not isinstance(d[key], int) or d[key] < 0:
                raise TaskError(f"{where}: {key} must be an integer ≥ 0, got {d[key]!r}")
            opts[key] = d[key]
    for key in ("apply_chat_template", "fewshot_as_multiturn", "shared_prefix"):
        if key in d:
            if not isinstance(d[key], bool):
                raise TaskError(f"{where}: {key} must be true or false, got {d[key]!r}")
            opts[key] = d[key]
    if d.get("system_instruction") is not None:
        opts["system_instruction"] = str(d["system_instruction"])
    metric = str(d.get("metric", "acc,none"))  # mergekit-evolve's default
    if "," not in metric:
        metric += ",none"
    return TaskSpec(
        name=str(d.get("name", task)),
        kind="lm_eval",
        files={},
        metric=metric,
        weight=float(d.get("weight", 1.0)),
        lm_eval=opts,
    )


def from_native(spec: TaskSpec, folder: Path) -> TaskSpec:
    """The lm-eval twin of a native jsonl task: its YAML written into `folder`, searched on its search split,
    selected on its select split (when it has one) and reported on its test split."""
    write_task_yaml(folder, spec, f"evomerge_{spec.name}")
    metric = "acc,none" if spec.kind == "multiple_choice" else "exact_match,none"
    return spec_from_dict(
        {
            "name": spec.name,
            "lm_eval": f"evomerge_{spec.name}",
            "metric": metric,
            "weight": spec.weight,
            "include_path": str(folder),
            "search_split": "search",
            "test_split": "test",
            **({"select_split": "select"} if "select" in spec.files else {}),
        }
    )


def write_task_yaml(folder: Path, spec: TaskSpec, task_name: str) -> Path:
    """An lm-eval YAML for a native jsonl task: its search split as the validation split, its test split as the
    test split (a select split is in its data files, for `select_split`), scored as the native evaluator scores it
    (exact match of stripped strings, or accuracy)."""
    import yaml

    cfg: dict[str, Any] = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": dict(spec.files)},
        "validation_split": "search",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }
    if spec.kind == "generate":
        if spec.metric != "exact_match":
            raise TaskError(f"task {spec.name}: metric {spec.metric!r} has no lm-eval twin (exact_match has)")
        cfg.update(
            {
                "output_type": "generate_until",
                "doc_to_target": "{{answer}}",
                "generation_kwargs": {
                    "until": list(spec.stop),
                    "do_sample": False,
                    "max_gen_toks": spec.max_new_tokens,
                },
                "metric_list": [
                    {
                        "metric": "exact_match",
                        "aggregation": "mean",
                        "higher_is_better": True,
                        "regexes_to_ignore": ["^\\s+", "\\s+$"],  # compare stripped strings
                    }
                ],
            }
        )
    else:
        cfg.update(
            {
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{task_name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---- building tasks and their parts ---------------------------------------------------------------
def _quiet() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface", "lm_eval.api.task", "lm_eval.tasks"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=None)
def task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    _quiet()
    return TaskManager(include_path=include_path, include_defaults=include_path is None)


def build_leaves(spec: TaskSpec) -> dict[str, Any]:
    """Fresh lm-eval task objects (leaf tasks; a group's subtasks) for the spec."""
    opts = spec.lm_eval
    include = opts.get("include_path")
    if include and not Path(include).is_dir():
        raise TaskError(f"lm-eval task {spec.name}: include_path {include} is not a folder")
    managers = [task_manager(include)] + ([task_manager(None)] if include else [])
    for manager in managers:
        if opts["task"] in manager.all_subtasks + manager.all_groups + manager.all_tags:
            break
    else:
        known = managers[0].all_subtasks + managers[0].all_groups
        close = difflib.get_close_matches(opts["task"], known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = f" in {include} or lm-eval's own tasks" if include else ""
        raise TaskError(f"unknown lm-eval task or group {opts['task']!r}{where}{hint}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            leaves = dict(manager.load([opts["task"]])["tasks"])
    except Exception as e:  # a task's YAML, dataset or !function failed: lm-eval raises anything
        raise TaskError(f"lm-eval task {opts['task']}: cannot be built ({one_line(e)})") from None
    for leaf in leaves.values():
        if "num_fewshot" in opts:
            leaf.set_config(key="num_fewshot", value=opts["num_fewshot"])
        _check_metric(spec, leaf)
        _fewshot_per_document(leaf)
    return leaves


def _fewshot_per_document(leaf: Any) -> None:
    """Draw a document's few-shot examples with a seed taken from the document itself. lm-eval draws them in
    sequence, so a document's examples would depend on which other documents a call scores: with subsampling
    or racing a candidate's fitness would change with its subset, and the lm-eval and native paths (the latter
    builds its prompts once) would disagree."""
    import hashlib
    import json

    original = leaf.fewshot_context

    def fewshot_context(doc, *args, **kwargs):
        if getattr(leaf, "sampler", None) is not None and (leaf.config.num_fewshot or 0) > 0:
            text = json.dumps(doc, sort_keys=True, default=str)
            leaf.sampler.set_rnd(FEWSHOT_SEED + int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))
        return original(doc, *args, **kwargs)

    leaf.fewshot_context = fewshot_context


def _check_metric(spec: TaskSpec, leaf: Any) -> None:
    from lm_eval.api.metrics import mean

    metric, _, filter_name = spec.metric.partition(",")
    filters = [f.name for f in getattr(leaf, "_filters", [])] or ["none"]
    metrics = list(leaf.aggregation())
    if metric not in metrics or filter_name not in filters:
        reported = ", ".join(f"{m},{f}" for f in filters for m in metrics)
        raise TaskError(
            f"lm-eval task {spec.name}: {leaf.task_name} does not report {spec.metric!r}; it reports {reported}"
        )
    if leaf.aggregation()[metric] is not mean:
        raise TaskError(
            f"lm-eval task {spec.name}: {metric} is aggregated over the whole split ({leaf.aggregation()[metric]}), "
            "not averaged over documents; evomerge scores documents one by one (subsampling, racing)"
        )


def select_part(spec: TaskSpec, name: str, leaf: Any, split: str) -> list[int]:
    """The document ids of `leaf` (an lm-eval subtask) in the search, select or test part. A named split points the
    leaf at that split (its evaluation docs become the part); otherwise its evaluation docs are shuffled with the
    spec's seed and cut at `search_fraction`. `select_fraction` carves the select part out of the search part, so
    the test part is the same with or without one."""
    opts = spec.lm_eval
    cfg = leaf.config
    if not hasattr(leaf, "evomerge_splits"):  # the task's own splits, before a part points it elsewhere
        leaf.evomerge_splits = (cfg.validation_split, cfg.test_split)
    validation, test = leaf.evomerge_splits
    if "search_fraction" in opts:
        search_split = None
    else:
        search_split = opts.get("search_split") or (validation if validation is not None and test is not None else None)
    test_split = (opts.get("test_split") or test or validation) if search_split is not None else (test or validation)
    if search_split is not None and search_split == test_split:
        raise TaskError(f"lm-eval task {spec.name}: search and test split are both {search_split!r}")
    if "select_split" in opts and opts["select_split"] in (search_split, test_split):
        raise TaskError(f"lm-eval task {spec.name}: select_split {opts['select_split']!r} is also searched or tested")
    if split == "select" and "select_split" in opts:
        return _point_at(spec, name, leaf, opts["select_split"])
    if search_split is not None:
        if split == "test":
            return _point_at(spec, name, leaf, test_split)
        ids = _point_at(spec, name, leaf, search_split)
    else:  # the evaluation docs (test, else validation), pointed at again where a select_split may have moved them
        moved = test_split and "select_split" in opts
        ids = _point_at(spec, name, leaf, test_split) if moved else list(range(len(leaf.eval_docs)))
        random.Random(f"{opts.get('split_seed', 0)}/{name}").shuffle(ids)
        cut = round(opts.get("search_fraction", DEFAULT_FRACTION) * len(ids))
        if split == "test":
            return sorted(ids[cut:])
        ids = ids[:cut]
    if "select_fraction" not in opts:
        return sorted(ids)
    random.Random(f"{opts.get('split_seed', 0)}/select/{name}").shuffle(ids)
    cut = round((1 - opts["select_fraction"]) * len(ids))
    return sorted(ids[:cut] if split == "search" else ids[cut:])


def _point_at(spec: TaskSpec, name: str, leaf: Any, split_name: str) -> list[int]:
    """Make `split_name` the leaf's evaluation docs; all their ids."""
    available = sorted(leaf.dataset) if hasattr(leaf.dataset, "keys") else []
    if split_name not in available:
        raise TaskError(f"lm-eval task {spec.name}: {name} has no split {split_name!r} (splits: {available})")
    leaf.config.test_split = split_name  # evaluation docs = this split's docs
    return list(range(len(leaf.eval_docs)))


def _part_items(spec: TaskSpec, leaves: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(subtask, document id) of every document in the split's part; a part without documents is an error."""
    items = [(name, doc) for name, leaf in leaves.items() for doc in select_part(spec, name, leaf, split)]
    if not items:
        raise TaskError(f"lm-eval task {spec.name}: no documents in its {split} part")
    return items


def load_lm_eval_task(spec: TaskSpec, split: str) -> Task:
    leaves = build_leaves(spec)
    return Task(spec, split, _part_items(spec, leaves, split), source=leaves)


def check_lm_eval_task(spec: TaskSpec) -> dict[str, int]:
    """Build the task and count the documents of its parts (the held-out ones are counted, never scored)."""
    leaves = build_leaves(spec)
    splits = [s for s in SPLITS if s != "select" or has_select(spec)]
    return {split: len(_part_items(spec, leaves, split)) for split in splits}


def partition_record(tasks: Sequence[Task]) -> dict[str, Any]:
    """What a run records of its lm-eval tasks' search parts: documents per subtask and a digest of their ids, so
    a resume on changed data is caught."""
    import hashlib

    record = {}
    for task in tasks:
        if task.spec.kind != "lm_eval":
            continue
        digest = hashlib.sha256(repr(task.items).encode()).hexdigest()[:16]
        record[task.name] = {"documents": len(task.items), "sha256": digest}
    return record


# ---- scoring through lm-eval ----------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)
def _template(text: str):
    from lm_eval.utils import env

    return env.from_string(text)


@contextlib.contextmanager
def compiled_templates():
    """lm-eval compiles a task's Jinja templates anew for every document on every call — two thirds of its own
    time per candidate on the zoo's tasks. A compiled template depends only on its text, so while evomerge
    scores, `lm_eval.utils.apply_template` keeps them (lm-eval's own environment, the same rendering); the
    original is restored afterwards."""
    import lm_eval.utils

    original = lm_eval.utils.apply_template
    lm_eval.utils.apply_template = lambda template, doc: _template(template).render(**doc)
    try:
        yield
    finally:
        lm_eval.utils.apply_template = original


class _DocIds(list):
    """Sorted document ids for `evaluate(samples=...)`, which tests membership once per document of the split."""

    def __init__(self, ids) -> None:
        super().__init__(sorted(ids))
        self._set = frozenset(self)

    def __contains__(self, doc: object) -> bool:
        return doc in self._set


def make_lm(model: torch.nn.Module, tokenizer, batch_size: int = 64):
    """lm-eval's HF model around the resident model: no copy, no reload; its weights are whatever the engine
    last wrote."""
    from lm_eval.models.huggingface import HFLM

    _quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    for request_type in ("loglikelihood", "loglikelihood_rolling", "generate_until"):  # no progress bar per call
        setattr(lm, request_type, functools.partial(getattr(lm, request_type), disable_tqdm=True))
    return lm


class LMEvalEvaluator:
    """Scores lm-eval tasks document by document, through lm-eval, on the current weights."""

    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[Task], batch_size: int = 64, lm=None):
        self.model = model
        self.tasks = list(tasks)
        self.lm = lm if lm is not None else make_lm(model, tokenizer, batch_size)
        self._where: dict[str, str] = {}  # subtask -> evomerge task
        for task in self.tasks:
            for leaf in task.source:
                if leaf in self._where:
                    raise TaskError(f"lm-eval task {leaf} is part of both {self._where[leaf]} and {task.name}")
                self._where[leaf] = task.name

    def evaluate(self, subset: dict[str, Sequence[int]] | None = None) -> EvalResult:
        """One lm-eval call per set of prompt options (chat template, few-shot as turns, system instruction)."""
        samples: dict[str, list[int]] = defaultdict(list)
        index: dict[tuple[str, int], int] = {}
        calls: dict[tuple, dict[str, Any]] = defaultdict(dict)  # prompt options -> subtasks
        for task in self.tasks:
            if subset is not None and task.name not in subset:
                continue
            for i in subset[task.name] if subset is not None else range(len(task.items)):
                leaf, doc = task.items[i]
                samples[leaf].append(doc)
                index[(leaf, doc)] = i
                calls[prompt_options(task.spec)][leaf] = task.source[leaf]
        result = EvalResult(scores={})
        specs = {task.name: task.spec for task in self.tasks}
        for options, leaves in calls.items():
            out = self._run(leaves, {leaf: samples[leaf] for leaf in leaves}, dict(options))
            for leaf, rows in out["samples"].items():
                name = self._where[leaf]
                metric, _, filter_name = specs[name].metric.partition(",")
                per_item = result.per_item.setdefault(name, {})
                for row in rows:
                    if row["filter"] == filter_name:
                        per_item[index[(leaf, row["doc_id"])]] = float(row[metric])
        for name, per_item in result.per_item.items():
            result.scores[name] = sum(per_item.values()) / len(per_item)
            result.n_examples += len(per_item)
        return result

    def _run(self, leaves: dict[str, Any], samples: dict[str, list[int]], options: dict[str, Any]) -> dict:
        from lm_eval.evaluator import evaluate

        was_training = self.model.training
        self.model.eval()
        try:
            with warnings.catch_warnings(), compiled_templates():
                warnings.simplefilter("ignore")
                return evaluate(
                    lm=self.lm,
                    task_dict={"tasks": leaves, "groups": {}, "group_map": {}},
                    samples={leaf: _DocIds(docs) for leaf, docs in samples.items()},
                    log_samples=True,
                    bootstrap_iters=0,
                    verbosity="ERROR",
                    **options,
                )
        finally:
            self.model.train(was_training)


def prompt_options(spec: TaskSpec) -> tuple:
    """The spec's prompt options as `evaluate` takes them (hashable, to group subtasks into calls)."""
    return tuple((key, spec.lm_eval[key]) for key in PROMPT_KEYS if key in spec.lm_eval)


def check_chat_template(specs: Sequence[TaskSpec], tokenizer) -> None:
    for spec in specs:
        if spec.kind == "lm_eval" and spec.lm_eval.get("apply_chat_template") and not tokenizer.chat_template:
            raise TaskError(
                f"lm-eval task {spec.name}: apply_chat_template is on (mergekit-evolve's default) but the model's "
                "tokenizer has no chat template; set apply_chat_template: false"
            )


# ---- native compilation ---------------------------------------------------------------------------
def compile_native(task: Task, lm) -> Task | str:
    """The task as native items — requests built by lm-eval (prompts, few-shot, delimiters) and encoded by the
    HFLM `lm` exactly as it would encode them — scored by the task's own filters and `process_results`; or, when
    it cannot be compiled, the reason."""
    from lm_eval.models.utils import handle_stop_sequences

    metric, _, filter_name = task.spec.metric.partition(",")
    kinds = {leaf.OUTPUT_TYPE for leaf in task.source.values()}
    if len(kinds) != 1 or not kinds <= {"multiple_choice", "generate_until"}:
        return f"output type {'/'.join(sorted(kinds))} is scored through lm-eval"
    kind = kinds.pop()
    if kind == "multiple_choice" and metric not in MC_METRICS:
        return f"multiple-choice metric {metric} needs more than log-likelihoods"
    docs_of: dict[str, list[int]] = defaultdict(list)
    for leaf, doc in task.items:
        docs_of[leaf].append(doc)
    requests: dict[tuple[str, int], list[Any]] = {}
    options = dict(prompt_options(task.spec))
    chat = bool(options.get("apply_chat_template"))
    for leaf, docs in docs_of.items():
        ids = _DocIds(docs)
        obj = task.source[leaf]
        with warnings.catch_warnings(), compiled_templates():
            warnings.simplefilter("ignore")
            obj.build_all_requests(  # as lm_eval.evaluator.evaluate builds them
                samples=ids,
                rank=0,
                world_size=1,
                system_instruction=options.get("system_instruction"),
                apply_chat_template=chat,
                fewshot_as_multiturn=bool(options.get("fewshot_as_multiturn")),
                chat_template=lm.apply_chat_template if chat else None,
                tokenizer_name=lm.tokenizer_name if chat else "",
            )
        for inst in obj.instances:
            requests.setdefault((leaf, ids[inst.doc_id]), []).append(inst)
    for group in requests.values():
        group.sort(key=lambda r: r.idx)
    if any(inst.repeats != 1 for insts in requests.values() for inst in insts):
        return "repeated sampling is scored through lm-eval"
    items: list[dict[str, Any]] = []
    if kind == "multiple_choice":
        for key in task.items:
            pairs = []
            for inst in requests[key]:
                context, continuation = inst.arguments
                if context:
                    ctx, cont = lm._encode_pair(context, continuation)
                else:
                    ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
                whole = (ctx + cont)[-(lm.max_length + 1) :]
                pairs.append((whole, len(whole) - len(cont)))
            items.append({"pairs_ids": pairs})
        native = TaskSpec(
            task.spec.name,
            "multiple_choice",
            {},
            metric=metric,
            weight=task.spec.weight,
            shared_prefix=bool(task.spec.lm_eval.get("shared_prefix")),
        )
    else:
        kwargs = [inst.arguments[1] for insts in requests.values() for inst in insts]
        if any(k != kwargs[0] for k in kwargs):
            return "its documents have different generation settings"
        gen = dict(kwargs[0])
        if gen.get("do_sample") or float(gen.get("temperature", 0.0) or 0.0) > 0:
            return "sampled generation is scored through lm-eval"
        eos = lm.tok_decode(lm.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(list(gen.get("until") or []), eos=eos)
        max_new = int(gen.get("max_gen_toks", lm.max_gen_toks))
        for key in task.items:
            (inst,) = requests[key]
            items.append({"prompt_ids": lm.tok_encode(inst.arguments[0], left_truncate_len=lm.max_length - max_new)})
        native = TaskSpec(
            task.spec.name, "generate", {}, metric=metric, max_new_tokens=max_new, weight=task.spec.weight, stop=until
        )

    def scorer(which: list[int], outputs: dict[int, Any]) -> dict[int, float]:
        """Outputs (generated text, or a log-likelihood per choice) through lm-eval's own post-processing."""
        from lm_eval.models.utils import postprocess_generated_text

        by_leaf: dict[str, list[int]] = defaultdict(list)
        for i in which:
            by_leaf[task.items[i][0]].append(i)
        scores = {}
        with compiled_templates():
            for leaf, idx in by_leaf.items():
                insts = []
                for i in idx:
                    for r, inst in enumerate(requests[task.items[i]]):
                        inst.resps = (
                            [(float(outputs[i][r]), False)]
                            if kind == "multiple_choice"
                            else [postprocess_generated_text(outputs[i], until, None)]
                        )
                        inst.filtered_resps = {}
                        insts.append(inst)
                # each subtask's own filter pipeline (a group's subtasks may extract answers differently)
                next(f for f in task.source[leaf]._filters if f.name == filter_name).apply(insts)
                for i in idx:
                    group = requests[task.items[i]]
                    result = task.source[leaf].process_results(
                        group[0].doc, [inst.filtered_resps[filter_name] for inst in group]
                    )
                    scores[i] = float(result[metric])
        return scores

    answered = _answer_finality(task, filter_name, until, lm.tokenizer) if kind == "generate_until" else None
    return Task(native, task.split, items, source=task.source, scorer=scorer, answered=answered)


POINTWISE = ("TakeFirstFilter", "LowercaseFilter", "UppercaseFilter", "MapFilter", "WhitespaceFilter")


def _answer_finality(task: Task, filter_name: str, until: Sequence[str], tokenizer) -> Any:
    """(item, text so far) → whether the score can no longer change, for subtasks whose filter pipeline takes a
    regex match (`group_select` ≥ 0) and then only maps it (take_first, lowercase, map, ...): the metric reads the
    filtered answer alone, so a final match is a final score. None when no subtask qualifies, or when the tokenizer
    cleans up spaces on decoding (" ," → ",": the text so far need not begin the final text)."""
    from lm_eval.filters.extraction import RegexFilter

    from .finality import MatchFinal, Unsupported, settled

    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    finals: dict[str, MatchFinal] = {}
    for leaf, obj in task.source.items():
        pipeline = next(f for f in obj._filters if f.name == filter_name)
        filters = [make() for make in pipeline.filters]
        if not filters or not isinstance(filters[0], RegexFilter):
            continue
        if any(type(f).__name__ not in POINTWISE for f in filters[1:]):
            continue
        try:
            finals[leaf] = MatchFinal(filters[0].regex_pattern, filters[0].group_select)
        except Unsupported as e:
            logging.getLogger(__name__).debug("%s: answers decoded to the stop strings or the limit (%s)", leaf, e)
    if not finals:
        return None

    def answered(item: int, text: str) -> bool:
        final = finals.get(task.items[item][0])
        return final is not None and final(settled(text, until))

    return answered
