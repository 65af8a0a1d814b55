import errno
import os

import numpy as np
import pytest
import torch

from evomerge import file_sink
from evomerge.checkpoint import Checkpoint, write_model_dir
from evomerge.file_sink import FileSink

PIECES = [0, 1, 4095, 4096, 4097, 9000, 3, 20_000, 8192]  # odd sizes across the (shrunk) staging buffer's edges


def _write(path, pieces, direct):
    data = np.random.default_rng(0).integers(0, 256, sum(pieces), dtype=np.uint8)
    with FileSink(path, direct=direct) as sink:
        at = 0
        for n in pieces:
            sink.write(data[at : at + n].data)
            at += n
    return sink, data.tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(file_sink, "STAGE_BYTES", 8192)  # many flushes, a padded last block, a truncation
    sink, data = _write(tmp_path / "f", PIECES, direct)
    assert (tmp_path / "f").read_bytes() == data
    if not direct:
        assert not sink.direct
    elif not sink.direct:
        pytest.skip(f"{tmp_path}: the filesystem takes no O_DIRECT, so the direct path did not run")


def test_filesystem_refusing_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(file_sink.os, "open", no_direct)
    sink, data = _write(tmp_path / "f", PIECES, direct=True)
    assert not sink.direct and (tmp_path / "f").read_bytes() == data


def test_first_direct_write_refused_is_written_again_buffered(tmp_path, monkeypatch):
    """Some FUSE and network filesystems open with O_DIRECT and refuse the write."""
    monkeypatch.setattr(file_sink, "STAGE_BYTES", 8192)
    real_write = os.write
    refused = []

    def refuse_direct(fd, data):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            refused.append(len(data))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(file_sink.os, "write", refuse_direct)
    sink, data = _write(tmp_path / "f", PIECES, direct=True)
    assert (tmp_path / "f").read_bytes() == data and not sink.direct
    if not refused:
        pytest.skip(f"{tmp_path}: the filesystem takes no O_DIRECT at open")
    assert len(refused) == 1


def test_environment_turns_direct_writes_off(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_DIRECT_IO", "0")
    with FileSink(tmp_path / "f") as sink:
        sink.write(b"abc")
    assert not sink.direct and (tmp_path / "f").read_bytes() == b"abc"


def test_a_failing_write_thread_fails_the_model_write_and_leaves_nothing(tmp_path, llama_family, monkeypatch):
    base, _ = llama_family
    ck = Checkpoint.open(base)
    shapes = {n: (ck.shape(n), torch.float32) for n in ck.tensor_names()}
    real_write, calls = FileSink.write, []

    def disk_full(self, data):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(FileSink, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_model_dir(tmp_path / "out", shapes, ck.get, ck.config)
    assert list(tmp_path.iterdir()) == []
