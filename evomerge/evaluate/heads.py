"""A model's task head, read from its checkpoint, decides how it is loaded and which tasks can score it.

- causal LM: generation, log-likelihood multiple choice and lm-eval tasks (the native and lm-eval evaluators);
- seq2seq LM (T5, BART): generation tasks, through the model's own greedy `generate`;
- sequence classifier (BERT/RoBERTa heads) and image classifier (ViT, CLIP/SigLIP heads): `classify` tasks.
Anything else — a masked LM, a bare encoder — has no task head evomerge can score: it is refused in one line
(it can still be merged), never loaded under a head it was not trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError

# head → (transformers' mapping of model types to classes, the Auto class, the task kinds it scores)
HEADS = {
    "causal_lm": (
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
        "AutoModelForCausalLM",
        ("generate", "multiple_choice", "lm_eval"),
    ),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM", ("generate",)),
    "sequence_classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForSequenceClassification",
        ("classify",),
    ),
    "image_classification": (
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForImageClassification",
        ("classify",),
    ),
}


def _classes(head: str) -> tuple[set[str], set[str]]:
    """(class names, model types) transformers maps to this head."""
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, HEADS[head][0])
    return {c for v in mapping.values() for c in ((v,) if isinstance(v, str) else v)}, set(mapping)


def _config(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # Checkpoint.open reports a missing or unreadable config


def model_head(path: str | os.PathLike) -> str | None:
    """The head a checkpoint was saved with (its `architectures`; without them, a model type with a causal LM),
    or None when evomerge has no evaluator for it."""
    config = _config(path)
    saved = config.get("architectures") or []
    for head in HEADS:
        classes, types = _classes(head)
        if set(saved) & classes or not saved and head == "causal_lm" and config.get("model_type") in types:
            return head
    return None


def check_evaluable(path: str | os.PathLike, tasks: Iterable[tuple[str, str]] = ()) -> str:
    """The model's head, after checking it has one evomerge scores and that it can score every (name, kind) task.
    Raises CheckpointError in one line otherwise."""
    config = _config(path)
    if not config:
        return "causal_lm"
    kind = ", ".join(config.get("architectures") or []) or f"model_type {config.get('model_type')!r}"
    head = model_head(path)
    if head is None:
        raise CheckpointError(
            f"{path}: a {kind}, not a causal language model, seq2seq model or classifier; evomerge has no evaluator "
            "for its head, so it cannot be evaluated, searched or souped (it can still be merged with `evomerge merge`)"
        )
    fits = HEADS[head][2]
    wrong = [f"{name} ({task_kind})" for name, task_kind in tasks if task_kind not in fits]
    if wrong:
        raise CheckpointError(
            f"{path}: a {kind} ({head.replace('_', ' ')}) cannot score task(s) {', '.join(wrong)}; it scores "
            f"{' and '.join(fits)} tasks"
        )
    return head


def auto_class(head: str):
    import transformers

    return getattr(transformers, HEADS[head][1])


def load_model(path: str | os.PathLike, head: str, **kwargs):
    """The model under its own head (`from_pretrained` keyword arguments pass through)."""
    return auto_class(head).from_pretrained(path, **kwargs)


def load_processor(path: str | os.PathLike, head: str, **kwargs):
    """What turns a task's inputs into model inputs: the tokenizer of a text model; an image classifier's image
    processor when it ships one (`preprocessor_config.json`), else None (images are given as model-ready arrays)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        if head == "image_classification":
            if (Path(path) / "preprocessor_config.json").is_file():
                return AutoImageProcessor.from_pretrained(path, **kwargs)
            return None
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        what = "image processor" if head == "image_classification" else "tokenizer"
        raise CheckpointError(f"{path}: cannot load its {what} ({str(e).splitlines()[0] if str(e) else e!r})") from None
