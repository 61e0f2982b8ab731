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

The fence answers how long the send may go on: what is left of that lease, `margin` of it from when the statement
was sent. The outbox retries a send only within it (a push may otherwise retry for DELIVERY_RETRY_WINDOW, 600 s,
against a 30 s lease), then asks the fence again before it goes on: no send outlives the lease it started under.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import psycopg

from store.postgres import DB_NOW
from tasks.task import Task

log = logging.getLogger("cluster")


class DeliveryFence:
    """`fence(task)`: the seconds this host may go on sending its result (> 0), 0 if another host holds the task,
    None to try later."""

    def __init__(self, cluster: Any, *, margin: float = 0.8,  # cluster.Cluster
                 clock: Callable[[], float] | None = None) -> None:
        self.cluster = cluster
        self.margin = margin
        self.clock = clock or cluster.clock  # the clock the cluster records its leases with
        self.refused = 0  # results not sent here: their task is another host's

    def __call__(self, task: Task) -> float | None:
        cluster = self.cluster
        sent = self.clock()
        try:
            if cluster.execute(f"UPDATE tasks SET lease_until = {DB_NOW} + %s WHERE id = %s AND host = %s RETURNING id",
                               (cluster.lease, task.id, cluster.host)):
                cluster.leased({task.id}, sent)
                return self._left(sent) or None  # None: the statement itself took the whole lease
            rows = cluster.execute("SELECT host FROM tasks WHERE id = %s", (task.id,))
        except psycopg.Error as exc:
            left = self._left(cluster.leased_at(task.id))
            if left > 0:
                return left  # a lease that included the task, sent a moment ago, still holds: nobody can have taken it
            log.warning("任务 %s 的结果暂缓发送: 无法向任务数据库确认本主机仍持有该任务 (%s)", task.id,
                        " ".join(str(exc).split()))
            return None
        holder = rows[0][0] if rows else None
        if holder is None or holder == cluster.host:
            # Its row is not written yet (the journal; written, it is leased from then on) or has no host (a
            # migrated DB): nobody else holds it.
            return self._left(sent) or None
        self.refused += 1
        log.warning("任务 %s 已由主机 %s 接管，本主机不发送它的结果", task.id, holder)
        return 0

    def _left(self, sent: float) -> float:
        """What is left, now, of a lease whose statement was sent at `sent` (`margin` of it; 0: nothing)."""
        return max(0.0, sent + self.margin * self.cluster.lease - self.clock())
