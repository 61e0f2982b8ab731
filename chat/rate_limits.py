"""Per-user rate limits: one-minute sliding windows and quiet periods, swept so memory follows active users only."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable

WINDOW_SECONDS = 60.0
SWEEP_EVERY_SECONDS = 60.0


class RateLimits:
    """Counts events per key in a sliding one-minute window and keeps per-key quiet periods.

    Every `SWEEP_EVERY_SECONDS` (on the next call) keys with nothing left to remember are dropped, so the
    dictionaries hold the users of the last minutes, not every user ever seen.
    """

    def __init__(self, clock: Callable[[], float] = time.time, window: float = WINDOW_SECONDS,
                 sweep_every: float = SWEEP_EVERY_SECONDS) -> None:
        self.clock = clock
        self.window = window
        self.sweep_every = sweep_every
        self._events: dict[Hashable, collections.deque[float]] = {}
        self._quiet_until: dict[Hashable, float] = {}
        self._next_sweep = clock() + sweep_every
        self._lock = threading.Lock()

    def allow(self, key: Hashable, limit: int) -> bool:
        """Record one event for `key` and return True, or False (nothing recorded) when `limit` is reached."""
        now = self.clock()
        with self._lock:
            self._sweep_if_due(now)
            events = self._events.setdefault(key, collections.deque())
            while events and now - events[0] >= self.window:
                events.popleft()
            if len(events) >= limit:
                return False
            events.append(now)
            return True

    def once_per(self, key: Hashable, seconds: float) -> bool:
        """True at most once every `seconds` for `key` (e.g. one refusal reply, not one per message)."""
        now = self.clock()
        with self._lock:
            self._sweep_if_due(now)
            if now < self._quiet_until.get(key, now):
                return False
            self._quiet_until[key] = now + seconds
            return True

    def sweep(self, now: float | None = None) -> int:
        """Drop keys whose window is empty and whose quiet period is over; how many were dropped."""
        now = self.clock() if now is None else now
        with self._lock:
            return self._sweep(now)

    def __len__(self) -> int:
        """Keys remembered (windows and quiet periods)."""
        with self._lock:
            return len(self._events) + len(self._quiet_until)

    def _sweep_if_due(self, now: float) -> None:
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> int:
        self._next_sweep = now + self.sweep_every
        stale = [key for key, events in self._events.items() if not events or now - events[-1] >= self.window]
        for key in stale:
            del self._events[key]
        quiet = [key for key, until in self._quiet_until.items() if until <= now]
        for key in quiet:
            del self._quiet_until[key]
        return len(stale) + len(quiet)
