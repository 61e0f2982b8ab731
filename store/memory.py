"""A task store that forgets everything on exit: for unit tests and the console."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from dataclasses import replace

from store.base import StoreHealth
from tasks.task import Task


class MemoryTaskStore:
    """A store that forgets everything on exit: for unit tests and the console (every write is done at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._seen: dict[str, float] = {}
        self._durations: list[tuple[str, str, float, float]] = []
        self._sessions: dict[str, str] = {}
        self._api_calls: dict[str, int] = {}
        self._by_kind: dict[tuple[str, str], int] = {}  # (month, kind)
        self._by_user: dict[tuple[str, str], int] = {}  # (day, user id)

    def save(self, task: Task) -> None:
        with self._lock:
            self._tasks[task.id] = replace(task)

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return replace(task) if task else None

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        wanted = set(statuses) if statuses is not None else None
        with self._lock:
            tasks = [replace(t) for t in self._tasks.values()
                     if (wanted is None or t.status in wanted) and not (undelivered_only and t.delivered)]
        return sorted(tasks, key=lambda t: t.created_at)

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        with self._lock:
            tasks = [replace(t) for t in self._tasks.values() if user_id is None or t.user_id == user_id]
        return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit]

    def recent_messages(self, since: float) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in self._seen.items() if v >= since}

    def remember_message(self, msg_id: str, now: float) -> bool:
        with self._lock:
            if msg_id in self._seen:
                return False
            self._seen[msg_id] = now
            return True

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        with self._lock:
            self._durations.append((user_id, keyword, seconds, now))

    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]:
        with self._lock:
            rows = [d for d in self._durations if d[1] == keyword and (user_id is None or d[0] == user_id)]
        return [d[2] for d in rows[-limit:]]

    def session_for(self, conversation_key: str) -> str | None:
        with self._lock:
            return self._sessions.get(conversation_key)

    def set_session(self, conversation_key: str, session_id: str) -> None:
        with self._lock:
            self._sessions[conversation_key] = session_id

    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None:
        with self._lock:
            self._api_calls[month] = self._api_calls.get(month, 0) + count
            if kind:
                self._by_kind[(month, kind)] = self._by_kind.get((month, kind), 0) + count
            if day and user_id:
                self._by_user[(day, user_id)] = self._by_user.get((day, user_id), 0) + count

    def api_calls(self, month: str) -> int:
        with self._lock:
            return self._api_calls.get(month, 0)

    def api_calls_by_kind(self, month: str) -> dict[str, int]:
        with self._lock:
            return {kind: calls for (of, kind), calls in self._by_kind.items() if of == month}

    def user_api_calls(self, day: str, user_id: str) -> int:
        with self._lock:
            return self._by_user.get((day, user_id), 0)

    def purge(self, finished_before: float, seen_before: float) -> int:
        with self._lock:
            old = [k for k, t in self._tasks.items()
                   if t.finished and (t.delivered or t.undeliverable) and (t.finished_at or 0) < finished_before]
            for key in old:
                del self._tasks[key]
            self._seen = {k: v for k, v in self._seen.items() if v >= seen_before}
            return len(old)

    def transaction(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wait_written(self, timeout: float) -> bool:
        return True

    def health(self) -> StoreHealth:
        return StoreHealth(ok=True)

    def close(self) -> None:
        pass




# A task's first save inserts its row, later ones update it. Not INSERT OR REPLACE: a task whose id collides with
# another's (another created_at) changes no row, so it never overwrites one.
