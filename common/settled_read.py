"""A read of "stored + pending" taken with nothing moving from pending to stored in between (the task store's budget
counters and the usage book: a write committed but not yet taken off the pending list would count twice)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

P = TypeVar("P")
R = TypeVar("R")


def read_with_pending(lock: Any, state: Callable[[], Hashable], landing: Callable[[], bool],
                      pending_of: Callable[[], P], read: Callable[[], R], *, tries: int,
                      pause: float) -> tuple[P, R]:
    """`pending_of()` (under `lock`) and `read()` (outside it), taken while `state()` (under `lock`: what has been
    written and whether a write is under way) stayed the same. While `landing()` says a write may be committing, the
    read waits for it (`pause` s at a time); after `tries` the last pending is paired with a fresh read."""
    for _ in range(tries):
        with lock:
            before, waiting, pending = state(), landing(), pending_of()
        if not waiting:
            value = read()
            with lock:
                if state() == before:
                    return pending, value
        time.sleep(pause)
    return pending, read()
