"""The task table (`python bot.py tasks`): tasks from the SQLite task DB, newest first, as aligned text.

Every cell comes from a chat or the DB: control characters are escaped, so no prompt can move the operator's
cursor, recolour the terminal or forge a row.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from datetime import datetime
from typing import TextIO

from logs import escape_controls
from task import Task
from task_store import SQLiteTaskStore


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


def format_task_table(tasks: list[Task], now: float) -> str:
    """Tasks as an aligned text table (Chinese prompts count as two columns)."""
    header = ("ID", "STATUS", "USER", "CREATED", "ELAPSED", "MODE", "DELIVERED", "PROMPT")
    rows = [header]
    for task in tasks:
        rows.append((escape_controls(task.id), escape_controls(task.status), escape_controls(task.user_id),
                     datetime.fromtimestamp(task.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                     f"{task.elapsed(now):.0f}s", "background" if task.background else "sync",
                     "yes" if task.delivered else "no", _clip(task.prompt, 40)))
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def select_tasks(store: SQLiteTaskStore, *, user: str | None = None, status: str | None = None,
                 limit: int = 20) -> list[Task]:
    """The newest `limit` tasks, optionally of one user and/or one status."""
    if status is None:
        return store.recent_for_user(user, limit)
    tasks = [t for t in store.load([status]) if user is None or t.user_id == user]
    return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit]


def print_tasks(db_path: str, *, user: str | None = None, status: str | None = None, limit: int = 20,
                out: TextIO | None = None, now: float | None = None) -> int:
    """`python bot.py tasks`: a table of tasks from the SQLite task DB; 1 if there is no DB."""
    out = out or sys.stdout
    absolute = os.path.abspath(db_path)
    if not os.path.isfile(absolute):
        print(f"no task DB at {absolute} (set TASK_DB, or run the bot once)", file=sys.stderr)
        return 1
    store = SQLiteTaskStore(absolute, read_only=True)
    try:
        tasks = select_tasks(store, user=user, status=status, limit=limit)
    finally:
        store.close()
    if not tasks:
        print("no tasks", file=out)
        return 0
    print(format_task_table(tasks, time.time() if now is None else now), file=out)
    print(f"{len(tasks)} task(s), newest first, from {absolute}", file=out)
    return 0
