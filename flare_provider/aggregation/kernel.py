"""The weighted-sum kernel of the mean-based aggregators, block by block on every core.

A model is cut into blocks of ``BLOCK`` elements (a tensor's flattened values); each block
is summed on its own, by whichever thread takes it: blocks never share an element, so the
threads need no locks and the result does not depend on which thread did what. Within a
block the updates are added one after the other in the caller's (fixed) order, each as
``float64(value) * weight``, which is exact in float64: only the additions round, always in
the same order, so the sums are the same bits however the updates are grouped into calls.

Updates are read from their files into a per-thread buffer (plain ``pread``, which, like
numpy's loops, runs without the GIL), and the float64 running sum of a block stays in the
CPU's cache while all updates are added to it: the sums in memory are read and written
once per call, not once per update, and a call that also finishes the mean writes only the
new model, never float64 sums.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..wire.finite_scan import nonfinite_in
from ..wire.tensors import TensorFile

# Elements per block. Each numpy call on a block holds the GIL for a moment before its loop
# runs without it: blocks of 2**15 (the float64 sum in L2 cache) ran fastest on one thread
# but left the second one waiting for the GIL; blocks of 2**18 (2 MiB of float64 per
# buffer, in the L3 cache) let two threads run side by side and measured fastest overall
# among 2**15 to 2**19 on 2 cores.
BLOCK = 1 << 18
# Below this many elements a call runs on the calling thread: starting threads would cost more.
_PARALLEL_ELEMENTS = 1 << 20
# A few threads already use all the memory bandwidth a sum can use; more only add overhead.
MAX_THREADS = 8
_MIN_BLOCK = 1 << 12


def threads() -> int:
    """How many threads a call uses: the cores this process may run on, at most ``MAX_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_THREADS))


@dataclass(frozen=True)
class Term:
    """One addend of the sum: a model-shaped file (or arrays) times a weight."""

    source: TensorFile | Mapping[str, np.ndarray]
    weight: float


class _Reader:
    """A thread's buffers: reads a block of a term's tensor as float64 products."""

    def __init__(self, block: int):
        self.raw = np.empty(block * 8, np.uint8)
        self.product = np.empty(block, np.float64)

    def product_of(self, term: Term, name: str, first: int, count: int, into: np.ndarray | None = None) -> np.ndarray:
        """``float64(values) * weight`` of elements ``first..first+count`` of ``name``."""
        product = self.product[:count] if into is None else into
        if isinstance(term.source, TensorFile):
            values = term.source.read_range(name, first, count, self.raw)
        else:
            values = _flat(term.source[name])[first : first + count]
        np.copyto(product, values)
        if term.weight != 1.0:
            product *= term.weight
        return product


def _flat(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).reshape(-1)


