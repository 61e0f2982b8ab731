"""Admission across hosts: may a queued task start on this host, given the runs of the others (MAX_TASKS_PER_USER
and one run per conversation count every host's)?

One transaction under an advisory lock per user and then per conversation (always that order: no deadlock) counts the
`running` rows other hosts hold with a live lease and, if there is room, writes the task's row as running on this host
before the locks go. A row another host took over (or that has ended) is never taken back: the task leaves this
host. The board asks without its own lock (tasks/board.py), so a slow or unreachable DB holds up only the worker
asking; its time limits bound the wait (store/pg_connect.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import psycopg

from cluster.statements import DOWN_FOR, Statements
from store.postgres import DB_NOW, SAVE_TASK, task_to_row
from tasks.task import FINISHED_STATUSES, RUNNING, Task

log = logging.getLogger("cluster")


class Admission:
    """`admission(task, running_here, max_per_user)`: True to start it here, False to ask again later, None when the
    task is not this host's to run any more."""

    def __init__(self, statements: Statements, host: str, lease: float) -> None:
        self.statements, self.host, self.lease = statements, host, lease
        self._off_until = 0.0  # monotonic: admission skips the DB until then (it failed on a statement)

    def __call__(self, task: Task, running_here: list[Task], max_per_user: int) -> bool | None:
        """While the DB is unreachable every task is admitted (limits per host) and it is asked again 5 s later; a
        lock or a statement the DB timed out refuses it for now (asked again at the board's next poll)."""
        if self.statements.down or time.monotonic() < self._off_until:
            return True
        mine = sum(1 for t in running_here if t.user_id == task.user_id)
        # The row says what the run will say once it starts (the board then writes it again): a host killed
        # before that second write still leaves a run counted, so a task crashing twice is failed, not re-run forever.
        row = {**task_to_row(replace(task, status=RUNNING, attempts=task.attempts + 1)), "_host": self.host,
               "_lease": self.lease}
        try:
            return self._in_db(task, row, mine, max_per_user)
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
            # The DB answers but another session holds the user's or conversation's lock (or the statement ran
            # too long): admitting here could break the limits across hosts, so the task waits for the next poll.
            log.warning("集群限额检查超时，任务 %s 稍后再试 (%s)", task.id, " ".join(str(exc).split()))
            return False
        except psycopg.Error as exc:
            log.error("集群限额检查失败，暂按本机限额执行 (%s)", " ".join(str(exc).split()))
            self._off_until = time.monotonic() + DOWN_FOR
            return True

    def _in_db(self, task: Task, row: dict, mine: int, max_per_user: int) -> bool | None:
        with self.statements.transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s)), pg_advisory_xact_lock(hashtext(%s))",
                         ("user:" + task.user_id, "conversation:" + task.conversation_key))
            owner = conn.execute("SELECT host, status FROM tasks WHERE id = %s FOR UPDATE",
                                 (task.id,)).fetchone()
            # A host that took this task over while this one stalled runs (and answers) it: never twice.
            if owner is not None and (owner[0] not in (None, self.host) or owner[1] in FINISHED_STATUSES):
                log.warning("任务 %s 已由主机 %s 接管 (%s)，本机不再运行", task.id, owner[0], owner[1])
                return None
            users, conversations = conn.execute(
                "SELECT count(*) FILTER (WHERE user_id = %s), count(*) FILTER (WHERE conversation_key = %s) "
                f"FROM tasks WHERE status = 'running' AND host <> %s AND lease_until > {DB_NOW} AND id <> %s",
                (task.user_id, task.conversation_key, self.host, task.id)).fetchone()
            if conversations or mine + users >= max_per_user:
                return False
            conn.execute(SAVE_TASK, row)
            conn.execute(f"UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s WHERE id = %s",
                         (self.host, self.lease, task.id))
            conn.execute(f"INSERT INTO conversation_hosts VALUES (%s, %s, {DB_NOW}) ON CONFLICT "
                         "(conversation_key) DO UPDATE SET host = excluded.host, since = excluded.since",
                         (task.conversation_key, self.host))
        return True
