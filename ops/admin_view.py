"""What the admin page shows, gathered from the live bot: tasks, warm CLI processes, the API budget, usage, schedules.

`admin_view(sources, now)` reads the daemon's objects (ops/metrics.py `StatusSources`) into plain frozen values; the
page (ops/admin_page.py) is a pure rendering of them. The board's lock is held only to copy the live tasks, never
around DB reads. A part that cannot be read is left out of the view with a line in `problems`, not a failed page.

Usage is recorded elsewhere: `StatusSources.usage` is a `UsageSource`, called with the month ("2026-05") and answering
`(users, days)`. The page reads their fields by name only, so a provider below `ops/` may return objects of its own
with the same fields.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from common.redaction import replace_secrets
from dingtalk.api_budget import GROUP_LABELS, month_of
from schedules.forms import local_time
from tasks.task import RUNNING, STATUS_LABELS
from usage.book import day_in

log = logging.getLogger("ops")

PROMPT_CHARS = 60  # a task's prompt is shown cut to this many characters


@dataclass(frozen=True)
class UserUsage:
    """One user's runs and what they cost, in the month asked for."""

    user_id: str
    user_name: str
    runs: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cpu_seconds: float


@dataclass(frozen=True)
class DayUsage:
    """One day's runs (all users) and what they cost; `day` is "YYYY-MM-DD" (a SCHEDULE_TZ day, as usage counts)."""

    day: str
    runs: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    cpu_seconds: float


# The usage provider: the month "YYYY-MM" → (each user's usage, biggest first; each day's usage, oldest first).
UsageSource = Callable[[str], tuple[Sequence[UserUsage], Sequence[DayUsage]]]


@dataclass(frozen=True)
class TaskRow:
    """A task running or queued now, as the page shows it."""

    id: str
    user_name: str
    user_id: str
    chat: str  # "1:1" or "group"
    status: str  # "running" or "queued"
    elapsed: float  # seconds since it was received
    prompt: str  # its first PROMPT_CHARS characters
    last_step: str


@dataclass(frozen=True)
class BudgetView:
    """This month's metered DingTalk calls (every host's) against DINGTALK_MONTHLY_CALL_BUDGET."""

    month: str
    spent: int
    budget: int
    by_group: tuple[tuple[str, int], ...]  # (label, calls): pushes, cards, downloads, uploads, other
    limited: bool  # DingTalk refuses metered calls until the month turns (ApiCountLimitForOrg)


@dataclass(frozen=True)
class ScheduleRow:
    """A schedule of the task DB, as the page shows it."""

    id: str
    user_name: str
    user_id: str
    words: str
    next_fire: str  # in the page's time zone, or "paused"
    fires: int
    skipped: int
    last_result: str


@dataclass(frozen=True)
class AdminView:
    """Everything one rendering of the admin page shows. None = that part is not there (no budget, no usage
    recorded, no schedules); `problems` names the parts that could not be read."""

    host: str
    rendered_at: str  # "2026-05-17 14:03:09 CST"
    tz: str
    month: str
    version: str = ""
    tasks: tuple[TaskRow, ...] = ()
    warm: dict[str, int] | None = None
    budget: BudgetView | None = None
    users: tuple[UserUsage, ...] | None = None
    days: tuple[DayUsage, ...] | None = None
    schedules: tuple[ScheduleRow, ...] | None = None
    problems: tuple[str, ...] = field(default=())


def live_tasks(board: Any, now: float, secrets: Iterable[str] = ()) -> list[TaskRow]:
    """The tasks running on this host, then the queued ones in queue order; the board's lock held to copy them only."""
    with board.lock:
        running = [task for task in board.tasks.values() if task.status == RUNNING]
        queued = [board.tasks[key] for key in board.queue if key in board.tasks]
        copied = [(t.id, t.user_name, t.user_id, t.route.is_group, t.status, t.elapsed(now), t.prompt, t.last_step)
                  for t in sorted(running, key=lambda t: t.started_at or t.created_at) + queued]
    secrets = tuple(secrets)
    return [TaskRow(id=task_id, user_name=name, user_id=user, chat="group" if group else "1:1", status=status,
                    elapsed=max(0.0, elapsed), prompt=replace_secrets(prompt, secrets)[:PROMPT_CHARS],
                    last_step=replace_secrets(step, secrets))
            for task_id, name, user, group, status, elapsed, prompt, step in copied]


