"""Write one large file front to back, past the page cache where the filesystem allows it.

A merged model is written once and read later, if at all, by another process. Buffered writes copy every byte
into fresh page-cache pages first; where fresh memory is costly (a VM whose host backs guest pages lazily: the
2-core machine writes 1.2 GB buffered in 2.2-4.6 s, with O_DIRECT in 0.8-1.0 s) that copy is most of a merge's
write. So the bytes go through one aligned staging buffer in O_DIRECT blocks, and the last partial block is
padded and the file truncated back. Filesystems that refuse O_DIRECT (tmpfs, some network mounts), platforms
without it, and `EVOMERGE_DIRECT_IO=0` get ordinary buffered writes of the same bytes.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

BLOCK = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the device's block; 4 KiB covers it
STAGE_BYTES = 16 << 20


def direct_io_wanted() -> bool:
    return os.environ.get("EVOMERGE_DIRECT_IO", "1").strip().lower() not in ("0", "false", "no", "off")


class FileSink:
    """Sequential writes of one new file (`write` bytes in order, then `close`); `direct` says whether they
    bypass the page cache. One writer at a time: `write` may run on another thread than the one that opened it."""

    def __init__(self, path: str | os.PathLike, direct: bool | None = None):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        o_direct = getattr(os, "O_DIRECT", 0) if (direct_io_wanted() if direct is None else direct) else 0
        self.path = Path(path)
        self.fd = -1
        if o_direct:
            try:
                self.fd = os.open(self.path, flags | o_direct, 0o666)
            except OSError:  # the filesystem does not take O_DIRECT
                self.fd = -1
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(self.path, flags, 0o666)
        self.size = 0  # bytes given to `write`
        self._written = 0  # bytes on disk
        self._stage = self._fill = None
        if self.direct:
            raw = np.empty(STAGE_BYTES + BLOCK, dtype=np.uint8)
            start = -raw.ctypes.data % BLOCK
            self._stage = raw[start : start + STAGE_BYTES]
            self._fill = 0

    def write(self, data: memoryview | bytes) -> None:
        """Append `data` (any C-contiguous buffer)."""
        view = np.frombuffer(data, dtype=np.uint8)
        self.size += view.size
        if self._stage is None:
            _write_all(self.fd, view)
            return
        done = 0
        while done < view.size:
            k = min(STAGE_BYTES - self._fill, view.size - done)
            self._stage[self._fill : self._fill + k] = view[done : done + k]
            self._fill += k
            done += k
            if self._fill == STAGE_BYTES:
                self._flush(STAGE_BYTES)

    def close(self, complete: bool = True) -> None:
        """Write what is staged and close; the file then holds exactly the bytes written (`complete=False`, after
        a failure: only close)."""
        if self.fd < 0:
            return
        try:
            if complete and self._stage is not None and self._fill:
                whole = -(-self._fill // BLOCK) * BLOCK
                self._stage[self._fill : whole] = 0
                self._flush(whole)
                os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FileSink":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self.close(complete=kind is None)

    def _flush(self, n: int) -> None:
        try:
            _write_all(self.fd, self._stage[:n])
        except OSError as e:
            if e.errno != errno.EINVAL or self._written:
                raise
            # opened with O_DIRECT but the first write refused (some FUSE and network filesystems): nothing was
            # written, so the same bytes go again, buffered
            import fcntl  # (O_DIRECT exists only where fcntl does)

            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            self.direct = False
            _write_all(self.fd, self._stage[:n])
        self._written += n
        self._fill = 0


def _write_all(fd: int, view: np.ndarray) -> None:
    """os.write until every byte is out (one call writes at most ~2 GiB, and may write less)."""
    done = 0
    while done < view.size:
        done += os.write(fd, view[done : done + (1 << 30)])
