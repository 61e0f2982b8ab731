"""The usage report (`python bot.py usage [--month YYYY-MM] [--by user|day|conversation] [--csv]`): the month's runs,
tokens, cost, CPU time and metered DingTalk calls from the task DB's usage table, one row per user, day or chat, as
an aligned table or CSV; the last row is the month's total, so the rows sum to it.

Names come from chats: control characters are escaped in the table; in CSV a cell starting with = + - @ is prefixed
with ' so a spreadsheet shows it as text instead of running it as a formula."""

from __future__ import annotations

import csv
import io
import os
import re
import sqlite3
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import psycopg

from common.logs import escape_controls
from common.redaction import RedactedStream, dsn_passwords
from ops.task_table import _clip, _display_width, _pad
from store.postgres import is_postgres_url, safe_url
from usage.book import day_in
from usage.table import BY, Totals, UsageTable

HEADER = ("RUNS", "INPUT", "OUTPUT", "CACHE_READ", "CACHE_WRITE", "COST_USD", "CPU_S", "WALL_S", "API_CALLS")
MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def _numbers(totals: Totals) -> list[str]:
    return [str(totals.runs), str(totals.input_tokens), str(totals.output_tokens), str(totals.cache_read_tokens),
            str(totals.cache_creation_tokens), f"{totals.cost_usd:.4f}", f"{totals.cpu_seconds:.1f}",
            f"{totals.wall_seconds:.1f}", str(totals.api_calls)]


def _spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def format_usage(rows: list[Totals], total: Totals, by: str, as_csv: bool = False) -> str:
    """The rows and the total as an aligned table (or CSV text)."""
    head = ["USER", "NAME"] if by == "user" else [by.upper()]
    lines = [[*head, *HEADER]]
    for row in rows:
        lines.append([row.key, row.name, *_numbers(row)] if by == "user" else [row.key, *_numbers(row)])
    lines.append(["TOTAL", ""][:len(head)] + _numbers(total))
    if as_csv:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([[_spreadsheet_safe(cell) for cell in line] for line in lines])
        return text.getvalue().rstrip("\n")
    shown = [[_clip(cell, 40) if i < len(head) else cell for i, cell in enumerate(line)] for line in lines]
    widths = [max(_display_width(line[column]) for line in shown) for column in range(len(shown[0]))]
    return "\n".join("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(line)).rstrip() for line in shown)


def print_usage(db_path: str, tz: str, *, month: str = "", by: str = "user", as_csv: bool = False,
                out: TextIO | None = None, secrets: Iterable[str] = ()) -> int:
    """`python bot.py usage`: the month's usage from the task DB (a file or a postgresql:// URL); 1 on a problem."""
    secrets = (*secrets, *dsn_passwords(db_path))
    out, err = RedactedStream(out or sys.stdout, secrets), RedactedStream(sys.stderr, secrets)
    month = month or day_in(time.time(), tz)[:7]
    if not MONTH.match(month) or by not in BY:
        print(f"usage: --month YYYY-MM (not {escape_controls(month)}), --by one of {', '.join(BY)}", file=err)
        return 2
    if not is_postgres_url(db_path) and not os.path.isfile(db_path):
        print(f"no task DB at {os.path.abspath(db_path)} (set TASK_DB, or run the bot once)", file=err)
        return 1
    try:
        table = UsageTable(db_path)
        try:
            rows, total = table.grouped(month, by), table.month_totals(month)
        finally:
            table.close()
    except (psycopg.Error, sqlite3.Error) as exc:  # not reached, or a DB from before schema version 7
        print(f"task DB {safe_url(db_path)} has no usage to show ({' '.join(str(exc).split())})", file=err)
        return 1
    if not as_csv:
        rows = [Totals(**{**row.__dict__, "key": escape_controls(row.key), "name": escape_controls(row.name)})
                for row in rows]
    print(format_usage(rows, total, by, as_csv), file=out)
    if not as_csv:
        print(f"{month} ({tz} days), by {by}, from {safe_url(db_path)}; tokens as the CLI reported them "
              "(input includes cache reads)", file=out)
    return 0
