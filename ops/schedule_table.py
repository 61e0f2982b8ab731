"""The schedule table (`python bot.py schedules`): every schedule in the task DB (SQLite or PostgreSQL), as aligned
text: its id, owner, chat, words, next fire (in SCHEDULE_TZ), fires, skips, what the last fire did and the prompt.

Every cell comes from a chat or the DB: control characters are escaped, as in the task table."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Iterable
from typing import TextIO

import psycopg

from common.logs import escape_controls
from common.redaction import RedactedStream, dsn_passwords, replace_secrets
from ops.task_table import _clip, _display_width, _pad
from schedules.forms import local_time
from schedules.table import Schedule, ScheduleTable
from store.postgres import is_postgres_url, safe_url


def format_schedule_table(schedules: list[Schedule], tz: str, secrets: Iterable[str] = ()) -> str:
    """Schedules as an aligned text table (Chinese text counts as two columns), each of `secrets` shown as ***."""
    secrets = tuple(secrets)
    header = ("ID", "USER", "CHAT", "WHEN", "NEXT", "FIRES", "SKIPPED", "LAST", "PROMPT")
    rows = [header]
    for schedule in schedules:
        chat = schedule.route.conversation_id or "1:1"
        rows.append((escape_controls(schedule.id), escape_controls(schedule.user_id), _clip(chat, 20),
                     _clip(schedule.words, 30), "paused" if schedule.paused else local_time(schedule.next_fire, tz),
                     str(schedule.fires), str(schedule.skipped), _clip(schedule.last_result, 40) or "-",
                     _clip(replace_secrets(schedule.prompt, secrets), 40)))
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _read(db_path: str) -> list[Schedule]:
    table = ScheduleTable(db_path)
    try:
        return table.listed()
    finally:
        table.close()


def schedules_line(db_path: str, tz: str) -> str:
    """`bot.py check`'s line: how many schedules the task DB holds, how many paused, and the next fire (information)."""
    if not is_postgres_url(db_path) and (db_path == ":memory:" or not os.path.isfile(db_path)):
        return "· schedules: none (no task DB yet)"
    try:
        schedules = _read(db_path)
    except (psycopg.Error, sqlite3.Error) as exc:
        return f"· schedules: not read ({type(exc).__name__}: {' '.join(str(exc).split())})"
    active = [schedule for schedule in schedules if not schedule.paused]
    if not active:
        return f"· schedules: {len(schedules)} ({len(schedules)} paused)" if schedules else "· schedules: none"
    upcoming = min(active, key=lambda schedule: schedule.next_fire)
    return (f"· schedules: {len(schedules)} ({len(schedules) - len(active)} paused); next fire "
            f"{local_time(upcoming.next_fire, tz)} {tz}, schedule {escape_controls(upcoming.id)}")


def print_schedules(db_path: str, tz: str, *, out: TextIO | None = None, secrets: Iterable[str] = ()) -> int:
    """`python bot.py schedules`: every schedule of the task DB (a file or a postgresql:// URL); 1 if there is none."""
    secrets = (*secrets, *dsn_passwords(db_path))
    out, err = RedactedStream(out or sys.stdout, secrets), RedactedStream(sys.stderr, secrets)
    if not is_postgres_url(db_path) and not os.path.isfile(db_path):
        print(f"no task DB at {os.path.abspath(db_path)} (set TASK_DB, or run the bot once)", file=err)
        return 1
    try:
        schedules = _read(db_path)
    except (psycopg.Error, sqlite3.Error) as exc:  # not reached, or a DB from before schema version 6
        print(f"task DB {safe_url(db_path)} has no schedules to show ({' '.join(str(exc).split())})", file=err)
        return 1
    if not schedules:
        print("no schedules", file=out)
        return 0
    print(format_schedule_table(schedules, tz, secrets), file=out)
    print(f"{len(schedules)} schedule(s), oldest first, times in {tz}, from {safe_url(db_path)}", file=out)
    return 0
