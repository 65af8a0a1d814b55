"""A minimal causal-LM training loop for the zoo (pre-training and fine-tuning on generated text)."""

from __future__ import annotations

import logging
import math
import random
from typing import Callable

import torch

log = logging.getLogger(__name__)


def train_lm(
    model: torch.nn.Module,
    tokenizer,
    sample: Callable[[random.Random], str],
    steps: int,
    lr: float,
    batch_size: int = 64,
    seed: int = 0,
    warmup: int = 50,
    weight_decay: float = 0.0,
    progress: Callable[[int, float], None] | None = None,  # (steps done, loss) after every step
) -> list[float]:
    """Train on `steps` batches of texts drawn from `sample(rng)`; <s> text </s>, loss on every token.
    Cosine schedule with warmup; seeded so a build is reproducible. Returns the loss curve."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model.train()
    losses = []
    for step in range(steps):
        texts = [sample(rng) for _ in range(batch_size)]
        ids = [tokenizer(t)["input_ids"] + [eos] for t in texts]
        width = max(map(len, ids))
        inp = torch.full((batch_size, width), pad, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for r, seq in enumerate(ids):
            inp[r, : len(seq)] = torch.tensor(seq)
            labels[r, : len(seq)] = torch.tensor(seq)
        scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05 if step >= warmup else scale)
        loss = model(input_ids=inp, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if progress:
            progress(step + 1, losses[-1])
    model.eval()
    return losses
