"""Generation tasks on an encoder-decoder model (T5, BART): the prompt is the encoder's input, the answer the
decoder's greedy output through the model's own `generate`, cut at the task's stop strings and scored as the
native evaluator scores a causal LM's answer."""

from __future__ import annotations

from typing import Sequence

import torch

from .native import ItemEvaluator
from .tasks import Task, score_generation


class Seq2SeqEvaluator(ItemEvaluator):
    def __init__(self, model: torch.nn.Module, tokenizer, tasks: Sequence[Task], batch_size: int = 64) -> None:
        super().__init__(model, tasks, batch_size)
        self.tokenizer = tokenizer
        self._encoded = {t.name: [tokenizer(item["prompt"])["input_ids"] for item in t.items] for t in self.tasks}

    def generate(self, task: Task, which: list[int]) -> dict[int, str]:
        """Greedy answers, batched by prompt length, each cut at the first stop string."""
        ids = self._encoded[task.name]
        order = sorted(which, key=lambda i: len(ids[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: dict[int, str] = {}
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            inp = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(inp)
            for r, i in enumerate(chunk):
                inp[r, : len(ids[i])] = torch.tensor(ids[i])
                mask[r, : len(ids[i])] = 1
            generated = self.model.generate(
                input_ids=inp.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=task.spec.max_new_tokens,
                do_sample=False,
                num_beams=1,
            )
            for i, text in zip(chunk, self.tokenizer.batch_decode(generated, skip_special_tokens=True)):
                for stop in task.spec.stop:
                    text = text.split(stop)[0] if stop else text
                out[i] = text
        return out

    def score(self, task: Task, which: list[int]) -> dict[int, float]:
        texts = self.generate(task, which)
        if task.scorer is not None:
            return task.scorer(which, texts)
        return {i: score_generation(task.spec.metric, texts[i], task.items[i]["answer"]) for i in which}
