"""`evomerge zoo build`: a deterministic miniature of the evolutionary-merging setup, built offline.

Models (all LlamaForCausalLM, one char-level tokenizer):
- base: pre-trained on a lopsided bilingual mix — mostly language-A text, some A arithmetic, a little
  language-B text and B arithmetic, a little word reversal — so it is mediocre at everything.
- experts, fine-tuned from the base until their own task is learned (version 2; version 1's modest learning
  rate left them half-trained): `expert_math` (A arithmetic only), `expert_lang_b` (B text, with B arithmetic at
  a fifth of it, as a language model of B would see), `expert_reverse` (A reversal). Arithmetic asked in B
  needs the first two: one computes, the other reads B (benchmarks/zoo_composition.py).
- soup ingredients: fine-tunes of the math task with different learning rates and seeds.
Tasks (jsonl, disjoint search/select/test splits — select is half of the held-out items once searched, so
training data are the same as before it existed; lm-eval YAMLs with absolute paths):
- math_a (expert_math's), facts_b (expert_lang_b's, multiple choice), reverse_a (expert_reverse's),
  facts_a (multiple choice), and the composed target math_b: arithmetic asked in language B.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..evaluate.tasks import SPLITS, TaskSpec, load_task, write_jsonl
from ..recipe import atomic_write_text
from . import world as W
from .tokenizer import build_char_tokenizer
from .train import train_lm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooConfig:
    seed: int = 0
    # 2: packed batches, fused AdamW, fine-tunes in one-thread processes side by side; experts at lr 1e-3
    version: int = 2
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 512
    batch_size: int = 64
    base_steps: int = 1000
    base_lr: float = 2e-3
    expert_steps: int = 300
    expert_lr: float = 1e-3
    soup_steps: int = 150
    soup_lrs: tuple[float, ...] = (1e-4, 2e-4, 4e-4, 8e-4)
    eval_ops_per_pair: int = 4  # math eval items per held-out operand pair (1 → 250 items a split, 4 → 1000)

    def key(self) -> str:
        return config_key(self)


FULL = ZooConfig()
SMALL = ZooConfig(  # the tests' zoo: trained for seconds, so every model is near chance
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    intermediate_size=64,
    batch_size=16,
    base_steps=30,
    expert_steps=10,
    soup_steps=5,
    soup_lrs=(1e-4, 4e-4),
    eval_ops_per_pair=1,
)


# `--small`: the smoke zoo (build ≈ 1 min on 2 cores): the experts learn their facts, arithmetic stays at a few
# percent (small sums), so rows differ where SMALL — the tests' zoo, trained for seconds — scores zeros
SMOKE = ZooConfig(
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=192,
    batch_size=32,
    base_steps=300,
    base_lr=3e-3,
    expert_steps=100,
    expert_lr=1e-3,
    soup_steps=30,
    soup_lrs=(1e-4, 4e-4),
    eval_ops_per_pair=1,
)


def config_key(config: Any) -> str:
    """A short hash of a dataclass configuration: builds of different configurations never share a directory."""
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:12]


def cached_dir(kind: str, config: Any) -> Path:
    """$EVOMERGE_CACHE (default ~/.cache/evomerge)/<kind>-<config hash>."""
    root = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))
    return root / f"{kind}-{config_key(config)}"


def default_zoo_dir(config: ZooConfig) -> Path:
    return cached_dir("zoo", config)


# ---- text mixtures ---------------------------------------------------------------------------
def _mixture(parts: list[tuple[float, Callable[[random.Random], str]]]) -> Callable[[random.Random], str]:
    total = sum(w for w, _ in parts)

    def sample(rng: random.Random) -> str:
        x = rng.random() * total
        for w, fn in parts:
            x -= w
            if x <= 0:
                return fn(rng)
        return parts[-1][1](rng)

    return sample


def _streams(world: W.World, held_out_words: set[str]) -> dict[str, Callable[[random.Random], str]]:
    def math_a(rng):
        p, a = W.math_example(world, rng)
        return p + a

    def reverse_a(rng):
        while True:
            w = W.reverse_word(rng)
            if w not in held_out_words:
                p, a = W.reverse_example(w)
                return p + a

    return {
        "sent_a": lambda rng: W.sentence(world, rng),
        "sent_b": lambda rng: world.to_b(W.sentence(world, rng)),
        "math_a": math_a,
        "math_b": lambda rng: world.to_b(math_a(rng)),
        "reverse_a": reverse_a,
    }


# the base's lopsided bilingual mixture: mostly A, a little B (text and math), A math, a little reversal
BASE_MIXTURE = ((0.60, "sent_a"), (0.05, "sent_b"), (0.005, "math_b"), (0.25, "math_a"), (0.05, "reverse_a"))


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of the base, its data named by stream so that a worker process can draw it."""

    name: str
    mixture: tuple[tuple[float, str], ...]  # (weight, stream name)
    steps: int
    lr: float
    seed: int


