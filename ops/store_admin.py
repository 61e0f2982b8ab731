"""Operator work on a PostgreSQL task DB: `bot.py check`'s database line and `bot.py migrate-store` from SQLite.

The check connects without creating anything: it says whether the server answers, which schema version the DB is
at (the bot creates or migrates it at start) and how far this host's clock is from the server's, which leases are
measured by (a host whose clock runs ahead would see other hosts' leases expire early). The migration copies every
table of a SQLite task DB into an empty PostgreSQL one in one transaction.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from typing import TextIO

import psycopg

from schedules.table import COLUMNS
from store import pg_connect
from store.postgres import PostgresTaskStore, is_postgres_url, safe_url
from store.schema import SCHEMA_VERSION, StoreError
from store.sqlite import SQLiteTaskStore, read_only_uri
from usage.table import COLUMNS as USAGE_TABLE_COLUMNS

MAX_CLOCK_SKEW = 2.0  # seconds; leases last LEASE_SECONDS (30): a few seconds' skew already shortens them
# Past this the bot does not start on a shared DB: its dedup window and purges would misjudge other hosts' records.
MAX_START_SKEW = 60.0


def clock_skew(conn: psycopg.Connection, clock: Callable[[], float] = time.time) -> float:
    """This host's clock minus the database's, in seconds (the middle of the query's round trip)."""
    before = clock()
    db_now = float(conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
    return (before + clock()) / 2 - db_now


def clock_problem(url: str, *, clock: Callable[[], float] = time.time, timeout: float = 5.0,
                  max_skew: float = MAX_START_SKEW) -> str:
    """Why this host may not work on the shared task DB at `url` for its clock ("" if it may, or if the DB does not
    answer: opening the store says that). A host whose clock is a day ahead would take every redelivered message
    for a new one and purge the other hosts' records as old."""
    try:
        with pg_connect.connect(url, statement_timeout=timeout, connect_timeout=timeout, read_only=True) as conn:
            skew = clock_skew(conn, clock)
    except psycopg.Error:
        return ""
    if abs(skew) <= max_skew:
        return ""
    return (f"this host's clock is {skew:+.0f} s off the task DB's (more than {max_skew:.0f} s): the hosts would "
            "disagree on message redeliveries and on what is old enough to purge; run NTP (timedatectl set-ntp true)")


def check_postgres(url: str, *, clock: Callable[[], float] = time.time, timeout: float = 5.0,
                   max_skew: float = MAX_CLOCK_SKEW) -> tuple[bool, str]:
    """(ok, detail) of `check`'s task DB line for a postgresql:// TASK_DB; never creates or writes anything."""
    shown = safe_url(url)
    try:
        # The bot's own connection limits (connect, statement, TCP): a black-holed server cannot hang `check`.
        with pg_connect.connect(url, statement_timeout=timeout, connect_timeout=timeout, read_only=True) as conn:
            skew = clock_skew(conn, clock)
            has_version = conn.execute("SELECT to_regclass('schema_version')").fetchone()[0] is not None
            version = conn.execute("SELECT version FROM schema_version").fetchone()[0] if has_version else 0
    except psycopg.Error as exc:
        why = " ".join(str(exc).split())
        return False, f"{shown} cannot be reached ({why}): start PostgreSQL, check the URL and the user's password"
    if version > SCHEMA_VERSION:
        return False, f"{shown} has schema version {version}, newer than this bot's {SCHEMA_VERSION}: upgrade the bot"
    if abs(skew) > max_skew:
        return False, (f"{shown}: this host's clock is {skew:+.1f} s off the database's (more than {max_skew:.0f} s "
                       "shortens or stretches task leases): run NTP (timedatectl set-ntp true) on every host")
    state = (f"schema version {version}" if version == SCHEMA_VERSION
             else f"schema version {version}, the bot migrates it to {SCHEMA_VERSION} at start")
    return True, f"{shown} answers; {state}; clock skew {skew:+.2f} s"


SCHEDULE_COLUMNS = ", ".join(COLUMNS)
USAGE_COLUMNS = ", ".join(USAGE_TABLE_COLUMNS)


def _sqlite_rows(path: str, table: str) -> list[tuple]:
    db = sqlite3.connect(read_only_uri(os.path.abspath(path)), uri=True)
    try:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchall():
            return []
        if table == "durations":
            return db.execute("SELECT user_id, keyword, seconds, finished_at FROM durations ORDER BY rowid").fetchall()
        if table in ("schedules", "usage"):
            return db.execute(f"SELECT {SCHEDULE_COLUMNS if table == 'schedules' else USAGE_COLUMNS} FROM {table}"
                              ).fetchall()
        return db.execute(f"SELECT * FROM {table}").fetchall()
    finally:
        db.close()


def add_migrate_command(commands: argparse._SubParsersAction) -> None:
    """`bot.py migrate-store SQLITE_PATH [--to URL]`."""
    migrate = commands.add_parser("migrate-store", help="copy a SQLite task DB into the PostgreSQL TASK_DB",
                                  description="Copy every task, msgId, session, duration, API call counter, "
                                  "schedule and usage row of a SQLite task DB into an empty PostgreSQL one (TASK_DB or "
                                  "--to), in one transaction.")
    migrate.add_argument("sqlite_path", metavar="SQLITE_PATH", help="the SQLite task DB file (the old TASK_DB)")
    migrate.add_argument("--to", metavar="URL", help="postgresql:// URL (default: TASK_DB)")


def migrate_store(sqlite_path: str, url: str, out: TextIO | None = None) -> int:
    """`bot.py migrate-store`: copy the SQLite task DB at `sqlite_path` into the empty PostgreSQL DB at `url`.

    One transaction: all of it or nothing. Refuses a target that already holds tasks (run it once, before the
    first bot starts on PostgreSQL). Exit status 0 on success, 1 with one line on stderr otherwise.
    """
    out = out or sys.stdout
    if not is_postgres_url(url):
        print(f"migrate-store copies into PostgreSQL: set TASK_DB or --to to a postgresql:// URL (not {url})",
              file=sys.stderr)
        return 1
    absolute = os.path.abspath(sqlite_path)
    if not os.path.isfile(absolute):
        print(f"no SQLite task DB at {absolute}", file=sys.stderr)
        return 1
    try:
        source = SQLiteTaskStore(absolute, read_only=True)
        target = PostgresTaskStore(url, pool_size=1, connect_timeout=5.0)
    except StoreError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        if target.count():
            print(f"{target.path} already holds {target.count()} task(s): migrate into an empty database",
                  file=sys.stderr)
            return 1
        tasks = source.load()
        tables = {name: _sqlite_rows(absolute, name)
                  for name in ("seen_messages", "durations", "sessions", "api_calls", "api_calls_by_kind",
                               "user_api_calls", "schedules", "usage")}
        with target.transaction(), target.connection() as conn:
            for task in tasks:
                target.save(task)
            for table, columns in (("seen_messages", "msg_id, seen_at"), ("sessions", "conversation_key, session_id"),
                                   ("api_calls", "month, calls"), ("api_calls_by_kind", "month, kind, calls"),
                                   ("user_api_calls", "day, user_id, calls"),
                                   ("durations", "user_id, keyword, seconds, finished_at"),
                                   ("schedules", SCHEDULE_COLUMNS), ("usage", USAGE_COLUMNS)):
                width = len(columns.split(","))
                with conn.cursor() as cursor:
                    cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(['%s'] * width)})",
                                       tables[table])
    except (psycopg.Error, sqlite3.Error) as exc:
        print(f"migration failed, nothing was copied ({' '.join(str(exc).split())})", file=sys.stderr)
        return 1
    finally:
        source.close()
        target.close()
    counts = ", ".join(f"{len(rows)} {name}" for name, rows in tables.items())
    print(f"copied {len(tasks)} tasks, {counts} from {absolute} into {safe_url(url)}", file=out)
    return 0

