"""The vision zoo: an offline miniature of the model-soups experiment (Wortsman et al. 2022).

As in the paper, one pre-trained image model is fine-tuned several times on one downstream task with different
hyperparameters, and the soups of the fine-tunes are compared with the best of them, on the task's own test
images and on distribution-shifted ones. Everything is generated here:
- images: 16×16 RGB, one shape (8 kinds) of one colour on a noisy background, at a random place and size;
- pre-training: a small ViT learns which of the 8 shapes an image shows, colours and backgrounds at random;
- the downstream task: 6 classes, three of the shapes × warm or cool colour (the colour family is new to it).
  Its classifier head is first fitted on the frozen pre-trained features (a linear probe, as the paper's
  fine-tunes start from one shared head), then every fine-tune trains the whole model from there with its own
  learning rate, weight decay, augmentation, length and data order;
- the shifted test: the same classes drawn otherwise — striped backgrounds, outlines instead of filled shapes,
  paler colours, smaller shapes — as ImageNet's shifts (-R, -Sketch, -V2) draw ImageNet's classes otherwise.
Tasks (`classify`): `shapes` (held-out validation as its search split, in-distribution test) and
`shapes_shifted` (weight 0: reported, never used to choose).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SHAPES = ("disk", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond")
DOWNSTREAM_SHAPES = ("disk", "square", "triangle")
FAMILIES = ("warm", "cool")
CLASSES = tuple(f"{s}-{f}" for s in DOWNSTREAM_SHAPES for f in FAMILIES)
HUES = {"warm": (-0.08, 0.14), "cool": (0.42, 0.72)}  # hue ranges (fractions of the colour circle)

StepCallback = Callable[[str, int, int, float], None]  # (model name, step, total steps, loss)


@dataclass(frozen=True)
class FineTune:
    name: str
    lr: float
    steps: int
    weight_decay: float = 0.0
    augment: bool = False
    seed: int = 0


FINETUNES = (
    FineTune("ft-lr3e-4", 3e-4, 250, seed=1),
    FineTune("ft-lr1e-3", 1e-3, 250, seed=2),
    FineTune("ft-lr1e-3-wd", 1e-3, 250, weight_decay=0.1, seed=3),
    FineTune("ft-lr1e-3-aug", 1e-3, 250, augment=True, seed=4),
    FineTune("ft-lr2e-3-long", 2e-3, 450, seed=5),
    FineTune("ft-lr3e-3-aug", 3e-3, 250, weight_decay=0.1, augment=True, seed=6),
)


@dataclass(frozen=True)
class VisionZooConfig:
    seed: int = 0
    size: int = 16
    patch: int = 4
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    pretrain_steps: int = 1000
    pretrain_images: int = 10000  # rendered once, then drawn at random (rendering is a fifth of a step's time)
    probe_steps: int = 150
    batch_size: int = 128
    n_train: int = 1500
    n_val: int = 600
    n_test: int = 1200
    finetunes: tuple[FineTune, ...] = FINETUNES


SMALL = VisionZooConfig(  # the tests' zoo: the same shape, a fraction of the training
    hidden=32,
    layers=2,
    pretrain_steps=300,
    pretrain_images=2000,
    probe_steps=60,
    n_train=800,
    n_val=200,
    n_test=300,
    finetunes=tuple(FineTune(f.name, f.lr, 80, f.weight_decay, f.augment, f.seed) for f in FINETUNES[:4]),
)


# ---- images ------------------------------------------------------------------------------------
def _mask(shape: str, size: int, cx: float, cy: float, r: float, outline: bool) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "disk":
        m = dx**2 + dy**2 <= r**2
    elif shape == "ring":
        m = (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (0.55 * r) ** 2)
    elif shape == "square":
        m = (abs(dx) <= r * 0.85) & (abs(dy) <= r * 0.85)
    elif shape == "diamond":
        m = abs(dx) + abs(dy) <= r
    elif shape == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    elif shape == "cross":
        m = ((abs(dx) <= r * 0.3) & (abs(dy) <= r)) | ((abs(dy) <= r * 0.3) & (abs(dx) <= r))
    elif shape == "hbar":
        m = (abs(dx) <= r) & (abs(dy) <= r * 0.3)
    else:  # vbar
        m = (abs(dy) <= r) & (abs(dx) <= r * 0.3)
    if outline:  # only the shape's boundary, one pixel wide (a sketch of it)
        inner = np.zeros_like(m)
        inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
        m = m & ~inner
    return m


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    import colorsys

    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32)


def render(rng: np.random.Generator, shape: str, hue: float, size: int, shifted: bool = False) -> np.ndarray:
    """One image (H×W×3 uint8). `shifted` draws it otherwise: striped background, outline or pale colour, smaller."""
    r = rng.uniform(2.2, 3.2) if shifted else rng.uniform(3.0, 5.5)
    cx, cy = rng.uniform(r + 0.5, size - r - 0.5, 2)
    background = rng.uniform(0.0, 0.35, 3).astype(np.float32)
    image = np.broadcast_to(background, (size, size, 3)) + rng.normal(0, 0.1, (size, size, 3)).astype(np.float32)
    kind = rng.integers(3) if shifted else -1
    if shifted:  # stripes of another grey
        period = rng.integers(2, 5)
        stripes = (np.arange(size)[:, None] + rng.integers(2) * np.arange(size)[None, :]) // period % 2
        image = image + 0.18 * stripes[..., None]
    saturation = rng.uniform(0.25, 0.45) if kind == 1 else rng.uniform(0.6, 1.0)
    color = _rgb(hue, saturation, rng.uniform(0.7, 1.0))
    m = _mask(shape, size, cx, cy, r, outline=kind == 0)
    image = np.where(m[..., None], color, image)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def pretrain_batch(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(SHAPES), size=n)
    images = np.stack([render(rng, SHAPES[y], rng.uniform(), size) for y in labels])
    return images, labels


def downstream(rng: np.random.Generator, n: int, size: int, shifted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(len(CLASSES), size=n)
    images = []
    for y in labels:
        shape, family = CLASSES[y].split("-")
        images.append(render(rng, shape, rng.uniform(*HUES[family]), size, shifted))
    return np.stack(images), labels


def pixels(images: np.ndarray) -> torch.Tensor:
    """Model-ready inputs, as the classify evaluator makes them from 8-bit arrays: [0, 1], channels first."""
    return torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255


# ---- training ----------------------------------------------------------------------------------
def train(
    model: torch.nn.Module,
    batches: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    augment: bool = False,
    params=None,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """AdamW with warmup and a cosine schedule; `augment` flips images and adds pixel noise."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)
    model.train()
    for step in range(steps):
        images, labels = batches(rng, batch_size)
        x = pixels(images)
        if augment:
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)
            x = (x + 0.04 * torch.randn_like(x)).clamp(0, 1)
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = model(pixel_values=x, labels=torch.from_numpy(labels)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if on_step:
            on_step(step + 1, loss.item())
    model.eval()


def _draw(rng: np.random.Generator, n: int, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rng.integers(len(labels), size=n)
    return images[rows], labels[rows]


def _vit(config: VisionZooConfig, labels: tuple[str, ...]):
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            image_size=config.size,
            patch_size=config.patch,
            num_channels=3,
            hidden_size=config.hidden,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            intermediate_size=2 * config.hidden,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    )


def _accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(pixel_values=pixels(images)).logits.argmax(-1).numpy() == labels).mean())