def for_each_block(
    sizes: Mapping[str, int],
    make_worker: Callable[[], Callable[[str, int, int], None]],
    *,
    block: int,
    passes: int = 1,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Call a worker on every block ``(name, first, count)`` of tensors of ``sizes`` elements.

    Each thread makes its own worker (its own buffers) with ``make_worker()``. ``passes``
    says how many times each element is touched (the number of updates), to decide whether
    the work is big enough to share out among threads. ``pool``: threads to use (of
    :func:`thread_pool`) for a caller that makes many calls; else they are started here.
    """
    tasks = [(name, first, min(block, size - first)) for name, size in sizes.items() for first in range(0, size, block)]
    workers = min(threads(), len(tasks)) if sum(sizes.values()) * passes >= _PARALLEL_ELEMENTS else 1
    pending = iter(tasks)
    if workers <= 1:
        worker = make_worker()
        for task in pending:
            worker(*task)
        return
    # Threads take the next block as they free up, so a thread slowed by other work on the
    # machine holds nobody up.
    lock = threading.Lock()

    def run() -> None:
        worker = make_worker()
        while True:
            with lock:
                task = next(pending, None)
            if task is None:
                return
            worker(*task)

    if pool is not None:
        for future in [pool.submit(run) for _ in range(workers)]:
            future.result()
        return
    with thread_pool() as own:
        for future in [own.submit(run) for _ in range(workers)]:
            future.result()


def thread_pool() -> ThreadPoolExecutor:
    """Threads for :func:`for_each_block`, one per core."""
    return ThreadPoolExecutor(threads(), thread_name_prefix="flare-aggregate")


def _fitted(block: int, sizes: Mapping[str, int]) -> int:
    """``block``, made smaller for a small model: every thread gets several blocks, and the
    buffers (three of a block's float64 size per thread) stay small next to the model."""
    return max(1, min(block, max(_MIN_BLOCK, sum(sizes.values()) // (threads() * 8))))


def weighted_sum(
    sizes: Mapping[str, int],
    terms: Sequence[Term],
    *,
    sums: Mapping[str, np.ndarray] | None = None,
    finish: Callable[[str, int, np.ndarray], None] | None = None,
    block: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> None:
    """Add ``weight * values`` of every term, in the order given, block by block.

    ``sizes`` maps each tensor name to its element count. Each block starts from the
    float64 ``sums`` of that block (or from the first term's product where ``sums`` is
    None); the terms are added in turn. The block's total is then written back into
    ``sums`` (float64 arrays of the model's shapes), or, with ``finish``, handed to
    ``finish(name, first, total)`` instead, which may change ``total`` in place (it is a
    scratch buffer of this thread) and store what it makes of it.
    """
    if sums is None and not terms:
        raise ValueError("nothing to sum: no terms and no sums to start from")
    block = _fitted(block or BLOCK, sizes)
    flat_sums = {name: _flat(array) for name, array in sums.items()} if sums is not None else None

    def make_worker() -> Callable[[str, int, int], None]:
        reader = _Reader(block)
        total_buffer = np.empty(block, np.float64)

        def add_block(name: str, first: int, count: int) -> None:
            total = total_buffer[:count]
            rest = terms
            if flat_sums is not None:
                np.copyto(total, flat_sums[name][first : first + count])
            else:
                reader.product_of(terms[0], name, first, count, into=total)
                rest = terms[1:]
            for term in rest:
                total += reader.product_of(term, name, first, count)
            if finish is not None:
                finish(name, first, total)
            else:
                np.copyto(flat_sums[name][first : first + count], total)

        return add_block

    for_each_block(sizes, make_worker, block=block, passes=max(1, len(terms)), pool=pool)


def count_nonfinite(tensors: TensorFile, names: Sequence[str], *, block: int | None = None) -> dict[str, int]:
    """How many NaN or infinite values each of the floating tensors ``names`` holds."""
    sizes = {name: math.prod(tensors.layout[name].shape) for name in names}
    block = _fitted(block or BLOCK, sizes)
    bad = dict.fromkeys(names, 0)
    lock = threading.Lock()

    def make_worker() -> Callable[[str, int, int], None]:
        raw = np.empty(block * 8, np.uint8)

        def check_block(name: str, first: int, count: int) -> None:
            found = nonfinite_in(tensors.read_range(name, first, count, raw))
            if found:
                with lock:
                    bad[name] += found

        return check_block

    for_each_block(sizes, make_worker, block=block)
    return bad


def store_as(dtype: np.dtype, total: np.ndarray, out: np.ndarray) -> None:
    """Write float64 ``total`` into ``out`` in the model's ``dtype``, as ``to_model_dtype`` rounds:
    floats to nearest, integers to nearest and clipped to their range, booleans at 0.5."""
    if dtype.kind == "f":
        np.copyto(out, total, casting="unsafe")
    elif dtype.kind == "b":
        np.greater_equal(total, 0.5, out=out)
    else:
        info = np.iinfo(dtype)
        np.rint(total, out=total)
        np.clip(total, info.min, info.max, out=total)
        np.copyto(out, total, casting="unsafe")
