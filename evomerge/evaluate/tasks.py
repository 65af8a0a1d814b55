"""Task definitions: jsonl files with a `search` split (the fitness while optimizing), an optional `select` split
(choosing the run's recipe among the best candidates on search) and a `test` split (scored once, for the final
report), or an lm-eval task or group whose docs are divided into the same parts (`lm_eval_adapter`).

The held-out discipline is enforced here: while a search runs (`searching()` is active) loading a test split
raises `HeldOutError`, and so does loading a select split outside `selecting()`, so no candidate is scored on
data that is meant to judge it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import HeldOutError, TaskError

SPLITS = ("search", "select", "test")
KINDS = ("generate", "multiple_choice", "classify")  # native kinds; classify: a classifier's accuracy (classify.py)
REQUIRED = ("search", "test")  # a select split is optional: without one the run's recipe is the best on search
_state = threading.local()


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    """Set a thread-local flag for the enclosed code (restored after, so uses can nest)."""
    prev = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, prev)


def searching() -> contextlib.AbstractContextManager[None]:
    """Mark the enclosed code as search-time: test splits cannot be loaded inside it."""
    return _flag("searching")


def in_search() -> bool:
    return getattr(_state, "searching", False)


def selecting() -> contextlib.AbstractContextManager[None]:
    """Mark the enclosed code as the selection step of a search: select splits can be loaded inside it."""
    return _flag("selecting")


@dataclass
class TaskSpec:
    """Where a task's data lives and how it is scored."""

    name: str
    kind: str  # "generate" (greedy decode, exact match), "multiple_choice" (log-likelihood), "classify" or "lm_eval"
    files: dict[str, str]  # split -> jsonl path (native kinds)
    metric: str = "exact_match"  # exact_match | numeric | acc; for lm-eval "<metric>,<filter>" as lm-eval reports
    max_new_tokens: int = 8
    weight: float = 1.0
    stop: list[str] = field(default_factory=lambda: ["\n"])
    lm_eval: dict[str, Any] | None = None  # lm-eval task options: task, include_path, search_split, ...
    shared_prefix: bool = False  # multiple choice: the choices' common context run once (native.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: Path | None = None) -> "TaskSpec":
        if "lm_eval" in d:
            from .lm_eval_adapter import spec_from_dict

            return spec_from_dict(d, root)
        try:
            files = {k: str((root / v) if root and not Path(v).is_absolute() else v) for k, v in d["files"].items()}
            kind = d["kind"]
        except KeyError as e:
            raise TaskError(f"task spec {d.get('name', '?')}: missing key {e}") from None
        if kind not in KINDS:
            raise TaskError(f"task {d['name']}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        metric = d.get("metric", "exact_match" if kind == "generate" else "acc")
        return cls(
            name=d["name"],
            kind=kind,
            files=files,
            metric=metric,
            max_new_tokens=int(d.get("max_new_tokens", 8)),
            weight=float(d.get("weight", 1.0)),
            stop=list(d.get("stop", ["\n"])),
            shared_prefix=_flag_option(d, "shared_prefix"),
        )

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "lm_eval":
            return {
                "name": self.name,
                "lm_eval": self.lm_eval["task"],
                "metric": self.metric,
                "weight": self.weight,
                **{k: v for k, v in self.lm_eval.items() if k != "task"},
            }
        return {
            "name": self.name,
            "kind": self.kind,
            "files": self.files,
            "metric": self.metric,
            "max_new_tokens": self.max_new_tokens,
            "weight": self.weight,
            "stop": self.stop,
            **({"shared_prefix": True} if self.shared_prefix else {}),
        }


def _flag_option(d: dict[str, Any], key: str) -> bool:
    value = d.get(key, False)
    if not isinstance(value, bool):
        raise TaskError(f"task {d.get('name', '?')}: {key} must be true or false, got {value!r}")
    return value


@dataclass
class Task:
    spec: TaskSpec
    split: str
    items: list[Any]  # native: the jsonl records; lm-eval: (subtask, doc id) pairs
    source: Any = None  # lm-eval: the task objects the items refer to
    # per-task scoring that replaces the built-in one (lm-eval tasks compiled to native items score through
    # the task's own filters and metrics): (item indices, outputs) -> item index -> score
    scorer: Callable[[list[int], dict[int, Any]], dict[int, float]] | None = None
    # generation: (item index, text so far) -> whether more text can no longer change the item's score (rows whose
    # answer is final stop decoding); None: the built-in metric's own rule
    answered: Callable[[int, str], bool] | None = None

    @property
    def name(self) -> str:
        return self.spec.name


def load_task(spec: TaskSpec, split: str) -> Task:
    if split not in SPLITS:
        raise TaskError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "test" and in_search():
        raise HeldOutError(f"task {spec.name}: the test split is held out and cannot be scored during a search")
    if split == "select" and in_search() and not getattr(_state, "selecting", False):
        raise HeldOutError(f"task {spec.name}: the select split only scores the top candidates, never a trial")
    if spec.kind == "lm_eval":
        from .lm_eval_adapter import load_lm_eval_task

        return load_lm_eval_task(spec, split)
    return Task(spec, split, _read_items(spec, split))


def check_task_files(spec: TaskSpec) -> dict[str, int]:
    """Parse every split (the held-out ones too: parsed, never scored) so a malformed line is reported before
    a search starts, not after it ran. Returns split -> number of items."""
    if spec.kind == "lm_eval":
        from .lm_eval_adapter import check_lm_eval_task

        return check_lm_eval_task(spec)
    missing = [split for split in REQUIRED if split not in spec.files]
    if missing:
        raise TaskError(f"task {spec.name}: no {' or '.join(missing)} split (files: {sorted(spec.files)})")
    unknown = sorted(set(spec.files) - set(SPLITS))
    if unknown:
        raise TaskError(f"task {spec.name}: unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
    return {split: len(_read_items(spec, split)) for split in spec.files}


def has_select(spec: TaskSpec) -> bool:
    """Whether the task defines a select part (a `select` file; for lm-eval, `select_split` or `select_fraction`)."""
    if spec.kind == "lm_eval":
        return "select_split" in spec.lm_eval or "select_fraction" in spec.lm_eval
    return "select" in spec.files


def _read_items(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    path = spec.files.get(split)
    if path is None:
        raise TaskError(f"task {spec.name}: no {split} split (files: {sorted(spec.files)})")
    if spec.kind == "classify":
        from .classify import read_items

        if not Path(path).exists():
            raise TaskError(f"task {spec.name}: {split} file {path} not found")
        items = read_items(Path(path))
        if not items:
            raise TaskError(f"{path}: no examples")
        return items
    items = []
    try:
        for where, item in jsonl_records(Path(path)):
            need = ("prompt", "answer") if spec.kind == "generate" else ("prompt", "choices", "label")
            missing = [k for k in need if not isinstance(item, dict) or k not in item]
            if missing:
                raise TaskError(f"{where}: missing field(s) {missing} for a {spec.kind} task")
            items.append(item)
    except (FileNotFoundError, IsADirectoryError):
        raise TaskError(f"task {spec.name}: {split} file {path} not found") from None
    if not items:
        raise TaskError(f"{path}: no examples")
    return items


def jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """("file:line", record) for each non-empty line of a jsonl file; a line that is not JSON is an error."""
    with open(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e})") from None


def load_specs(source: str | Path, names: list[str] | None = None, include_path: str | None = None) -> list[TaskSpec]:
    """Task specs from a zoo manifest (`tasks` list) or a tasks JSON/YAML file; optionally pick by name.
    `include_path` is the lm-eval task folder of lm-eval specs that do not name their own."""
    import yaml

    path = Path(source)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot read task definitions ({e})") from None
    raw = data["tasks"] if isinstance(data, dict) and "tasks" in data else data
    if not isinstance(raw, list) or not all(isinstance(d, dict) and ("name" in d or "lm_eval" in d) for d in raw):
        raise TaskError(
            f"{path}: task definitions are a list of specs with a name (or an lm_eval task) each, or a manifest with "
            "tasks:"
        )
    specs = specs_from_dicts(raw, path.parent, include_path)
    if names:
        by_name = {s.name: s for s in specs}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise TaskError(f"{path}: unknown task(s) {unknown}; known: {sorted(by_name)}")
        specs = [by_name[n] for n in names]
    return specs


def specs_from_dicts(raw: list[dict[str, Any]], root: Path | None, include_path: str | None = None) -> list[TaskSpec]:
    """Specs from their dicts; lm-eval specs without an include_path get `include_path` (`--include-path`)."""
    if include_path:
        raw = [{"include_path": str(Path(include_path).resolve()), **d} if "lm_eval" in d else d for d in raw]
    return [TaskSpec.from_dict(d, root=root) for d in raw]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def number_final(text: str) -> bool:
    """Whether the first number of `text` (what the `numeric` metric reads) is complete: more text cannot change it
    (it is followed by a character that does not continue it: not a digit, nor a point before a digit)."""
    m = _NUMBER.search(text)
    if m is None or m.end() == len(text):
        return False
    rest = text[m.end() :]
    return rest[0] != "." or (len(rest) > 1 and not rest[1].isdigit())


def score_generation(metric: str, output: str, answer: str) -> float:
    """exact_match compares stripped strings; numeric compares the first number in the output."""
    if metric == "numeric":
        m = _NUMBER.search(output)
        return float(m is not None and float(m.group()) == float(answer))
    return float(output.strip() == str(answer).strip())


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(i) + "\n" for i in items))
    tmp.replace(path)
