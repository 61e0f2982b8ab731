"""The intake thread: bot messages handled one at a time in arrival order, each batch written before its ACKs."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections.abc import Callable

from common.supervision import Supervisor

log = logging.getLogger("bot")


def settle(future: asyncio.Future, value: bool) -> None:
    """Resolve a frame's "recorded" future (True: recorded; False: the ACK stopped waiting), once."""
    if not future.done():
        future.set_result(value)


def settle_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        settle(future, True)


class Intake:
    """One thread that handles bot messages in arrival order and tells the event loop when they are recorded.

    It takes every message waiting at once and wakes the loop once per batch, not once per message: in a
    burst that wake-up was a large part of the cost of an acknowledgement (BENCHMARKS.md).
    """

    def __init__(self, handle: Callable[[dict], None], written: Callable[[], bool] = lambda: True, *,
                 supervisor: Supervisor | None = None) -> None:
        self._handle = handle
        # Blocks until what the batch recorded is written to the store; False when the store is down (the
        # records stay in memory) or slow: the ACKs go out then too, as waiting longer would not help.
        self._written = written
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting_since: float | None = None  # when the oldest message not yet handled arrived
        self._thread = (supervisor or Supervisor()).start("intake", self._run)

    def submit(self, data: dict, loop: asyncio.AbstractEventLoop | None = None,
               recorded: asyncio.Future | None = None) -> None:
        """Queue one message; `recorded` (a future of `loop`) is set to True once it has been handled."""
        if self._waiting_since is None:
            self._waiting_since = time.monotonic()
        self._queue.put((data, loop, recorded))

    def backlog_age(self, now: float) -> float:
        """Seconds the oldest message not yet handled has waited (0 when none waits): health's stuck check."""
        since = self._waiting_since
        return max(0.0, now - since) if since is not None else 0.0

    def shutdown(self, timeout: float = 10.0) -> None:
        """Handle what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
            stopping = False
            for item in batch:
                if item is None:
                    stopping = True
                    continue
                data, loop, recorded = item
                try:
                    self._handle(data)
                except Exception:
                    log.exception("处理消息失败")
                if loop is not None and recorded is not None:
                    waiting.setdefault(loop, []).append(recorded)
            try:
                self._written()
            except Exception:
                log.exception("等待消息记录写入失败")
            self._waiting_since = None if self._queue.empty() else time.monotonic()
            for loop, futures in waiting.items():
                try:
                    loop.call_soon_threadsafe(settle_all, futures)
                except RuntimeError:
                    pass  # the loop has closed (shutdown): nothing is waiting for these ACKs any more
            if stopping:
                return