def budget_view(budget: Any, month: str) -> BudgetView:
    """The month's spend of an `api_budget.ApiBudget`, as every host counted it (one read of the task DB)."""
    spent, groups = budget.month_spend()
    return BudgetView(month=month, spent=spent, budget=budget.monthly_budget,
                      by_group=tuple((GROUP_LABELS.get(group, group) + f" ({group})", calls)
                                     for group, calls in groups.items()),
                      limited=budget.limited())


def schedule_rows(table: Any, tz: str) -> list[ScheduleRow]:
    """Every schedule of the task DB, oldest first (schedules/table.py `ScheduleTable.listed`)."""
    return [ScheduleRow(id=s.id, user_name=s.user_name, user_id=s.user_id, words=s.words,
                        next_fire="paused" if s.paused else local_time(s.next_fire, tz), fires=s.fires,
                        skipped=s.skipped, last_result=s.last_result)
            for s in table.listed()]


def _read(what: str, read: Callable[[], Any], problems: list[str]) -> Any:
    """`read()`, or None with a line in `problems` (and the log) when it fails."""
    try:
        return read()
    except Exception as exc:
        log.exception("管理页读取 %s 失败", what)
        problems.append(f"{what}: not read ({type(exc).__name__})")
        return None


def book_usage(book: Any) -> UsageSource:
    """The usage provider of a usage book (usage/book.py `UsageBook.month`): the month's users, most tokens first,
    and its days in date order, as every host recorded them."""
    def read(month: str) -> tuple[list[UserUsage], list[DayUsage]]:
        users = [UserUsage(t.key, t.name, t.runs, t.input_tokens, t.output_tokens, t.cost_usd, t.cpu_seconds)
                 for t in book.month(month, "user")]
        days = [DayUsage(t.key, t.runs, t.input_tokens, t.output_tokens, t.cost_usd, t.cpu_seconds)
                for t in book.month(month, "day")]
        return users, days
    return read


def admin_view(sources: Any, now: float) -> AdminView:
    """Gather the page's data from the daemon's live objects (`StatusSources`) at wall-clock time `now`."""
    tz = sources.tz or "Asia/Shanghai"
    month = month_of(now)
    problems: list[str] = []
    secrets = (*sources.secrets, sources.token)
    tasks = _read("tasks", lambda: live_tasks(sources.manager.board, now, secrets), problems)
    warm = _read("warm processes", sources.client.warm_stats, problems)
    budget = getattr(getattr(sources.manager, "outbox", None), "budget", None)
    spend = None if budget is None else _read("API budget", lambda: budget_view(budget, month), problems)
    users = days = None
    if sources.usage is not None:  # usage is counted in SCHEDULE_TZ days and months (usage/book.py)
        usage_month = day_in(now, tz)[:7]
        usage = _read("usage", lambda: sources.usage(usage_month), problems)
        if usage is not None:
            users, days = tuple(usage[0]), tuple(usage[1])
    table = getattr(sources.schedules, "table", None)
    schedules = None if table is None else _read("schedules", lambda: schedule_rows(table, tz), problems)
    stamp = datetime.fromtimestamp(now, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M:%S %Z")
    return AdminView(host=sources.host, rendered_at=stamp, tz=tz, month=month, version=sources.version,
                     tasks=tuple(tasks or ()), warm=warm, budget=spend, users=users, days=days,
                     schedules=None if not schedules else tuple(schedules), problems=tuple(problems))


def status_label(status: str) -> str:
    """A task status for people: "running 执行中"."""
    return f"{status} {STATUS_LABELS.get(status, '')}".strip()

