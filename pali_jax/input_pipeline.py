"""Input preparation ahead of the device: a function run over items on worker threads.

Image decoding (PIL releases the GIL while it decodes and resizes), EXIF, resizing and tokenizing
run on `workers` threads while the device decodes. At most `queue_size` items are in flight or
prepared and not yet taken, so memory stays bounded however long the input is; items come out in
input order. A `UserError` raised for one item (an unreadable image, a prompt too long) becomes a
`Failed` result naming it, so that one bad file never ends the job; any other exception is a bug
and is raised where the item is taken.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from pali_jax.errors import UserError

MAX_WORKERS = 64
MAX_QUEUE = 4096

In = TypeVar("In")
Out = TypeVar("Out")


@dataclasses.dataclass(frozen=True)
class Failed:
    """An item that could not be prepared: its position in the input and why."""

    position: int
    message: str


@dataclasses.dataclass(frozen=True)
class Ready(Generic[Out]):
    position: int
    value: Out
    prepare_s: float  # worker time spent on it


def _bounded(name: str, value: int, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserError(f"{name} must be an int in [1, {limit}], got {value!r}")
    return value


def check_sizes(workers: int, queue_size: int) -> None:
    """Refuses a number of worker threads or a queue size out of range (one-line `UserError`)."""
    _bounded("workers", workers, MAX_WORKERS)
    _bounded("queue_size", queue_size, MAX_QUEUE)


class Prefetcher(Generic[In, Out]):
    """`prepare` applied to `items` on worker threads, taken in input order with `take`. Items are
    read from `items` as room in the queue frees up (an iterator is never read whole).

    Use as a context manager: leaving it cancels what has not started and waits for the rest.
    """

    def __init__(self, prepare: Callable[[In], Out], items: Iterable[In], *, workers: int = 2, queue_size: int = 64):
        self._prepare = prepare
        self._items: Iterator[tuple[int, In]] = enumerate(items)
        check_sizes(workers, queue_size)
        self._queue_size = queue_size
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prepare")
        self._pending: deque[Future] = deque()
        self._fill()

    def __enter__(self) -> "Prefetcher[In, Out]":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, position: int, item: In) -> Ready[Out] | Failed:
        t0 = time.perf_counter()
        try:
            value = self._prepare(item)
        except UserError as e:
            return Failed(position, str(e))
        return Ready(position, value, time.perf_counter() - t0)

    def _fill(self) -> None:
        while len(self._pending) < self._queue_size:
            nxt = next(self._items, None)
            if nxt is None:
                return
            self._pending.append(self._pool.submit(self._run, *nxt))

    def take(self) -> Ready[Out] | Failed | None:
        """The next item's result, waiting for it if it is not ready; None when there are no more."""
        if not self._pending:
            return None
        result = self._pending.popleft().result()
        self._fill()
        return result
