"""Fencing for several hosts: a host sends a task's result only while it still holds the task, so a host cut off from
the task DB for longer than its lease never answers a task that another host has taken over and answered.

Before each result goes out, `DeliveryFence` extends the task's lease in one statement that succeeds only while the
row still names this host (`UPDATE … WHERE id = … AND host = … RETURNING id`): from then on no other host may take
the task for another LEASE_SECONDS, so the result is sent once. A row naming another host means the task was taken
over: its result is not sent here (the taker answers). When the DB cannot be reached the task's lease is still ours
if the last statement that leased it to this host — the last renewal, when the renewal included it, or this fence's
own — was sent less than `margin` of a lease ago: nobody can have taken it. A renewal that left the task out proves
nothing (another host may hold it), and past the margin the result waits and is tried again until the DB answers,
rather than risk a second answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from store.postgres import DB_NOW
from tasks.task import Task

log = logging.getLogger("cluster")


class DeliveryFence:
    """`fence(task)`: True to send its result now, False if another host holds the task, None to try later."""

    def __init__(self, cluster: Any, *, margin: float = 0.8,  # cluster.Cluster
                 clock: Callable[[], float] | None = None) -> None:
        self.cluster = cluster
        self.margin = margin
        self.clock = clock or cluster.clock  # the clock the cluster records its leases with
        self.refused = 0  # results not sent here: their task is another host's

    def __call__(self, task: Task) -> bool | None:
        cluster = self.cluster
        sent = self.clock()
        try:
            if cluster.execute(f"UPDATE tasks SET lease_until = {DB_NOW} + %s WHERE id = %s AND host = %s RETURNING id",
                               (cluster.lease, task.id, cluster.host)):
                cluster.leased({task.id}, sent)
                return True
            rows = cluster.execute("SELECT host FROM tasks WHERE id = %s", (task.id,))
        except psycopg.Error as exc:
            if self.clock() - cluster.leased_at(task.id) < self.margin * cluster.lease:
                return True  # a lease that included the task, sent a moment ago, still holds: nobody can have taken it
            log.warning("任务 %s 的结果暂缓发送: 无法向任务数据库确认本主机仍持有该任务 (%s)", task.id,
                        " ".join(str(exc).split()))
            return None
        holder = rows[0][0] if rows else None
        if holder is None or holder == cluster.host:
            return True  # its row is not written yet (the journal), or has no host (a migrated DB): ours
        self.refused += 1
        log.warning("任务 %s 已由主机 %s 接管，本主机不发送它的结果", task.id, holder)
        return False
