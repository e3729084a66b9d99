"""Large files that are fsynced at their end go to disk while they are written.

What the kernel holds of a file is read with ``cachestat(2)`` (Linux 6.5+): how many of
its cached pages are dirty (not yet written) and how many are being written back.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from flare_provider.files import WRITEBACK_BYTES, WritebackWriter

MIB = 1 << 20
_CACHESTAT = 451  # x86-64 and arm64 syscall number


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def page_counts(path: Path) -> tuple[int, int, int]:
    """(cached, dirty, under writeback) pages of the file at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    whole, stat = _Range(0, 0), _Stat()
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(stat), 0) != 0:
            raise OSError(ctypes.get_errno(), "cachestat(2) failed: these tests need Linux 6.5 or later")
    finally:
        os.close(fd)
    return stat.cache, stat.dirty, stat.writeback


def test_a_file_written_through_the_writeback_writer_goes_to_disk_as_it_is_written(tmp_path):
    data = np.random.default_rng(1).bytes(5 * WRITEBACK_BYTES + 3 * MIB)
    pages = len(data) // os.sysconf("SC_PAGE_SIZE")
    plain, written_back = tmp_path / "plain.bin", tmp_path / "written-back.bin"
    for path, wrap in ((plain, lambda f: f), (written_back, WritebackWriter)):
        with open(path, "wb", buffering=0) as f:  # unbuffered: a write may take part of what it is given
            out = wrap(f)
            for start in range(0, len(data), MIB):
                out.write(data[start : start + MIB])
    assert plain.read_bytes() == data and written_back.read_bytes() == data
    # Written plainly, the file waits in memory for the kernel's flusher (tens of seconds).
    assert page_counts(plain)[1] >= pages * 0.9
    # Through the writer, all but the last WRITEBACK_BYTES were handed to the disk as they came.
    dirty = page_counts(written_back)[1]
    assert dirty <= WRITEBACK_BYTES // os.sysconf("SC_PAGE_SIZE"), f"{dirty} of {pages} pages still dirty"