def finetunes(config: ZooConfig) -> list[FineTune]:
    """The experts, then the soup ingredients (fine-tunes of the math task with different learning rates)."""
    s, steps, lr = config.seed, config.expert_steps, config.expert_lr
    experts = [
        FineTune("expert_math", ((1.0, "math_a"),), steps, lr, s + 1),
        # fluent in B: B text with B math at its natural share, like a language model of B
        FineTune("expert_lang_b", ((0.8, "sent_b"), (0.2, "math_b")), steps, lr, s + 2),
        FineTune("expert_reverse", ((1.0, "reverse_a"),), steps, lr, s + 3),
    ]
    soup = [
        FineTune(f"soup_math_{i}", ((1.0, "math_a"),), config.soup_steps, soup_lr, s + 100 + i)
        for i, soup_lr in enumerate(config.soup_lrs)
    ]
    return experts + soup


# ---- tasks ---------------------------------------------------------------------------------------
TASKS_VERSION = 2  # 2: a select split (half of the former search split); a zoo with older tasks gets them rewritten


def _search_and_select(items: list[dict], group: int = 1) -> tuple[list[dict], list[dict]]:
    """The first half of the items for search, the second for select, cut between groups of `group` items (the
    items of one operand pair stay together: search and select never share a pair)."""
    cut = len(items) // group // 2 * group
    return items[:cut], items[cut:]


def write_tasks(root: Path, world: W.World, final_root: Path | None = None, ops: int = 1) -> list[TaskSpec]:
    """Write every task's splits under `root`; the specs (and lm-eval YAMLs) name them under
    `final_root`, where the build is renamed to once complete."""
    specs = []
    final_root = (final_root or root).resolve()

    def add(name, kind, searched, test, group=1, **kw):
        search, select = _search_and_select(searched, group)
        files = {}
        for split, items in (("search", search), ("select", select), ("test", test)):
            write_jsonl(root / "tasks" / name / f"{split}.jsonl", items)
            files[split] = str(final_root / "tasks" / name / f"{split}.jsonl")
        specs.append(TaskSpec(name=name, kind=kind, files=files, **kw))

    add(
        "math_a",
        "generate",
        W.math_items(world, "search", False, ops),
        W.math_items(world, "test", False, ops),
        group=ops,
        metric="exact_match",
        max_new_tokens=4,
    )
    add(
        "math_b",
        "generate",
        W.math_items(world, "search", True, ops),
        W.math_items(world, "test", True, ops),
        group=ops,
        metric="exact_match",
        max_new_tokens=4,
    )
    rs, rt = W.reverse_items(world.seed, 200, set())
    add("reverse_a", "generate", rs, rt, metric="exact_match", max_new_tokens=8)
    fs, ft = W.fact_items(world, in_b=False)
    add("facts_a", "multiple_choice", fs, ft, metric="acc")
    fs, ft = W.fact_items(world, in_b=True)
    add("facts_b", "multiple_choice", fs, ft, metric="acc")
    write_lm_eval_yamls(root / "tasks" / "lm_eval", specs)
    return specs


