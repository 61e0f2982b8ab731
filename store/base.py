"""The store contract: what every task store offers (`TaskStore`, `StoreBackend`), its health, and the row a task is.

The task logic sees only `TaskStore`; the daemon's is a `store.journal.JournaledStore` around a `StoreBackend`:
`store.sqlite.SQLiteTaskStore`, or `store.postgres.PostgresTaskStore` for several hosts (TASK_DB=postgresql://…).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from dingtalk.route import Route
from store.schema import FLAGS as _FLAGS
from tasks.task import Task


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store is writing: `ok`, else why not, how many records wait in memory, and since when."""

    ok: bool
    reason: str = ""
    pending: int = 0
    since: float | None = None  # wall-clock time the outage began


class TaskRecords(Protocol):
    """The reads and writes every store has."""

    def save(self, task: Task) -> None: ...
    def get(self, task_id: str) -> Task | None: ...
    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]: ...
    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]: ...
    def remember_message(self, msg_id: str, now: float) -> bool: ...
    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None: ...
    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]: ...
    def session_for(self, conversation_key: str) -> str | None: ...
    def set_session(self, conversation_key: str, session_id: str) -> None: ...
    def purge(self, finished_before: float, seen_before: float) -> int: ...
    # The DingTalk call budget (dingtalk/api_budget.py): one add increments, atomically, the month's counter and, when
    # given, the month's counter of that kind of call and the user's counter of that day.
    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None: ...
    def api_calls(self, month: str) -> int: ...
    def api_calls_by_kind(self, month: str) -> dict[str, int]: ...
    def user_api_calls(self, day: str, user_id: str) -> int: ...


class TaskStore(TaskRecords, Protocol):
    """What the task logic sees: tasks, dedup keys, durations and conversation sessions across restarts."""

    def wait_written(self, timeout: float) -> bool: ...  # True once what was written before is committed
    def health(self) -> StoreHealth: ...  # never touches the DB: for /healthz
    def close(self) -> None: ...


class StoreBackend(TaskRecords, Protocol):
    """Where a `JournaledStore` writes: the same calls, synchronous, plus the recent msgIds and a transaction."""

    def recent_messages(self, since: float) -> dict[str, float]: ...
    def transaction(self) -> contextlib.AbstractContextManager: ...
    def close(self) -> None: ...


def task_to_row(task: Task) -> dict:
    """The row a task is stored as: the route as JSON, flags as 0/1 (both backends)."""
    row = dict(task.__dict__)  # not dataclasses.asdict: it deep-copies, and this runs on every transition
    row["route"] = json.dumps(task.route.__dict__, ensure_ascii=False)
    for name in _FLAGS:
        row[name] = int(row[name])
    return row


def task_from_row(row: dict) -> Task:
    """The task a stored row holds (`task_to_row` undone)."""
    values = dict(row)
    values["route"] = Route(**json.loads(values["route"]))
    for name in _FLAGS:
        values[name] = bool(values[name])
    return Task(**values)
