"""Open Hugging Face model directories lazily, check that checkpoints can be merged, write merged ones.

Reading is memory-mapped through `safetensors.safe_open`; nothing is loaded until a tensor is asked for.
Writing goes to a temporary sibling directory that is renamed into place only when complete, so a
failure or a kill never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError
from .file_sink import FileSink

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
COPIED_CONFIG_FILES = ("generation_config.json",)
# safetensors' dtype names (its format spec) ↔ torch
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class Checkpoint:
    """A lazily opened HF model directory."""

    path: Path
    config: dict[str, Any]
    weight_map: dict[str, Path]  # tensor name -> file holding it
    pickled: bool = False
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _meta: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict, repr=False)
    mapped_bytes: int = field(default=0, repr=False)  # bytes of tensors read through the maps `close` drops

    # ---- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, allow_pickle: bool = False) -> "Checkpoint":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a model directory")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; a model directory needs config.json")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
        if config.get("auto_map"):
            raise CheckpointError(
                f"{config_path}: declares auto_map (custom code); evomerge never runs trust_remote_code models"
            )
        pickled = False
        if (path / SAFE_INDEX).is_file():
            weight_map = cls._read_index(path / SAFE_INDEX)
        elif (path / SAFE_SINGLE).is_file():
            weight_map = {}
        elif (path / PICKLE_INDEX).is_file() or (path / PICKLE_SINGLE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{path}: only pickle (.bin) weights found; pickle can run code when loaded. "
                    "Convert to safetensors, or pass --allow-pickle to load with torch.load(weights_only=True)"
                )
            pickled = True
            weight_map = cls._read_index(path / PICKLE_INDEX) if (path / PICKLE_INDEX).is_file() else {}
        else:
            raise CheckpointError(f"{path}: no weights (model.safetensors, {SAFE_INDEX} or pytorch_model.bin)")
        ckpt = cls(path=path, config=config, weight_map={}, pickled=pickled)
        if not weight_map:
            single = path / (PICKLE_SINGLE if pickled else SAFE_SINGLE)
            weight_map = {name: single for name in ckpt._names_in(single)}
        else:
            for file in sorted(set(weight_map.values())):
                names = set(ckpt._names_in(file))
                listed = {n for n, f in weight_map.items() if f == file}
                if listed - names:
                    missing = sorted(listed - names)[:3]
                    raise CheckpointError(f"{file}: index lists tensor(s) {missing} that the file does not contain")
        ckpt.weight_map = weight_map
        return ckpt

    @staticmethod
    def _read_index(index_path: Path) -> dict[str, Path]:
        try:
            index = json.loads(index_path.read_text())
            return {name: index_path.parent / file for name, file in index["weight_map"].items()}
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({e!r})") from None

    def _names_in(self, file: Path) -> list[str]:
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        if self.pickled:
            return list(self._load_pickle(file))
        handle = self._handle(file)
        names = list(handle.keys())
        size = file.stat().st_size
        for name in names:  # a truncated file has a header promising more bytes than are there
            sl = handle.get_slice(name)
            self._meta[name] = (tuple(sl.get_shape()), sl.get_dtype())
        end = _data_end(file)
        if end is not None and end > size:
            raise CheckpointError(f"{file}: truncated: header describes {end} bytes, file has {size}")
        return names

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        return self._handles[file]

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickle_cache:
            try:
                self._pickle_cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file}: cannot be loaded with weights_only=True ({e})") from None
        return self._pickle_cache[file]

    def close(self) -> None:
        """Drop the open file handles (their memory maps count towards the process's RSS); a later `get`
        reopens them."""
        self._handles.clear()
        self._pickle_cache.clear()
        self.mapped_bytes = 0

    # ---- reading -------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._meta:
            return self._meta[name][0]
        return tuple(self.get(name).shape)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped; a copy is made only when the caller converts it)."""
        try:
            file = self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None
        if self.pickled:
            return self._load_pickle(file)[name]
        try:
            t = self._handle(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from None
        self.mapped_bytes += t.nbytes
        return t

    def float_dtype(self) -> torch.dtype | None:
        """The dtype its floating-point tensors are stored in (the first one's); None when it has none."""
        return next((t.dtype for t in map(self.get, self.weight_map) if t.is_floating_point()), None)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def num_layers(self) -> int | None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        return None

    def tokenizer_fingerprint(self) -> str | None:
        """Hash of the tokenizer files present, or None if the directory ships no tokenizer."""
        digest = hashlib.sha256()
        found = False
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
            f = self.path / name
            if f.is_file():
                found = True
                digest.update(name.encode())
                if name == "tokenizer.json":  # ignore formatting and truncation/padding runtime settings
                    data = json.loads(f.read_text())
                    data = {k: data.get(k) for k in ("model", "added_tokens", "normalizer", "pre_tokenizer", "decoder")}
                    digest.update(json.dumps(data, sort_keys=True).encode())
                else:
                    digest.update(f.read_bytes())
        return digest.hexdigest() if found else None


def _data_end(file: Path) -> int | None:
    """End offset of the data the safetensors header promises (None if the header can't be parsed)."""
    try:
        with open(file, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + (max(ends) if ends else 0)


# ---- compatibility -------------------------------------------------------------------------------
ARCH_KEYS = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


def check_compatible(
    base: Checkpoint,
    others: Iterable[Checkpoint],
    check_tokenizer: bool = True,
    vocabulary_tables: dict[str, int] | None = None,
) -> None:
    """Raise CheckpointError naming the first file/tensor that stops these checkpoints from merging.
    `vocabulary_tables` (name → vocabulary axis): the models' vocabularies are mapped onto one (`vocabulary`), so
    their tokenizers, vocab sizes and those tables' lengths along that axis may differ."""
    base_names = set(base.tensor_names())
    tables = vocabulary_tables or {}
    check_tokenizer = check_tokenizer and vocabulary_tables is None
    base_tok = base.tokenizer_fingerprint() if check_tokenizer else None
    for other in others:
        for key in ARCH_KEYS:
            if key == "vocab_size" and vocabulary_tables is not None:
                continue
            a, b = base.config.get(key), other.config.get(key)
            if a != b and not (a is None or b is None):
                what = "vocab size" if key == "vocab_size" else key
                raise CheckpointError(f"{other.path / 'config.json'}: {what} is {b!r}, base {base.path} has {a!r}")
        names = set(other.tensor_names())
        if names != base_names:
            missing, extra = sorted(base_names - names), sorted(names - base_names)
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensor(s) present in {base.path}, e.g. {missing[:3]}")
            if extra:
                parts.append(f"has {len(extra)} extra tensor(s), e.g. {extra[:3]}")
            raise CheckpointError(f"{other.path}: " + "; ".join(parts))
        for name in sorted(base_names):
            a, b = list(base.shape(name)), list(other.shape(name))
            if name in tables and len(a) == len(b):
                a[tables[name]] = b[tables[name]] = 0  # rows per token: the vocabularies are mapped onto one
            if a != b:
                raise CheckpointError(
                    f"{other.weight_map[name]}: tensor {name!r} has shape {list(other.shape(name))}, "
                    f"base {base.weight_map[name]} has {list(base.shape(name))}"
                )
        if check_tokenizer:
            tok = other.tokenizer_fingerprint()
            if base_tok is not None and tok is not None and tok != base_tok:
                raise CheckpointError(
                    f"{other.path}: tokenizer differs from the base's ({base.path}); merged weights would index "
                    "different tokens (evomerge merge maps them onto one vocabulary with tokenizer_source: union, "
                    "base or a model, as mergekit does)"
                )


def check_finite(name: str, tensor: torch.Tensor, where: Path | str) -> None:
    """A NaN or ±inf anywhere makes the fp32 sum non-finite, so one vectorized sum clears a tensor (~30× faster
    than `isfinite(t).all()`); only a non-finite sum — also finite values overflowing it — looks closer."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{where}: tensor {name!r} has {bad} non-finite value(s) (NaN/inf); refusing to merge it")


# ---- writing -------------------------------------------------------------------------------------
def shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensor names into shards of at most max_shard_bytes (a tensor larger than that gets its own)."""
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
        if shards[-1] and current + size > max_shard_bytes:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def write_model_dir(
    out_dir: str | os.PathLike,
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    config: dict[str, Any],
    copy_from: Path | None = None,
    model_card: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    chat_template: str | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write an ordinary HF model directory atomically.

    `tensors` gives name -> (shape, dtype) so shards are planned before any tensor is computed; `produce`
    computes one tensor at a time, so peak memory stays at one shard. Tokenizer and generation files are
    copied from `copy_from`, or the `tokenizer` given is saved; `chat_template` (Jinja text) replaces its own."""
    out = check_output_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sizes = {n: _numel(s) * d.itemsize for n, (s, d) in tensors.items()}
        shards = shard_plan(sizes, max_shard_bytes)
        weight_map = {}
        for i, names in enumerate(shards):
            file = SAFE_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(tmp / file, {n: tensors[n] for n in names}, produce)
            weight_map.update({n: file for n in names})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if copy_from is not None:
            for name in (() if tokenizer is not None else TOKENIZER_FILES) + COPIED_CONFIG_FILES:
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, tmp / name)
        if chat_template is not None:
            set_chat_template(tmp, chat_template)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
        apply_umask(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_safetensors(
    file: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], produce: Callable[[str], torch.Tensor]
) -> None:
    """A safetensors file written tensor by tensor: the header comes from the planned shapes and dtypes, so each
    tensor's bytes are written as soon as it is produced and nothing else is held (safetensors' `save_file` takes
    them all at once). Larger dtypes first, so every tensor starts at a multiple of its element size."""
    order = sorted(tensors, key=lambda n: -tensors[n][1].itemsize)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for n in order:
        shape, dtype = tensors[n]
        size = _numel(shape) * dtype.itemsize
        header[n] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    # a thread writes each tensor while the next is produced (one written, one made: the write of a 1.2 GB model
    # is as long as the arithmetic of its task-arithmetic merge)
    with FileSink(file) as sink, ThreadPoolExecutor(1, thread_name_prefix="evomerge-write") as writer:
        sink.write(len(blob).to_bytes(8, "little") + blob)
        writing = None
        for n in order:
            t = produce(n)
            if tuple(t.shape) != tuple(tensors[n][0]):
                raise CheckpointError(f"internal: {n} produced shape {list(t.shape)}, planned {list(tensors[n][0])}")
            t = t.to(tensors[n][1]).contiguous().cpu()
            if writing is not None:
                writing.result()
            writing = writer.submit(sink.write, t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else None
            del t
        if writing is not None:
            writing.result()


def chat_template_of(model: str | os.PathLike) -> str | None:
    """A model directory's chat template: `chat_template.jinja`, else tokenizer_config's `chat_template` (its
    "default" entry when it holds several)."""
    folder = Path(model)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):  # [{name, template}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def set_chat_template(folder: Path, template: str) -> None:
    """The tokenizer in `folder` takes `template`: written as chat_template.jinja (what transformers saves), and
    the tokenizer_config entry that would shadow it removed."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.pop("chat_template", None) is not None:
            config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, an output that would destroy a file or (without --overwrite) a directory."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is a file, not a model directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: exists and is not empty; pass --overwrite or choose another --out")
    return out


def apply_umask(root: Path) -> None:
    """Give a directory built in a private temporary folder (mkdtemp makes it 0700) the permissions the user's
    umask asks for, as if it had been created in place."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
