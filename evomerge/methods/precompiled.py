"""The fused kernels compiled ahead of time (AOTInductor) for one-off merges on the CPU.

Why: `evomerge merge` runs each kernel over one model once. Through torch.compile every such process pays ~1.9 s
to import dynamo and inductor and ~1.7 s per kernel to trace it and load inductor's cached code: on a 300M-parameter
model as much as the kernel saves over eager code. The same kernel exported and compiled by AOTInductor (the same
code generation) is built once, kept in inductor's cache folder, and later processes load it with torch's C++
loader in milliseconds, without importing dynamo at all.

A package is keyed by everything its code depends on: the kernel's name and variant, the argument signature, the
torch version, the CPU's vector ISA and the source of the module the kernel lives in.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import inspect
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

_loaded: dict[tuple, Any] = {}  # (key, body's function, layout, signature) → torch's C++ loader of its package


def cache_dir() -> Path:
    """Where packages are kept: beside inductor's own cache (TORCHINDUCTOR_CACHE_DIR, else its default)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not root:
        root = str(Path(tempfile.gettempdir()) / f"torchinductor_{_user()}")
    return Path(root) / "evomerge-aot"


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a name (containers)
        return str(os.getuid())


def call(key: tuple, body: Callable, args: tuple, compiling: Callable[[], Any] = contextlib.nullcontext) -> Any:
    """body(*args) run by the package for (key, argument signature), built on first use. `args`: tensors and
    lists of tensors; 1-D tensors may have any length ≥ 2 (one dynamic size each, their relations found by
    export), other tensors the shapes they have now. `compiling`: a context the build runs in. Returns body's
    tensor result, or None for a body that only writes into its arguments."""
    flat, layout = _flatten(args)
    if not all(t.is_contiguous() for t in flat):  # the package's code assumes the strides it was built with
        raise TypeError("a precompiled kernel takes contiguous tensors")
    # the package's path (a hash of, among others, the kernel's source file) is worked out once, not per tensor
    loaded = (key, getattr(body, "func", body), layout, _signature(flat))
    loader = _loaded.get(loaded)
    if loader is None:
        path = _package_path(key, body, flat, layout)
        if not path.exists():
            with compiling():
                _build(body, flat, layout, path)
        loader = _loaded[loaded] = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    outputs = loader.run(flat)
    return outputs[0] if outputs else None


def _flatten(args: tuple) -> tuple[list[torch.Tensor], tuple]:
    """The tensors of args in order, and the layout to rebuild them: None for a tensor, n for a list of n."""
    flat, layout = [], []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
            layout.append(None)
        elif isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
            flat.extend(a)
            layout.append(len(a))
        else:
            raise TypeError(f"a precompiled kernel takes tensors and lists of tensors, not {type(a).__name__}")
    return flat, tuple(layout)


def _rebuild(flat: tuple, layout: tuple) -> list:
    args, at = [], 0
    for n in layout:
        args.append(flat[at] if n is None else list(flat[at : at + n]))
        at += 1 if n is None else n
    return args


def _signature(flat: list[torch.Tensor]) -> tuple:
    """Each tensor's dtype and shape, "n" for a 1-D length the package takes at any size."""
    return tuple((str(t.dtype), "n" if t.dim() == 1 and len(t) >= 2 else tuple(t.shape)) for t in flat)


def _package_path(key: tuple, body: Callable, flat: list[torch.Tensor], layout: tuple) -> Path:
    fn = getattr(body, "func", body)  # a functools.partial of the kernel body
    isa = torch.backends.cpu.get_cpu_capability()
    ident = repr((key, layout, list(_signature(flat)), torch.__version__, isa, _digest(inspect.getsourcefile(fn))))
    return cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.pt2"


@functools.lru_cache(maxsize=None)
def _digest(source_file: str) -> str:
    return hashlib.sha256(Path(source_file).read_bytes()).hexdigest()


class _Flat(torch.nn.Module):
    """body over flat tensor arguments, as torch.export takes them."""

    def __init__(self, body: Callable, layout: tuple):
        super().__init__()
        self.body, self.layout = body, layout

    def forward(self, *flat):
        result = self.body(*_rebuild(flat, self.layout))
        return () if result is None else (result,)


def _build(body: Callable, flat: list[torch.Tensor], layout: tuple, path: Path) -> None:
    """Export and compile the package, written under a temporary name and renamed into place, so that a
    process running beside this one never loads half a file."""
    import torch._inductor
    from torch.export import Dim, export

    sized = [t.dim() == 1 and len(t) >= 2 for t in flat]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".partial-", suffix=".pt2")
    os.close(fd)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices from inside export and packaging
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            dynamic = {"flat": tuple({0: Dim.AUTO} if s else None for s in sized)}
            program = export(_Flat(body, layout), tuple(flat), dynamic_shapes=dynamic)
            inputs = [n for n in program.graph.nodes if n.op == "placeholder"][-len(flat) :]
            if any(s and not isinstance(n.meta["val"].shape[0], torch.SymInt) for s, n in zip(sized, inputs)):
                raise TypeError("export fixed a length the kernel must take at any size")
            torch._inductor.aoti_compile_and_package(program, package_path=partial)
        os.chmod(partial, 0o644)  # as readable as inductor's own cache files (mkstemp makes it private)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
