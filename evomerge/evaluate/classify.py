"""Classification tasks (kind `classify`): accuracy of a sequence or image classifier on local data.

A split is
- a jsonl file of `{"text": ..., "label": ...}` or `{"image": path relative to the file, "label": ...}`,
- an `.npz` file with arrays `images` (N×H×W×C uint8, or model-ready N×C×H×W floats) and `labels` (N), or
- a folder of class folders (`<split>/<label>/<image files>`, the ImageFolder layout).
A label is a class index, or a class name the model's config maps (`label2id`). Inputs are tokenized or
preprocessed once; a call is forward passes and an argmax.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import TaskError
from .native import ItemEvaluator, check_finite
from .tasks import Task, jsonl_records

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_items(path: Path) -> list[dict[str, Any]]:
    """The examples of one split, in a fixed order (folders and files sorted by name)."""
    if path.is_dir():
        return [
            {"image": str(f), "label": d.name}
            for d in sorted(p for p in path.iterdir() if p.is_dir())
            for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    if path.suffix == ".npz":
        with np.load(path) as arrays:
            missing = [k for k in ("images", "labels") if k not in arrays]
            if missing:
                raise TaskError(f"{path}: no array(s) {missing} (a classification split holds images and labels)")
            images, labels = arrays["images"], arrays["labels"]
        if len(images) != len(labels):
            raise TaskError(f"{path}: {len(images)} images but {len(labels)} labels")
        return [{"pixels": images[i], "label": labels[i].item()} for i in range(len(labels))]
    items = []
    for where, item in jsonl_records(path):
        if not isinstance(item, dict) or "label" not in item or not ({"text", "image"} & set(item)):
            raise TaskError(f"{where}: a classification example needs a label and a text or an image")
        if "image" in item:
            item = {**item, "image": str(path.parent / item["image"])}
        items.append(item)
    return items


class ClassifierEvaluator(ItemEvaluator):
    def __init__(self, model: torch.nn.Module, processor, tasks: Sequence[Task], batch_size: int = 64) -> None:
        super().__init__(model, tasks, batch_size)
        self.processor = processor
        self._prepared = {t.name: self._prepare(t) for t in self.tasks}

    # ---- preparation (once) -------------------------------------------------------------------
    def _prepare(self, task: Task) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        labels = torch.tensor([self._label_id(task, item["label"]) for item in task.items])
        if all("text" in item for item in task.items):
            if self.processor is None:
                raise TaskError(f"task {task.name}: text examples need the model's tokenizer")
            enc = self.processor(
                [item["text"] for item in task.items], padding=True, truncation=True, return_tensors="pt"
            )
            return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}, labels
        if any("text" in item for item in task.items):
            raise TaskError(f"task {task.name}: mixes text and image examples")
        return {"pixel_values": self._pixels(task)}, labels

    def _label_id(self, task: Task, label: Any) -> int:
        config = self.model.config
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            known = {str(k): v for k, v in (config.label2id or {}).items()}
            if label not in known:
                raise TaskError(f"task {task.name}: label {label!r} is not one of the model's {sorted(known)}")
            return int(known[label])
        index = int(label)
        if not 0 <= index < config.num_labels:
            raise TaskError(f"task {task.name}: label {index} outside the model's {config.num_labels} classes")
        return index

    def _pixels(self, task: Task) -> torch.Tensor:
        arrays = [item["pixels"] if "pixels" in item else _read_image(item["image"]) for item in task.items]
        if self.processor is not None:
            return self.processor(images=[_hwc(a) for a in arrays], return_tensors="pt")["pixel_values"]
        config = self.model.config
        images = [_chw(a, config.num_channels) for a in arrays]
        shapes = sorted({tuple(t.shape) for t in images})
        if len(shapes) > 1:
            raise TaskError(
                f"task {task.name}: images of {len(shapes)} shapes ({shapes[0]}, {shapes[1]}, …); give the model an "
                "image processor (preprocessor_config.json) to resize them, or images of one size"
            )
        pixels = torch.stack(images)
        size = getattr(config, "image_size", None)
        if size is not None and tuple(pixels.shape[-2:]) != (size, size):
            raise TaskError(
                f"task {task.name}: images are {tuple(pixels.shape[-2:])}, the model takes {size}×{size}; give the "
                "model an image processor (preprocessor_config.json) or model-ready arrays"
            )
        return pixels

    # ---- scoring (every call) -----------------------------------------------------------------
    def score(self, task: Task, which: list[int]) -> dict[int, float]:
        inputs, labels = self._prepared[task.name]
        out: dict[int, float] = {}
        for s in range(0, len(which), self.batch_size):
            rows = torch.tensor(which[s : s + self.batch_size])
            logits = self.model(**{k: v[rows].to(self.device) for k, v in inputs.items()}).logits
            check_finite(logits)
            right = (logits.argmax(-1).cpu() == labels[rows]).tolist()
            out.update({i: float(r) for i, r in zip(rows.tolist(), right)})
        return out


def _read_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        raise TaskError(f"{path}: cannot read the image ({e})") from None


def _hwc(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 0, -1) if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3) else a


def _chw(a: np.ndarray, channels: int) -> torch.Tensor:
    """A model-ready (C, H, W) float tensor: 8-bit images scaled to [0, 1], channels moved first."""
    t = torch.tensor(np.asarray(a))  # a copy: arrays read from .npz are read-only
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 2:
        t = t[None]
    if t.shape[0] != channels and t.shape[-1] == channels:
        t = t.permute(2, 0, 1)
    return t.contiguous()
