"""Native batched evaluator: scores the *current* weights of one resident model.

Everything that does not depend on the weights is done once in the constructor: tokenization, sorting by
length, padding into batches. A call is then only forward passes: greedy decoding with a KV cache for
generation tasks (grown per step, or static and stepped by a CUDA graph: decoding.py), one batched forward per
chunk for log-likelihood multiple choice.
"""

from __future__ import annotations

import inspect
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .decoding import DECODERS, Growing, Static, default_decoder
from .tasks import Task, number_final, score_generation


class NonFiniteLogits(RuntimeError):
    """The model under evaluation produced NaN or infinite logits: its score would be meaningless."""


def check_finite(logits: torch.Tensor) -> None:
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogits("the merged model produces non-finite (NaN/inf) logits")


@dataclass
class EvalResult:
    scores: dict[str, float]  # task -> metric on the examples scored
    per_item: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> item index -> 0/1
    n_examples: int = 0


@dataclass
class _GenBatch:
    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class _MCBatch:
    rows: list[tuple[int, int]]  # (item index, choice index)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cont_mask: torch.Tensor  # positions (in targets) belonging to the continuation


STOP_CHECK_EVERY = 4  # decode steps between looks for multi-token stop strings in the generated text


@dataclass
class _SharedBatch:
    keys: list[tuple[int, int]]  # (item index, choice index) per row of `rest`
    prefix: torch.Tensor  # one row per item: its common prefix, left-padded
    prefix_mask: torch.Tensor
    owner: torch.Tensor  # the prefix row of each choice row
    rest: torch.Tensor  # each choice's tokens after the prefix but its last, right-padded
    rest_mask: torch.Tensor
    targets: torch.Tensor  # each choice's tokens after the prefix (column j predicted by position j − 1)
    scored: torch.Tensor  # targets in the continuation (log-likelihood summed over these)


SMALL_MODEL = 50e6  # parameters: below this, whole batches side by side beat torch's intra-op threads on a CPU


def default_workers(model: torch.nn.Module, device: torch.device) -> int:
    """Threads to share batches among: on the CPU, one per intra-op thread for a small model; else 1 (a large
    model's matrices keep the intra-op threads busy; a GPU runs one stream). See benchmarks/search_throughput.py."""
    if device.type != "cpu" or sum(p.numel() for p in model.parameters()) > SMALL_MODEL:
        return 1
    return torch.get_num_threads()


class ItemEvaluator:
    """What every evaluator of one resident model shares: score the tasks (or the items of them in a subset) with
    the model's current weights, in eval mode without autograd; a subclass says how one task's items score."""

    def __init__(self, model: torch.nn.Module, tasks: Sequence[Task], batch_size: int, device=None) -> None:
        self.model = model
        self.tasks = list(tasks)
        self.batch_size = batch_size
        self.device = torch.device(device) if device else next(model.parameters()).device

    def score(self, task: Task, which: list[int]) -> dict[int, float]:
        raise NotImplementedError

    def evaluate(self, subset: dict[str, Sequence[int]] | None = None) -> EvalResult:
        """Score every task, or only the tasks and item indices given in `subset`, with the current weights."""
        result = EvalResult(scores={})
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                for task in self.tasks:
                    if subset is not None and task.name not in subset:
                        continue
                    which = list(subset[task.name]) if subset is not None else list(range(len(task.items)))
                    if not which:
                        continue
                    per_item = self.score(task, which)
                    result.per_item[task.name] = per_item
                    result.scores[task.name] = sum(per_item.values()) / len(per_item)
                    result.n_examples += len(per_item)
        finally:
            self.model.train(was_training)
        return result


