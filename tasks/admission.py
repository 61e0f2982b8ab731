"""The queue's one rule: a queued task may start when a worker is free, its user is under their limit and
its conversation has no task running (a chat's messages run one at a time, in order) — and which of them holds
a waiting task back.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from tasks.task import Task

# Why a queued task waits (`Occupancy.holdback`): told to the user in the acknowledgement and by /status.
HELD_BY_CONVERSATION, HELD_BY_USER, HELD_BY_WORKERS = "conversation", "user", "workers"


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
        return not self.holdback(task)

    def holdback(self, task: Task, ahead: Iterable[Task] = ()) -> str:
        """What keeps `task` from starting now, "" when nothing does: its conversation (a run of it going, or an
        earlier message of it waiting in `ahead`), its user's limit, or the workers (all busy, or taken by the
        tasks `ahead` that may start first)."""
        ahead = list(ahead)
        if task.conversation_key in self.conversations or any(t.conversation_key == task.conversation_key
                                                                for t in ahead):
            return HELD_BY_CONVERSATION
        mine_first = sum(1 for t in ahead if t.user_id == task.user_id and self.admits(t))  # they start first
        if self.per_user[task.user_id] + mine_first >= self.limits.max_tasks_per_user:
            return HELD_BY_USER
        if self.workers + sum(1 for t in ahead if self.admits(t)) >= self.limits.max_workers:
            return HELD_BY_WORKERS
        return ""


def next_runnable(queued: Iterable[Task], running: Iterable[Task], limits: Limits) -> Task | None:
    """The first of `queued` (in queue order) that may start now, or None."""
    occupancy = Occupancy(running, limits)
    if occupancy.workers >= limits.max_workers:
        return None
    return next((task for task in queued if occupancy.admits(task)), None)
