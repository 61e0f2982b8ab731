"""The wiring of usage, from the settings: the book on TASK_DB fed by every run and every metered call made for a
task, the quotas in front of prompts and scheduled fires, and /usage."""

from __future__ import annotations

import time
from collections.abc import Callable

from async_task_manager import AsyncTaskManager
from config import Config
from usage.book import UsageBook
from usage.commands import UsageCommands
from usage.quotas import Limits, Quotas
from usage.table import UsageTable


def usage_parts(config: Config, manager: AsyncTaskManager, *, clock: Callable[[], float] = time.time,
                table: bool = True) -> tuple[UsageCommands, Quotas]:
    """/usage and the quotas, the book (started) recording every run of `manager` (`table`: in the task DB, else in
    this process only)."""
    book = UsageBook(UsageTable(config.task_db) if table else None, config.schedule_tz, clock=clock).start()
    quotas = Quotas(book, Limits(config.user_daily_tokens, config.user_daily_runs, config.user_monthly_cost_usd),
                    exempt=config.admin_users,
                    active=lambda user_id: manager.queued_count(user_id) + manager.board.running_count(user_id))
    manager.workers.on_run = book.record_run
    if manager.outbox.budget is not None:
        manager.outbox.budget.on_task_call = book.record_call
    return UsageCommands(quotas), quotas
