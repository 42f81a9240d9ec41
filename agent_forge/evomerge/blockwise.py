"""Element-wise work in cache-sized blocks; long memory-bound passes shared between threads.

On CPU the element-wise compute of a long pass (over more than :data:`WHOLE` elements) runs
over blocks of :data:`BLOCK` elements: the temporaries of a block stay in the L2 cache, and a
block is just below torch's intra-op grain (32768), so each op runs inline instead of waking
OpenMP workers (whose fixed split stalls whenever the OS preempts one of them on a busy
machine). These loops stay in one thread: two Python threads issuing ~1 µs ops hand the GIL
back and forth and run slower than one. Shorter passes run as whole-tensor ops.

Passes that only stream memory (task vectors ``θ − θ_base``, adding the base back, counting
for a trim threshold, reading files) go in spans of :data:`SPAN` elements to up to
``torch.get_num_threads()`` threads, which take spans from one queue; each call runs long
without the GIL (numpy, file reads). Every span's result depends only on its own elements,
so the bytes are the same for any thread count.

On other devices a "block" is the whole range: one kernel launch per op.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

#: Elements per block of element-wise compute on CPU: under torch's intra-op grain of 32768.
BLOCK = 32704
#: Passes over at most this many elements run as whole-tensor ops: their working set of a few
#: rows stays in the L3 cache, and a few large calls beat many small ones.
WHOLE = 1 << 20
#: Elements per span of a memory-bound pass handed to a thread.
SPAN = 1 << 20

T = TypeVar("T")
R = TypeVar("R")

_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def block_size(count: int, device: torch.device) -> int:
    """Elements per block: :data:`BLOCK` for long passes on CPU, else everything at once."""
    return BLOCK if device.type == "cpu" and count > WHOLE else max(count, 1)


def blocks(count: int, device: torch.device) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``count`` elements (see :func:`block_size`)."""
    step = block_size(count, device)
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def scratch(
    rows: int, width: int, dtype: torch.dtype, device: torch.device, use: str = "combine"
) -> Tensor:
    """A ``(rows, width)`` working buffer reused by this thread for ``use`` (contents undefined).

    Reuse spares the page faults a fresh large tensor costs on every call. A caller must be done
    with the buffer before the next call for the same ``use`` on the same thread.
    """
    pool = _local.__dict__.setdefault("scratch", {})
    key = (use, dtype, device)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < rows * width:
        buffer = pool[key] = torch.empty(rows * width, dtype=dtype, device=device)
    return buffer[: rows * width].view(rows, width)


def workers() -> int:
    """Threads a parallel pass uses: torch's intra-op thread count (1 inside a worker)."""
    return 1 if getattr(_local, "worker", False) else max(1, torch.get_num_threads())


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(item) for item in items]``, items taken in turn by up to :func:`workers` threads.

    Results come back in the order of ``items``; the first exception is re-raised.
    """
    count = min(workers(), len(items))
    if count <= 1:
        return [fn(item) for item in items]
    results: list[R | None] = [None] * len(items)
    queue = iter(range(len(items)))
    lock = threading.Lock()

    def drain() -> None:
        _local.worker = True
        try:
            while True:
                with lock:
                    index = next(queue, None)
                if index is None:
                    return
                results[index] = fn(items[index])
        finally:
            _local.worker = False

    futures = [_executor(count).submit(drain) for _ in range(count)]
    wait(futures)  # all threads stop before an error propagates
    for future in futures:
        future.result()
    return results  # type: ignore[return-value]


def per_thread(make: Callable[[], T]) -> Callable[[], T]:
    """A getter returning one object per thread, made on first use (e.g. a thread's scratch)."""
    store = threading.local()

    def get() -> T:
        value = getattr(store, "value", None)
        if value is None:
            value = store.value = make()
        return value

    return get


def spans(count: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges of :data:`SPAN` elements covering ``count`` elements."""
    return [(start, min(start + SPAN, count)) for start in range(0, count, SPAN)]


def subtract_rows_(stack: Tensor, base: Tensor) -> Tensor:
    """``stack[i] −= base`` for every row of a ``(M, N)`` stack, in place: task vectors."""
    if stack.device.type != "cpu":
        return stack.sub_(base)
    _in_spans(np.subtract, stack.numpy(), base.numpy(), stack.shape[1])
    return stack


def add_(out: Tensor, other: Tensor) -> Tensor:
    """``out += other`` (flat tensors), in spans on threads."""
    if out.device.type != "cpu":
        return out.add_(other)
    _in_spans(np.add, out.numpy(), other.numpy(), out.numel())
    return out


def _in_spans(ufunc: np.ufunc, target: np.ndarray, source: np.ndarray, columns: int) -> None:
    """``target[..., span] = ufunc(target[..., span], source[span])`` over spans of the last
    axis, on threads."""

    def one(span: tuple[int, int]) -> None:
        start, stop = span
        ufunc(target[..., start:stop], source[start:stop], out=target[..., start:stop])

    parallel_map(one, spans(columns))


def _executor(count: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="evomerge")
            _pool_size = count
        return _pool