# ---- the build ---------------------------------------------------------------------------------
def build_vision_zoo(
    out: str | os.PathLike,
    config: VisionZooConfig = VisionZooConfig(),
    progress: Callable[[str], None] = print,
    overwrite: bool = False,
    on_step: StepCallback | None = None,
) -> Path:
    """Build the zoo into `out` (written beside it and renamed into place when complete); returns `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())[
            "config"
        ] == json.loads(json.dumps(asdict(config))):
            return out
        raise FileExistsError(f"{out}: exists; pass --overwrite or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build(work, out, config, progress, on_step)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _build(work: Path, out: Path, config: VisionZooConfig, say: Callable[[str], None], on_step) -> None:
    started = time.time()
    rng = np.random.default_rng(config.seed)
    train_x, train_y = downstream(rng, config.n_train, config.size)
    splits = {
        "shapes": {
            "search": downstream(rng, config.n_val, config.size),
            "test": downstream(rng, config.n_test, config.size),
        },
        "shapes_shifted": {
            "search": downstream(rng, config.n_val, config.size, shifted=True),
            "test": downstream(rng, config.n_test, config.size, shifted=True),
        },
    }
    specs = []
    for task, parts in splits.items():
        files = {}
        for split, (x, y) in parts.items():
            path = work / "tasks" / task / f"{split}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, images=x, labels=y)
            files[split] = str(out / "tasks" / task / f"{split}.npz")
        specs.append({"name": task, "kind": "classify", "files": files, "weight": 1.0 if task == "shapes" else 0.0})

    def stepper(name: str, total: int):
        return (lambda step, loss: on_step(name, step, total, loss)) if on_step else None

    say(f"pre-training a ViT ({config.layers} layers, hidden {config.hidden}) on {len(SHAPES)} shapes")
    pretrained = _vit(config, SHAPES)
    shapes_x, shapes_y = pretrain_batch(rng, config.pretrain_images, config.size)
    train(
        pretrained,
        lambda r, n: _draw(r, n, shapes_x, shapes_y),
        config.pretrain_steps,
        1e-3,
        config.batch_size,
        config.seed,
        weight_decay=0.05,
        on_step=stepper("pretrain", config.pretrain_steps),
    )
    base = _vit(config, CLASSES)
    base.vit.load_state_dict(pretrained.vit.state_dict())
    say("fitting the downstream head on the frozen pre-trained features (the fine-tunes' shared start)")

    def sample(r: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return _draw(r, n, train_x, train_y)

    train(
        base,
        sample,
        config.probe_steps,
        3e-3,
        config.batch_size,
        config.seed,
        params=base.classifier.parameters(),
        on_step=stepper("probe", config.probe_steps),
    )
    scores = {}

    def keep(name: str, model: torch.nn.Module) -> None:
        """Save a finished model and record its accuracy on every split and task."""
        model.save_pretrained(work / "models" / name)
        scores[name] = {
            split: {task: _accuracy(model, *parts[split]) for task, parts in splits.items()}
            for split in ("search", "test")
        }

    keep("base", base)
    for ft in config.finetunes:
        say(
            f"fine-tuning {ft.name}: lr {ft.lr}, {ft.steps} steps, weight decay {ft.weight_decay}, augment {ft.augment}"
        )
        model = _vit(config, CLASSES)
        model.load_state_dict(base.state_dict())
        train(
            model,
            sample,
            ft.steps,
            ft.lr,
            config.batch_size,
            ft.seed,
            ft.weight_decay,
            ft.augment,
            on_step=stepper(ft.name, ft.steps),
        )
        keep(ft.name, model)
    manifest = {
        "kind": "vision",
        "config": json.loads(json.dumps(asdict(config))),
        "base": str(out / "models" / "base"),
        "ingredients": {f.name: str(out / "models" / f.name) for f in config.finetunes},
        "tasks": specs,
        "scores": scores,
        "build_seconds": round(time.time() - started, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    say(f"built in {manifest['build_seconds']:.0f} s")
