"""The wiring of schedules, from the settings: the table on TASK_DB, the chat commands and the firing thread."""

from __future__ import annotations

import time
from collections.abc import Callable

from async_task_manager import AsyncTaskManager
from config import Config
from schedules.commands import Limits, ScheduleCommands
from schedules.firing import TICK, ScheduleFiring
from schedules.table import ScheduleTable


def schedule_parts(config: Config, manager: AsyncTaskManager, *, clock: Callable[[], float] = time.time,
                   tick: float = TICK) -> tuple[ScheduleCommands, ScheduleFiring]:
    """The schedule commands and the firing thread (not started) on the task DB the settings name."""
    table = ScheduleTable(config.task_db)
    limits = Limits(config.schedule_tz, config.schedule_min_interval, config.max_schedules_per_user)
    commands = ScheduleCommands(table, manager, limits, clock)
    firing = ScheduleFiring(table, manager, tz=config.schedule_tz, catch_up=config.schedule_catch_up, clock=clock,
                            allowed=lambda user: not config.allowed_users or user in config.allowed_users, tick=tick)
    return commands, firing