def write_lm_eval_yamls(folder: Path, specs: list[TaskSpec]) -> None:
    """One lm-eval task per zoo task, `zoo_<name>`, reading its jsonl files by absolute path: the search split
    as lm-eval's validation split, the test split as its test split (what evomerge searches and reports on)."""
    from ..evaluate.lm_eval_adapter import write_task_yaml

    for spec in specs:
        write_task_yaml(folder, spec, f"zoo_{spec.name}")


def ensure_current_tasks(zoo: Path, say: Callable[[str], None] = log.info) -> None:
    """Bring the tasks of a zoo built by an earlier version up to date: the task files are a function of the world
    seed alone (the models stay as they are); the manifest's scores are measured again."""
    manifest = json.loads((zoo / "manifest.json").read_text())
    specs = [TaskSpec.from_dict(t) for t in manifest["tasks"]]
    if manifest.get("tasks_version", 1) < TASKS_VERSION:
        say(f"rewriting the tasks of {zoo} with a select split (models unchanged), then scoring the models again")
        config = ZooConfig(**manifest["config"])
        specs = write_tasks(zoo, W.make_world(config.seed), ops=config.eval_ops_per_pair)
        models = {"base": manifest["base"], **manifest["experts"], **manifest["soup_ingredients"]}
        tok = build_char_tokenizer(W.ALPHABET)
        scores = score_models({k: Path(v) for k, v in models.items()}, specs, tok, say)
        manifest.update(tasks=[s.to_dict() for s in specs], scores=scores, tasks_version=TASKS_VERSION)
        atomic_write_text(zoo / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    elif not all((zoo / "tasks" / "lm_eval" / f"zoo_{s.name}.yaml").is_file() for s in specs):
        write_lm_eval_yamls(zoo / "tasks" / "lm_eval", specs)


# ---- build ---------------------------------------------------------------------------------------
StepCallback = Callable[[str, int, int, float], None]  # (model, step, total steps, loss)


def _save(model, tokenizer, path: Path) -> str:
    """Save into a sibling and rename: a model directory under models/ is always complete."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)
    return str(path.resolve())


def build_zoo(
    out: str | os.PathLike | None = None,
    config: ZooConfig = FULL,
    progress: Callable[[str], None] | None = None,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
) -> Path:
    """Build (or reuse, when a complete build for this config exists) the zoo; returns its directory.

    The build happens in `.<name>.partial` beside `out`, one finished model at a time, and is renamed to `out`
    when complete: a killed build resumes from its last finished model (training is seeded per model, so
    the result is the same as an uninterrupted build)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out) if out else default_zoo_dir(config)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is a file; choose another --out")
    if (out / "manifest.json").is_file() and not overwrite:
        manifest = json.loads((out / "manifest.json").read_text())
        if manifest.get("config") == json.loads(json.dumps(asdict(config))):
            ensure_current_tasks(out, progress or log.info)
            return out
        raise FileExistsError(f"{out}: holds a zoo built with another config; pass --overwrite or another --out")
    say = progress or (lambda msg: log.info(msg))
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    for legacy in out.parent.glob(f".{out.name}.tmp-*"):  # temporaries of builds before resuming existed
        shutil.rmtree(legacy, ignore_errors=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        work = out.parent / f".{out.name}.partial"
        stamp = json.dumps(asdict(config), sort_keys=True)
        if work.is_dir() and (work / "config.json").is_file() and (work / "config.json").read_text() != stamp:
            shutil.rmtree(work)
        (work / "models").mkdir(parents=True, exist_ok=True)
        (work / "config.json").write_text(stamp)
        done = sorted(p.name for p in (work / "models").iterdir() if not p.name.startswith("."))
        if done:
            say(f"resuming the build in {work}: {len(done)} model(s) already trained ({', '.join(done)})")
        world = W.make_world(config.seed)
        tok = build_char_tokenizer(W.ALPHABET)
        specs = write_tasks(work, world, final_root=out, ops=config.eval_ops_per_pair)
        held_out = {
            item["prompt"].split()[1]
            for split in SPLITS
            for item in _read(work / "tasks" / "reverse_a" / f"{split}.jsonl")
        }
        streams = _streams(world, held_out)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            rope_theta=10000.0,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )

        if not (work / "models" / "base").is_dir():
            torch.manual_seed(config.seed)
            base = LlamaForCausalLM(cfg)
            size, steps = sum(p.numel() for p in base.parameters()) / 1e6, config.base_steps
            say(f"pre-training base ({size:.2f}M params, {steps} steps)")
            report = (lambda step, loss: on_step("base", step, steps, loss)) if on_step else None
            sample = _mixture([(w, streams[name]) for w, name in BASE_MIXTURE])
            train_lm(base, tok, sample, steps, config.base_lr, config.batch_size, config.seed, 50, progress=report)
            _save(base, tok, work / "models" / "base")
        jobs = finetunes(config)
        scores = _finetune_and_score(jobs, work, config, held_out, specs_at(specs, work, out), say, on_step)
        models = {name: str((work / "models" / name).resolve()) for name in scores}  # base, then the fine-tunes
        experts = [j.name for j in jobs if j.name.startswith("expert_")]
        soup = [j.name for j in jobs if j.name.startswith("soup_")]
        # repoint model paths to the final location
        final = {k: str(out.resolve() / Path(v).relative_to(work.resolve())) for k, v in models.items()}
        manifest = {
            "config": json.loads(json.dumps(asdict(config))),
            "tasks_version": TASKS_VERSION,
            "seed": config.seed,
            "base": final["base"],
            "experts": {k: final[k] for k in experts},
            "soup_ingredients": {k: final[k] for k in soup},
            "composed_task": "math_b",
            "expert_tasks": {"expert_math": "math_a", "expert_lang_b": "facts_b", "expert_reverse": "reverse_a"},
            "tasks": [s.to_dict() for s in specs],
            "lm_eval_include_path": str(out.resolve() / "tasks" / "lm_eval"),
            "scores": scores,
            "build_seconds": round(time.time() - started, 1),
        }
        (work / "config.json").unlink()
        (work / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    say(f"zoo ready at {out} ({time.time() - started:.0f}s)")
    return out


def _finetune_and_score(
    jobs: list[FineTune],
    work: Path,
    config: ZooConfig,
    held_out: set[str],
    specs: list[TaskSpec],
    say: Callable[[str], None],
    on_step: StepCallback | None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Train the fine-tunes not yet in `work/models` and score every model (model -> split -> task -> score), in
    worker processes of one thread each, as many at a time as there are cores: the zoo's matrices are too small
    for two threads to keep two cores busy (one 0.27 s step on two threads against 0.34 s each for two one-thread
    processes side by side: 1.6x the steps per second), and a one-thread fine-tune or score computes the same on
    any machine, in a resumed build too. A worker saves each finished model; a failure or an interruption stops
    every worker, so only whole models are left for a resumed build."""
    import multiprocessing
    import queue

    names = ["base", *(j.name for j in jobs)]
    todo = [job for job in jobs if not (work / "models" / job.name).is_dir()]
    # the models there are already are scored first, while the others train
    tasks = [("score", name) for name in names if (work / "models" / name).is_dir()]
    tasks += [("train", job) for job in todo]
    workers = min(len(tasks), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if todo:
        listed = ", ".join(f"{j.name} ({j.steps} steps, lr {j.lr:g})" for j in todo)
        say(f"fine-tuning {listed}: {workers} at a time")
    ctx = multiprocessing.get_context("spawn")  # a fork of a process that ran torch's thread pool can hang
    task_queue, events = ctx.Queue(), ctx.Queue()
    for task in tasks:
        task_queue.put(task)
    for _ in range(workers):
        task_queue.put(None)
    args = (task_queue, events, config, str(work), held_out, specs)
    procs = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    scores: dict[str, dict[str, dict[str, float]]] = {}
    try:
        while len(scores) < len(names):
            try:
                kind, name, *rest = events.get(timeout=0.5)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a zoo worker died (exit code {dead[0]})") from None
                continue
            if kind == "step" and on_step:
                on_step(name, *rest)
            elif kind == "scored":
                scores[name] = rest[0]
                say(f"scored {name} on every task ({len(scores)}/{len(names)})")
            elif kind == "error":
                raise RuntimeError(f"{name} failed: {rest[0]}")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    return {name: scores[name] for name in names}


def _worker(tasks, events, config: ZooConfig, work: str, held_out: set[str], specs: list[TaskSpec]) -> None:
    """A worker process: for each task it takes, fine-tune the base (reporting every step) and save the model, then
    score it; or score a model already saved."""
    import signal
    import traceback

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the build, which stops the workers

    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    models = Path(work) / "models"
    tok = build_char_tokenizer(W.ALPHABET)
    streams = _streams(W.make_world(config.seed), held_out)
    while (task := tasks.get()) is not None:
        kind, what = task
        name = what if kind == "score" else what.name
        try:
            start = models / (name if kind == "score" else "base")  # the model scored, or the one fine-tuned
            model = LlamaForCausalLM(AutoConfig.from_pretrained(start))
            model.load_state_dict(load_file(start / "model.safetensors"))
            if kind == "train":
                sample = _mixture([(w, streams[stream]) for w, stream in what.mixture])

                def report(step: int, loss: float, name: str = name, steps: int = what.steps) -> None:
                    events.put(("step", name, step, steps, loss))

                warmup = min(30, what.steps // 5 + 1)
                train_lm(model, tok, sample, what.steps, what.lr, config.batch_size, what.seed, warmup, progress=report)
                _save(model, tok, models / name)
            events.put(("scored", name, score_model(model.eval(), specs, tok)))
        except Exception as e:  # noqa: BLE001 — reported to the build, which stops
            events.put(("error", name, f"{e}\n{traceback.format_exc()}"))
            return


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One build per zoo directory at a time (a second one would train into the same partial build)."""
    import fcntl

    with open(lock_path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FileExistsError(f"{lock_path}: another zoo build of this directory is running") from None
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def specs_at(specs: list[TaskSpec], tmp: Path, out: Path) -> list[TaskSpec]:
    """The specs as they read while the build still sits in its temporary directory."""
    moved = []
    for s in specs:
        files = {k: str(tmp.resolve() / Path(v).relative_to(out.resolve())) for k, v in s.files.items()}
        moved.append(TaskSpec(**{**s.to_dict(), "files": files}))
    return moved


def score_models(
    models: dict[str, Path], specs: list[TaskSpec], tokenizer, say: Callable[[str], None] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """model -> split -> task -> score, with the native evaluator."""
    from transformers import AutoModelForCausalLM

    scores: dict[str, dict[str, dict[str, float]]] = {}
    for i, (name, path) in enumerate(models.items()):
        if say:
            say(f"scoring {name} on every task ({i + 1}/{len(models)})")
        scores[name] = score_model(AutoModelForCausalLM.from_pretrained(path).eval(), specs, tokenizer)
    return scores


def score_model(model, specs: list[TaskSpec], tokenizer) -> dict[str, dict[str, float]]:
    """split -> task -> score of one model, with the native evaluator."""
    from ..evaluate.native import NativeEvaluator

    return {
        split: NativeEvaluator(model, tokenizer, [load_task(s, split) for s in specs]).evaluate().scores
        for split in SPLITS
    }


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
