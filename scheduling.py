"""The queue's one rule: a queued task may start when a worker is free, its user is under their limit and
its conversation has no task running.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from task import Task


@dataclass(frozen=True)
class Limits:
    """How many CLI runs may go at once, in all and for one user."""

    max_workers: int = 4
    max_tasks_per_user: int = 2


class Occupancy:
    """What the running tasks take up: workers, each user's runs, and busy conversations."""

    def __init__(self, running: Iterable[Task], limits: Limits) -> None:
        running = list(running)
        self.limits = limits
        self.workers = len(running)
        self.per_user = collections.Counter(t.user_id for t in running)
        self.conversations = {t.conversation_key for t in running}

    def admits(self, task: Task) -> bool:
        """True when `task` may start now."""
        return (self.workers < self.limits.max_workers
                and self.per_user[task.user_id] < self.limits.max_tasks_per_user
                and task.conversation_key not in self.conversations)


def next_runnable(queued: Iterable[Task], running: Iterable[Task], limits: Limits) -> Task | None:
    """The first of `queued` (in queue order) that may start now, or None."""
    occupancy = Occupancy(running, limits)
    if occupancy.workers >= limits.max_workers:
        return None
    return next((task for task in queued if occupancy.admits(task)), None)
