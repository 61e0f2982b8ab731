"""Which prompts run in the background, and how long they should take, from keywords and recorded run times."""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterable

from config import DEFAULT_EXPECTED_DURATION, SEED_LONG_TASK_KEYWORDS
from store.base import TaskStore
from tasks.task import NO_KEYWORD, Task

_HISTORY = 10  # a user's last keyword-less runs that decide whether their next prompt goes to the background


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


class Router:
    """Routes prompts by long-task keyword or by the user's history, and estimates durations from the store."""

    def __init__(self, store: TaskStore, *, sync_timeout: float = 60.0,
                 keywords: Iterable[str] = SEED_LONG_TASK_KEYWORDS) -> None:
        self.store = store
        self.sync_timeout = sync_timeout
        self.keywords = tuple(dict.fromkeys(k.strip() for k in keywords if k.strip()))
        self._lock = threading.Lock()
        # Each user's last ten no-keyword durations: should_use_async runs for every prompt.
        self._recent_durations: dict[str, tuple[float, ...]] = {}

    def matched_keyword(self, prompt: str) -> str | None:
        """The first long-task keyword found in `prompt` (case-insensitive), or None."""
        lowered = prompt.lower()
        for keyword in self.keywords:
            if keyword.lower() in lowered:
                return keyword
        return None

    def should_use_async(self, prompt: str, user_id: str | None = None) -> bool:
        """True when `prompt` should run in the background: a keyword, or this user's history says it runs long."""
        if self.matched_keyword(prompt) is not None:
            return True
        if user_id is None:
            return False
        with self._lock:
            history = self._recent_durations.get(user_id)
        if history is None:  # read once per user, then kept current by record_duration
            history = tuple(self.store.durations(NO_KEYWORD, user_id, limit=_HISTORY))
            with self._lock:
                self._recent_durations[user_id] = history
        long_runs = sum(1 for seconds in history if seconds > self.sync_timeout)
        return len(history) >= 2 and long_runs * 2 > len(history)

    def record_duration(self, task: Task, seconds: float, now: float) -> None:
        """Remember how long a run of `task`'s keyword class took (for routing and estimates)."""
        self.store.record_duration(task.user_id, task.keyword, seconds, now)
        if task.keyword == NO_KEYWORD:
            with self._lock:
                history = self._recent_durations.get(task.user_id)
                if history is not None:
                    self._recent_durations[task.user_id] = (seconds, *history)[:_HISTORY]

    def expected_duration(self, keyword: str) -> str:
        """Median and 90th percentile of past runs of this keyword class, or the fixed text without history."""
        history = sorted(self.store.durations(keyword, limit=50))
        if len(history) < 3:
            return DEFAULT_EXPECTED_DURATION
        median = statistics.median(history)
        p90 = history[min(len(history) - 1, int(round(0.9 * (len(history) - 1))))]
        return f"约 {_minutes(median)} 分钟 (90% 的同类任务在 {_minutes(p90)} 分钟内完成)"

    def expected_remaining(self, task: Task, now: float) -> str:
        """How much longer a running task should take, from the median of its keyword class."""
        history = self.store.durations(task.keyword, limit=50)
        if len(history) < 3:
            return f"同类任务通常需要 {DEFAULT_EXPECTED_DURATION}" if task.background else "未知"
        remaining = statistics.median(history) - (now - (task.started_at or now))
        if remaining <= 0:
            return "已超过同类任务的通常耗时，应该很快完成"
        return f"约 {_minutes(remaining)} 分钟"
