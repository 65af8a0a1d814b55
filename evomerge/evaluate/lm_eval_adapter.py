"""lm-eval-harness on the in-memory model.

`HFLM(pretrained=model)` wraps the resident model (no reload), and the task objects are built once with
`TaskManager(include_path, include_defaults=False)` (the default scan of every bundled task costs ~9 s);
each call goes straight to `lm_eval.evaluator.evaluate` (not `simple_evaluate`, which re-collects the
environment every time).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)

PRIMARY_METRICS = ("exact_match,strip", "exact_match,none", "acc,none", "exact_match", "acc")


class LMEvalEvaluator:
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tasks: Sequence[str],
        include_path: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> None:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict

        for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=True)
        manager = TaskManager(
            include_path=str(include_path) if include_path else None, include_defaults=include_path is None
        )
        self.task_names = list(tasks)
        with warnings.catch_warnings():  # get_task_dict is deprecated in newer lm-eval but works in all 0.4.x
            warnings.simplefilter("ignore", DeprecationWarning)
            self.task_dict = get_task_dict(self.task_names, manager)

    def evaluate(self, limit: int | None = None) -> dict[str, float]:
        """task -> primary metric, for the model's current weights."""
        from lm_eval.evaluator import evaluate

        out = evaluate(lm=self.lm, task_dict=self.task_dict, limit=limit, log_samples=False, verbosity="ERROR")
        scores = {}
        for name in self.task_names:
            res = out["results"][name]
            key = next((k for k in PRIMARY_METRICS if k in res), None)
            if key is None:
                raise KeyError(f"lm-eval task {name}: none of {PRIMARY_METRICS} in results {sorted(res)}")
            scores[name] = float(res[key])
        return scores


def lm_eval_task_name(task: str, split: str) -> str:
    """Name of the generated lm-eval task for a zoo task split (see zoo.build.write_lm_eval_yamls)."""
    return f"zoo_{task}_{split}"


def include_path_of(manifest_dir: str | os.PathLike) -> Path:
    return Path(manifest_dir) / "tasks" / "lm_eval"