class NativeEvaluator(ItemEvaluator):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        tasks: Sequence[Task],
        batch_size: int = 64,
        device: str | torch.device | None = None,
        workers: int | None = None,
        decoder: str | None = None,
    ) -> None:
        super().__init__(model, tasks, batch_size, device)
        if decoder is not None and decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.decoder = decoder or default_decoder(model, self.device)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        # transformers 5 renamed the KV cache argument and output `past_key_values` -> `cache`
        forward = inspect.signature(model.forward).parameters
        self._cache = "cache" if "cache" in forward else "past_key_values"
        # prefill: the head for the last position only (a vocabulary-wide projection of every prompt token is waste)
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._whole: dict[str, list[_GenBatch]] = {}
        self._prepared = {t.name: self._prepare(t) for t in self.tasks}
        # a static cache holds the longest prompt and answer of the generation tasks
        self._longest = max(
            (
                max(map(len, self._prepared[t.name]["encoded"].values()), default=0) + t.spec.max_new_tokens
                for t in self.tasks
                if t.spec.kind == "generate"
            ),
            default=0,
        )
        # one static cache serves one batch at a time
        if self.decoder != "dynamic":
            self.workers = 1
        else:
            self.workers = workers if workers is not None else default_workers(model, self.device)

    # ---- preparation (once) -------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def _prepare(self, task: Task) -> dict:
        """Token ids once per task. Items may carry them already (`prompt_ids`; `pairs_ids`: per choice the whole
        sequence and its context length), as lm-eval tasks compiled to native items do."""
        if task.spec.kind == "generate":
            encoded = {i: item.get("prompt_ids") or self._encode(item["prompt"]) for i, item in enumerate(task.items)}
            stop_ids, stop_strings = set(), []
            for s in task.spec.stop:
                ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
                if len(ids) == 1:
                    stop_ids.add(ids[0])
                elif s:
                    stop_strings.append(s)
            return {"encoded": encoded, "stop_ids": stop_ids, "stop_strings": stop_strings}
        rows = {}
        for i, item in enumerate(task.items):
            if "pairs_ids" in item:
                rows.update({(i, j): pair for j, pair in enumerate(item["pairs_ids"])})
                continue
            ctx = self._encode(item["prompt"])
            for j, choice in enumerate(item["choices"]):
                whole = self._encode(item["prompt"] + choice)  # as lm-eval: continuation = whole[len(ctx):]
                rows[(i, j)] = (whole, len(ctx))
        prefix = _common_prefixes(rows) if task.spec.shared_prefix else {}
        return {"rows": rows, "n_choices": Counter(i for i, _ in rows), "prefix": prefix}

    def _gen_batches(self, ids: dict[int, list[int]], which: Sequence[int]) -> list[_GenBatch]:
        order = sorted(which, key=lambda i: len(ids[i]))
        batches = []
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in chunk)
            inp = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every prompt ends at the last column
                inp[r, width - len(ids[i]) :] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]) :] = 1
            batches.append(_GenBatch(chunk, inp.to(self.device), mask.to(self.device)))
        return batches

    def _mc_batches(self, rows: dict, which: Sequence[int]) -> list[_MCBatch]:
        wanted = set(which)
        keys = sorted((k for k in rows if k[0] in wanted), key=lambda k: len(rows[k][0]))
        batches = []
        for s in range(0, len(keys), self.batch_size):
            chunk = keys[s : s + self.batch_size]
            width = max(len(rows[k][0]) for k in chunk)
            inp = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            cont = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
            for r, k in enumerate(chunk):
                whole, n_ctx = rows[k]
                inp[r, : len(whole)] = torch.tensor(whole)
                mask[r, : len(whole)] = 1
                cont[r, n_ctx - 1 : len(whole) - 1] = True  # target t+1 predicted at position t
            batches.append(_MCBatch(chunk, inp.to(self.device), mask.to(self.device), cont.to(self.device)))
        return batches

    def _shared_batches(self, task: Task, which: Sequence[int]) -> list[_SharedBatch]:
        """Batches of items for `shared_prefix` scoring: each item's common prefix left-padded (run once), and
        each choice's rest right-padded (run on the prefix's cache)."""
        rows, q = self._prepared[task.name]["rows"], self._prepared[task.name]["prefix"]
        wanted = set(which)
        by_item: dict[int, list[tuple[int, int]]] = {}
        for key in sorted(rows):
            if key[0] in wanted:
                by_item.setdefault(key[0], []).append(key)
        items = sorted(by_item, key=lambda i: len(rows[by_item[i][0]][0]))
        batches = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            keys = [k for i in chunk for k in by_item[i]]
            width = max(q[i] for i in chunk)
            prefix = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            prefix_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                prefix[r, width - q[i] :] = torch.tensor(rows[by_item[i][0]][0][: q[i]])
                prefix_mask[r, width - q[i] :] = 1
            rest_width = max(len(rows[k][0]) - 1 - q[k[0]] for k in keys)
            rest = torch.full((len(keys), max(rest_width, 0)), self.pad_id, dtype=torch.long)
            rest_mask = torch.zeros_like(rest)
            targets = torch.zeros((len(keys), rest_width + 1), dtype=torch.long)
            scored = torch.zeros((len(keys), rest_width + 1), dtype=torch.bool)
            for r, k in enumerate(keys):
                whole, n_ctx = rows[k]
                tail = whole[q[k[0]] :]  # target j is tail[j], predicted by the prefix (j = 0) or rest position j − 1
                rest[r, : len(tail) - 1] = torch.tensor(tail[:-1], dtype=torch.long)
                rest_mask[r, : len(tail) - 1] = 1
                targets[r, : len(tail)] = torch.tensor(tail)
                scored[r, max(0, n_ctx - q[k[0]]) : len(tail)] = True
            row_of = {i: r for r, i in enumerate(chunk)}
            owner = torch.tensor([row_of[k[0]] for k in keys])
            batches.append(
                _SharedBatch(
                    keys,
                    *(t.to(self.device) for t in (prefix, prefix_mask, owner, rest, rest_mask, targets, scored)),
                )
            )
        return batches

    # ---- scoring (every call) -----------------------------------------------------------------
    def score(self, task: Task, which: list[int]) -> dict[int, float]:
        return self._generate(task, which) if task.spec.kind == "generate" else self._multiple_choice(task, which)

    def generate(self, task: Task, which: Sequence[int] | None = None) -> dict[int, str]:
        """Greedy continuations (text) for a generation task's items."""
        with torch.inference_mode():
            return self._decode_all(task, list(range(len(task.items))) if which is None else list(which))

    def _decode_all(self, task: Task, which: list[int]) -> dict[int, str]:
        prep = self._prepared[task.name]
        stop_ids = prep["stop_ids"] | ({self.eos_id} if self.eos_id is not None else set())
        answered = task.answered
        if answered is None and task.spec.metric == "numeric" and task.scorer is None:
            answered = _first_number_final  # scored by its first number alone: complete, the row has its answer
        outputs: dict[int, str] = {}
        for texts in self._map(
            lambda b: self._decode(b, stop_ids, task.spec.max_new_tokens, prep["stop_strings"], answered),
            self._batches_for(task, prep["encoded"], which),
        ):
            outputs.update(texts)
        return outputs

    def _decode(
        self,
        batch: _GenBatch,
        stop_ids: set[int],
        steps: int,
        stop_strings: Sequence[str] = (),
        answered: Callable[[int, str], bool] | None = None,
    ) -> dict[int, str]:
        """Greedy decoding of one batch (the KV cache: `self.decoder`): logits of the last position only, the
        tokens written into a preallocated tensor, stop tokens checked on the device. A stop string of
        several tokens ("Question:") is looked for in the decoded text every few steps: a row that has one is
        done (its answer ends there), so the batch stops as soon as every row has its answer, not at the
        token limit. Answers are cut at the first stop string, as lm-eval's `until` cuts them; a row's tokens
        do not depend on when the others stop, so the answers are those of generating to the limit. `answered`
        ((item, text) → whether its answer is final: a numeric task's complete first number, the answer an
        lm-eval task's regex extracts) ends rows the same way."""
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=self.device)
        decoder = self._decoder()
        logits = decoder.start(batch.input_ids, batch.attention_mask, steps)
        check_finite(logits)  # NaN weights show at the first step; argmax of NaN is garbage
        generated = torch.empty((len(batch.index), max(steps, 1)), dtype=torch.long, device=self.device)
        generated[:, 0] = nxt = logits.argmax(-1)
        done = torch.isin(nxt, stop)
        k = 1
        while k < steps and not bool(done.all()):
            generated[:, k] = nxt = decoder.step(nxt).argmax(-1)
            done |= torch.isin(nxt, stop)
            k += 1
            if (stop_strings or answered) and k % STOP_CHECK_EVERY == 0 and k < steps:
                done |= self._answered_rows(batch.index, generated[:, :k], stop_ids, stop_strings, answered, done)
        gen = generated[:, :k].tolist()
        texts = {}
        for r, i in enumerate(batch.index):
            toks = []
            for t in gen[r]:
                if t in stop_ids:
                    break
                toks.append(t)
            texts[i] = _cut(self.tokenizer.decode(toks, skip_special_tokens=True), stop_strings)
        return texts

    def _decoder(self) -> Growing | Static:
        """A dynamic cache per batch, or the model's static cache, which holds the longest prompt and answer."""
        if self.decoder == "dynamic":
            return Growing(self.model, self._cache, self._last_logits)
        compiled = self.decoder == "graphs"
        return Static.for_model(self.model, self._cache, self._last_logits, self.batch_size, self._longest, compiled)

    def _answered_rows(
        self,
        index: list[int],
        generated: torch.Tensor,
        stop_ids: set[int],
        stop_strings: Sequence[str],
        answered: Callable[[int, str], bool] | None,
        done: torch.Tensor,
    ) -> torch.Tensor:
        """Rows (not done yet) whose text so far holds a stop string, or an answer `answered` calls final."""
        rows, finished = generated.tolist(), done.tolist()
        found = []
        for item, toks, was in zip(index, rows, finished):
            cut = next((j for j, t in enumerate(toks) if t in stop_ids), len(toks))
            text = "" if was else self.tokenizer.decode(toks[:cut], skip_special_tokens=True)
            found.append(was or any(s in text for s in stop_strings) or bool(answered and answered(item, text)))
        return torch.tensor(found, device=done.device)

    def _map(self, fn, batches: list) -> list:
        """`fn` over the batches, in order. On the CPU with `workers` > 1 the batches are shared out among that
        many threads running one intra-op thread each: a small model's matrices are too small for torch's
        intra-op threads to keep the cores busy, whole batches side by side do (the same batches, the same
        results)."""
        if self.workers <= 1 or len(batches) < 2:
            return [fn(b) for b in batches]
        threads = torch.get_num_threads()

        def run(batch):
            with torch.inference_mode():  # thread-local: each worker enters it
                return fn(batch)

        torch.set_num_threads(max(1, threads // self.workers))
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                return list(pool.map(run, batches))
        finally:
            torch.set_num_threads(threads)

    def _batches_for(self, task: Task, ids: dict[int, list[int]], which: list[int]) -> list[_GenBatch]:
        """Padded batches; those of a whole task are made once (a search scores the whole task every trial)."""
        if len(which) != len(task.items):
            return self._gen_batches(ids, which)
        if task.name not in self._whole:
            self._whole[task.name] = self._gen_batches(ids, which)
        return self._whole[task.name]

    def _generate(self, task: Task, which: list[int]) -> dict[int, float]:
        texts = self._decode_all(task, which)
        if task.scorer is not None:
            return task.scorer(which, texts)
        return {i: score_generation(task.spec.metric, texts[i], task.items[i]["answer"]) for i in which}

    def _loglik(self, batch: _MCBatch) -> dict[tuple[int, int], float]:
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        check_finite(logits)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
        return dict(zip(batch.rows, (logp * batch.cont_mask).sum(-1).tolist()))

    def _loglik_shared(self, batch: _SharedBatch) -> dict[tuple[int, int], float]:
        """Log-likelihoods with each item's prefix run once: its cache is copied to its choices' rows, which run
        only their own tokens. The same sums as whole sequences up to float rounding (a task option: lm-eval
        computes whole sequences)."""
        prefix = Growing(self.model, self._cache, self._last_logits)
        first = prefix.start(batch.prefix, batch.prefix_mask, 0).float()
        check_finite(first)
        logp = [torch.log_softmax(first, dim=-1)[batch.owner]]  # predictions of each row's first target
        if batch.rest.shape[1]:
            cache = prefix.past
            cache.reorder_cache(batch.owner)
            start = batch.prefix_mask.sum(-1)[batch.owner]
            rest_pos = start[:, None] + torch.arange(batch.rest.shape[1], device=self.device)
            mask = torch.cat([batch.prefix_mask[batch.owner], batch.rest_mask], dim=1)
            step = {"input_ids": batch.rest, "attention_mask": mask, "position_ids": rest_pos, self._cache: cache}
            logits = self.model(**step, use_cache=True).logits.float()
            check_finite(logits)
            logp.append(torch.log_softmax(logits, dim=-1))
        logp = torch.cat([logp[0][:, None], *logp[1:]], dim=1)
        picked = logp.gather(-1, batch.targets[:, : logp.shape[1], None]).squeeze(-1)
        return dict(zip(batch.keys, (picked * batch.scored[:, : logp.shape[1]]).sum(-1).tolist()))

    def _multiple_choice(self, task: Task, which: list[int]) -> dict[int, float]:
        rows, prefix = self._prepared[task.name]["rows"], self._prepared[task.name]["prefix"]
        loglik: dict[tuple[int, int], float] = {}
        shared = task.spec.shared_prefix and all(prefix[i] >= 1 for i in which)
        batches = self._shared_batches(task, which) if shared else self._mc_batches(rows, which)
        for sums in self._map(self._loglik_shared if shared else self._loglik, batches):
            loglik.update(sums)
        n_choices = self._prepared[task.name]["n_choices"]
        if task.scorer is not None:
            return task.scorer(which, {i: [loglik[(i, j)] for j in range(n_choices[i])] for i in which})
        scores = {}
        for i in which:
            best = max(range(n_choices[i]), key=lambda j: loglik[(i, j)])
            scores[i] = float(best == int(task.items[i]["label"]))
        return scores


def _common_prefixes(rows: dict) -> dict[int, int]:
    """For each item, how many leading tokens all its choices share, at most its context (run once)."""
    choices: dict[int, list[tuple[list[int], int]]] = {}
    for (item, _), pair in rows.items():
        choices.setdefault(item, []).append(pair)
    prefixes = {}
    for item, pairs in choices.items():
        seqs, n_ctx = [whole for whole, _ in pairs], min(n for _, n in pairs)
        q = 0
        while q < n_ctx and all(len(s) > q and s[q] == seqs[0][q] for s in seqs):
            q += 1
        prefixes[item] = q
    return prefixes


def _first_number_final(item: int, text: str) -> bool:
    return number_final(text)


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first stop string."""
    for s in stop_strings:
        text = text.split(s, 1)[0]
    return text
