"""One evaluator over a mix of tasks — native jsonl tasks and lm-eval tasks — chosen by `--evaluator`:

- `auto` (default): native tasks natively; an lm-eval task compiled to native items when it is plain enough
  (`lm_eval_adapter.compile_native`), else scored through lm-eval with a one-line notice;
- `native`: like auto, but an lm-eval task that cannot be compiled is an error;
- `lm-eval`: every task through lm-eval, native jsonl tasks through their generated lm-eval twin (`with_twins`).
Classification tasks, and generation on an encoder-decoder, are scored through the model's own head whatever the
mode (`classify.py`, `seq2seq.py`).

Whatever the mix, one call scores the tasks (or the item subsets) asked for and returns per-item scores, so
fitness, subsampling and racing treat every kind alike.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from ..errors import TaskError
from .native import EvalResult, NativeEvaluator
from .tasks import Task, TaskSpec

log = logging.getLogger(__name__)

EVALUATORS = ("auto", "native", "lm-eval")


def with_twins(specs: Sequence[TaskSpec], evaluator: str) -> list[TaskSpec]:
    """For `--evaluator lm-eval`, native jsonl tasks become lm-eval tasks generated from them (YAML in a folder
    of this process, removed at exit); otherwise the specs as given."""
    if evaluator != "lm-eval" or all(s.kind in ("lm_eval", "classify") for s in specs):
        return list(specs)
    from .lm_eval_adapter import from_native

    folder = Path(tempfile.mkdtemp(prefix="evomerge-lm-eval-"))
    atexit.register(shutil.rmtree, folder, True)
    return [s if s.kind in ("lm_eval", "classify") else from_native(s, folder) for s in specs]


class Evaluator:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tasks: Sequence[Task],
        batch_size: int = 64,
        mode: str = "auto",
        decoder: str | None = None,
    ) -> None:
        if mode not in EVALUATORS:
            raise TaskError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {mode!r}")
        self.tasks = list(tasks)
        if any(task.spec.kind == "lm_eval" for task in self.tasks):
            from .lm_eval_adapter import check_chat_template

            check_chat_template([task.spec for task in self.tasks], tokenizer)
        native: list[Task] = []
        through_lm_eval: list[Task] = []
        classify: list[Task] = []  # a classifier's accuracy
        seq2seq: list[Task] = []  # generation through an encoder-decoder's own generate
        encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        lm = None
        for task in self.tasks:
            if task.spec.kind == "classify":
                classify.append(task)
                continue
            if encoder_decoder and task.spec.kind == "generate":
                seq2seq.append(task)
                continue
            if task.spec.kind != "lm_eval":
                native.append(task)
                continue
            from .lm_eval_adapter import compile_native, make_lm

            lm = lm or make_lm(model, tokenizer, batch_size)
            if mode == "lm-eval":
                through_lm_eval.append(task)
                continue
            compiled = compile_native(task, lm)
            if isinstance(compiled, Task):
                native.append(compiled)
            elif mode == "native":
                raise TaskError(
                    f"lm-eval task {task.name} cannot be scored natively ({compiled}); use --evaluator auto or lm-eval"
                )
            else:
                log.warning("lm-eval task %s is scored through lm-eval: %s", task.name, compiled)
                through_lm_eval.append(task)
        self.native = NativeEvaluator(model, tokenizer, native, batch_size, decoder=decoder) if native else None
        self.heads = []
        if classify:
            from .classify import ClassifierEvaluator

            self.heads.append(ClassifierEvaluator(model, tokenizer, classify, batch_size=batch_size))
        if seq2seq:
            from .seq2seq import Seq2SeqEvaluator

            self.heads.append(Seq2SeqEvaluator(model, tokenizer, seq2seq, batch_size=batch_size))
        self.lm_eval = None
        if through_lm_eval:
            from .lm_eval_adapter import LMEvalEvaluator

            self.lm_eval = LMEvalEvaluator(model, tokenizer, through_lm_eval, batch_size=batch_size, lm=lm)

    @property
    def granularity(self) -> int | None:
        """Items of a task one round of batches scores (what racing can stop between); None when lm-eval scores
        a task (its requests run as one call)."""
        if self.lm_eval is not None:
            return None
        parts = [p for p in (self.native, *self.heads) if p is not None]
        return min(p.batch_size * getattr(p, "workers", 1) for p in parts) if parts else None

    def evaluate(self, subset: dict[str, Sequence[int]] | None = None) -> EvalResult:
        """Score every task, or only the tasks and item indices in `subset`, with the model's current weights."""
        result = EvalResult(scores={})
        for part in (self.native, *self.heads, self.lm_eval):
            if part is None:
                continue
            r = part.evaluate(subset)
            result.scores.update(r.scores)
            result.per_item.update(r.per_item)
            result.n_examples += r.n_examples
        return result
