"""The task table (`python bot.py tasks`): tasks from the task DB (SQLite or PostgreSQL), newest first, as aligned
text: local times with their zone, durations like `45s`/`30m`/`2h`, why a task failed, and how many rows --limit
left out.

Every cell comes from a chat or the DB: control characters are escaped, so no prompt can move the operator's
cursor, recolour the terminal or forge a row.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from collections.abc import Iterable
from datetime import datetime
from typing import TextIO

from common.logs import escape_controls
from common.redaction import RedactedStream, dsn_passwords, replace_secrets
from store.postgres import PostgresTaskStore, is_postgres_url, safe_url
from store.schema import StoreError
from store.sqlite import SQLiteTaskStore
from tasks.task import FINISHED_STATUSES, SUCCEEDED, Task


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _display_width(text))


def _clip(text: str, width: int) -> str:
    text = escape_controls(" ".join(text.split()))  # newlines read as spaces; ESC and the rest as escapes
    if _display_width(text) <= width:
        return text
    clipped = ""
    for char in text:
        if _display_width(clipped + char) > width - 1:
            break
        clipped += char
    return clipped + "…"


def format_duration(seconds: float) -> str:
    """`45s`, `1m30s`, `30m`, `2h`, `1h05m`: whole seconds under an hour, whole minutes above."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        minutes, rest = divmod(total, 60)
        return f"{minutes}m{rest:02d}s" if rest else f"{minutes}m"
    hours, minutes = divmod(round(total / 60), 60)
    return f"{hours}h{minutes:02d}m" if minutes else f"{hours}h"


def local_time(timestamp: float) -> str:
    """A timestamp in the local zone, with the zone's offset: `2026-02-28 15:30:00 +0800`."""
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %z")


def failure_reason(task: Task) -> str:
    """Why a task did not succeed (its error), or that its result was given up; "" otherwise."""
    reason = task.error if task.status in FINISHED_STATUSES and task.status != SUCCEEDED else ""
    if task.undeliverable:
        reason = f"{reason}; result given up" if reason else "result given up"
    return reason


def format_task_table(tasks: list[Task], now: float, secrets: Iterable[str] = ()) -> str:
    """Tasks as an aligned text table (Chinese prompts count as two columns), each of `secrets` shown as ***."""
    secrets = tuple(secrets)
    header = ("ID", "STATUS", "USER", "CREATED", "ELAPSED", "MODE", "DELIVERED", "REASON", "PROMPT")
    rows = [header]
    for task in tasks:
        # Replaced before the cells are cut: a secret cut at the column's end would show its first characters.
        reason, prompt = (replace_secrets(text, secrets) for text in (failure_reason(task), task.prompt))
        rows.append((escape_controls(task.id), escape_controls(task.status), escape_controls(task.user_id),
                     local_time(task.created_at), format_duration(task.elapsed(now)),
                     "background" if task.background else "sync", "yes" if task.delivered else "no",
                     _clip(reason, 40) or "-", _clip(prompt, 40)))
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def select_tasks(store: SQLiteTaskStore | PostgresTaskStore, *, user: str | None = None, status: str | None = None,
                 limit: int = 20) -> tuple[list[Task], int]:
    """The newest `limit` tasks, optionally of one user and/or one status, and how many match in all."""
    if status is None:
        return store.recent_for_user(user, limit), store.count(user)
    tasks = [t for t in store.load([status]) if user is None or t.user_id == user]
    return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit], len(tasks)


def print_tasks(db_path: str, *, user: str | None = None, status: str | None = None, limit: int = 20,
                out: TextIO | None = None, now: float | None = None, secrets: Iterable[str] = ()) -> int:
    """`python bot.py tasks`: a table of tasks from the task DB (a file or a postgresql:// URL); 1 if there is none.
    `secrets` (and the DB's password) are shown as *** wherever they appear: in a prompt, a reason or the DB's name."""
    secrets = (*secrets, *dsn_passwords(db_path))
    out, err = RedactedStream(out or sys.stdout, secrets), RedactedStream(sys.stderr, secrets)
    store: SQLiteTaskStore | PostgresTaskStore
    if is_postgres_url(db_path):
        absolute = safe_url(db_path)
        try:
            store = PostgresTaskStore(db_path, read_only=True, pool_size=1, connect_timeout=5.0)
        except StoreError as exc:
            print(str(exc), file=err)
            return 1
    else:
        absolute = os.path.abspath(db_path)
        if not os.path.isfile(absolute):
            print(f"no task DB at {safe_url(absolute)} (set TASK_DB, or run the bot once)", file=err)
            return 1
        store = SQLiteTaskStore(absolute, read_only=True)
    try:
        tasks, total = select_tasks(store, user=user, status=status, limit=limit)
    finally:
        store.close()
    if not tasks:
        print("no tasks", file=out)
        return 0
    print(format_task_table(tasks, time.time() if now is None else now, secrets), file=out)
    more = f"; {total - len(tasks)} more (--limit {total} shows them all)" if total > len(tasks) else ""
    print(f"{len(tasks)} task(s), newest first, from {safe_url(absolute)}{more}", file=out)
    return 0
