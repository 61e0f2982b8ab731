"""The bot's command line: its commands (run, check, tasks, schedules, usage, console) and their options."""

from __future__ import annotations

import argparse

from config import parse_positive_int
from ops.store_admin import add_migrate_command
from tasks.task import STATUS_LABELS


def positive_int(raw: str) -> int:
    """argparse type: a whole number greater than 0."""
    return parse_positive_int("the value", raw)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `bot.py`."""
    parser = argparse.ArgumentParser(
        prog="bot.py", description="DingTalk ⇄ CodeBuddy bot. Settings come from .env and the environment "
        "(the environment wins); docs/configuration.md lists them all.")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    commands.add_parser("run", help="run the daemon: connect to DingTalk Stream and answer messages (default)",
                        description="Run the daemon until SIGTERM/SIGINT. Under systemd (Type=notify) it sends "
                        "READY=1, WATCHDOG=1 and STOPPING=1; STATUS_PORT serves /healthz and /metrics.")
    commands.add_parser("check", help="doctor: show the settings, test the DingTalk credentials, the CLI and its "
                        "login, the sandbox and the writable paths (exit 0 only if all pass)",
                        description="Print every setting (secrets masked), every configuration problem at once and "
                        "one ✓/✗ line per check: configuration, DingTalk access token, Stream gateway, the CodeBuddy "
                        "CLI (binary, version, origin) and whether its runs can sign in, the sandbox, workspace, "
                        "task DB and log file writable. Exit 0 only if every check passes.")
    tasks = commands.add_parser("tasks", help="table of tasks from the task DB (TASK_DB)",
                                description="Print the newest tasks from the task DB (SQLite or PostgreSQL), "
                                "newest first.")
    tasks.add_argument("--user", metavar="ID", help="only this user's tasks (staff id)")
    tasks.add_argument("--status", choices=list(STATUS_LABELS), help="only tasks with this status")
    tasks.add_argument("--limit", metavar="N", type=positive_int, default=20, help="at most N rows (20)")
    tasks.add_argument("--db", metavar="PATH", help="task DB file or postgresql:// URL (default: TASK_DB)")
    schedules = commands.add_parser("schedules", help="table of scheduled prompts from the task DB (TASK_DB)",
                                    description="Print every schedule of the task DB (SQLite or PostgreSQL): owner, "
                                    "chat, when, next fire (SCHEDULE_TZ), fires, skips, the last result, the prompt.")
    schedules.add_argument("--db", metavar="PATH", help="task DB file or postgresql:// URL (default: TASK_DB)")
    usage = commands.add_parser("usage", help="who used how much this month, from the task DB (TASK_DB)",
                                description="Print the month's runs, tokens, cost, CPU time and metered DingTalk "
                                "calls per user, day or chat (days in SCHEDULE_TZ), with the month's total last.")
    usage.add_argument("--month", metavar="YYYY-MM", default="", help="the month (default: this one)")
    usage.add_argument("--by", choices=("user", "day", "conversation"), default="user", help="one row per (user)")
    usage.add_argument("--csv", action="store_true", help="CSV instead of an aligned table")
    usage.add_argument("--db", metavar="PATH", help="task DB file or postgresql:// URL (default: TASK_DB)")
    add_migrate_command(commands)
    console_command = commands.add_parser(
        "console", help="chat with the bot in this terminal, no DingTalk needed",
        description="Each line of stdin goes through the same commands, routing, task manager and CodeBuddy CLI "
        "(CODEBUDDY_BIN) as a DingTalk 1:1 message; what the chat would show is printed. Tasks are kept in memory "
        "only. End of input waits for running tasks, then exits.")
    console_command.add_argument("--user", metavar="ID", default="console",
                                 help="the staff id you chat as (default: console; must be in ALLOWED_USERS if set)")
    return parser
