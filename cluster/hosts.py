"""Several bot processes on one DingTalk app sharing a PostgreSQL task DB: task leases, takeover of a dead host's
tasks, and cancels that reach the host running a task.

Every task row names the host holding it and a lease (`lease_until`, measured by the DB's clock, so the hosts'
clocks need not agree). A host renews the leases of all its unfinished or undelivered tasks every third of
LEASE_SECONDS in one statement. When a host stops renewing (SIGKILL, power, network), any other host takes its
tasks over once their leases have expired: one `UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED)` re-checks
the expiry under the row lock, so two hosts racing for a task never both get it. The taker handles them as its own
restart would (task_board/async_task_manager `recover`): re-run a running task once, deliver a result not yet
delivered, honour a cancel. A `/cancel` for a task another host holds sets `cancel_requested` and sends
`NOTIFY bot_cancel`; every host LISTENs and the one holding the task stops it and confirms to the user.

Why not a job library (Procrastinate): its workers own the task lifecycle and run async jobs; ours lives in
TaskBoard/Workers (acks, promotion to background, progress notes, delivery retries) and only the ownership of a
task must be shared. Two statements and a LISTEN do that without a second model of a task.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg

from cluster.fence import DeliveryFence
from cluster.questions import SharedQuestions
from common.logs import task_log
from config import PROJECT_DIR, Config
from store.journal import JournaledStore, open_store
from store.postgres import DB_NOW, SAVE_TASK, is_postgres_url, safe_url, task_to_row
from tasks import texts
from tasks.task import FINISHED_STATUSES, RUNNING, Task

log = logging.getLogger("cluster")

CANCEL_CHANNEL = "bot_cancel"
TASK_CHANNEL = "bot_task"  # a task handed to the host holding its conversation
_UNDONE = "delivered = 0 AND undeliverable = 0"  # a task a host still has to run or deliver
_RETRY = 1.0  # seconds between attempts while the DB cannot be reached


def host_name(configured: str, workdir: str = "") -> str:
    """HOST_NAME, else this machine's hostname and a digest of this installation (its checkout and its
    CODEBUDDY_WORKDIR): two processes of two installations on one machine are two hosts, and a restart of one
    installation is the same host again."""
    if configured:
        return configured
    where = f"{PROJECT_DIR}\0{os.path.abspath(workdir)}" if workdir else PROJECT_DIR
    return f"{socket.gethostname()}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def taken_elsewhere(conn: psycopg.Connection, task: Task, host: str) -> bool:
    """Whether another host holds the task's row now, or it has ended (the row locked until the admission's
    transaction ends): a host that took it over while this one stalled runs (and answers) it."""
    row = conn.execute("SELECT host, status FROM tasks WHERE id = %s FOR UPDATE", (task.id,)).fetchone()
    if row is None or (row[0] in (None, host) and row[1] not in FINISHED_STATUSES):
        return False  # not written yet (the journal), unowned (a migrated DB) or this host's
    task_log(log, task).warning("任务 %s 已由主机 %s 接管 (%s)，本主机不再执行", task.id, row[0], row[1])
    return True


def this_host(config: Config) -> str:
    """This process's name among the hosts (`host_name` of its settings)."""
    return host_name(config.host_name, config.codebuddy_workdir)


class Cluster:
    """This host's membership: its leases, taking over expired ones, and cross-host cancels.

    `on_takeover(ids)` gets the tasks this host took from a dead one; `on_cancel(id)` a task id some host was asked
    to cancel (ignore it unless this host holds the task). Both run on the cluster's threads.
    """

    def __init__(self, url: str, host: str, *, lease_seconds: float, on_takeover: Callable[[set[str]], None],
                 on_cancel: Callable[[str], None], on_task: Callable[[str], None] = lambda task_id: None,
                 connect_timeout: float = 5.0) -> None:
        self.url, self.host, self.lease = url, host, lease_seconds
        self.on_takeover = on_takeover
        self._listeners: dict[str, Callable[[str], None]] = {CANCEL_CHANNEL: on_cancel, TASK_CHANNEL: on_task}
        self._connect_timeout = max(1, int(connect_timeout))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards the statement connection
        self._conn: psycopg.Connection | None = None
        self._admit_off_until = 0.0  # monotonic: admission skips the DB until then (it was unreachable)
        self.claim_pending = False  # the start's claim failed: the lease thread retries it
        self.renewed_at = float("-inf")  # monotonic: when the last successful renewal was sent
        self.listening = threading.Event()  # set once every LISTEN is sent, cleared while the listener reconnects

    # -- statements

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout)
        return self._conn

    def _drop_connection(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._conn = None

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Have `handler(payload)` called (on the listener thread) for each NOTIFY on `channel`; before `start`."""
        self._listeners[channel] = handler

    def execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        """One statement on this host's connection: its rows ([] for none); psycopg.Error when the DB fails."""
        try:
            with self._lock:
                cursor = self._connection().execute(sql, args)
                return cursor.fetchall() if cursor.description else []
        except psycopg.Error:
            self._drop_connection()
            raise

    def claim_at_start(self) -> set[str]:
        """The undone tasks this host restarts with: its own, unowned ones (a migrated DB) and expired ones."""
        self.renew()
        rows = self.execute(f"UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s WHERE {_UNDONE} AND "
                             f"(host = %s OR host IS NULL OR lease_until < {DB_NOW}) RETURNING id",
                             (self.host, self.lease, self.host))
        return {row[0] for row in rows}

    def renew(self) -> int:
        """Mark this host alive and extend the leases of every undone task it holds; how many."""
        sent = time.monotonic()  # the leases run from the DB's now, which is later: `renewed_at` errs on the safe side
        self.execute(f"INSERT INTO hosts VALUES (%s, {DB_NOW} + %s) ON CONFLICT (host) DO UPDATE SET "
                     "alive_until = excluded.alive_until", (self.host, self.lease))
        renewed = self.execute(f"UPDATE tasks SET lease_until = {DB_NOW} + %s WHERE host = %s AND {_UNDONE} "
                               "RETURNING id", (self.lease, self.host))
        self.renewed_at = sent
        return len(renewed)

    def take_over(self) -> dict[str, str]:
        """Take the undone tasks whose lease expired (their host is gone): {task id: the host it had}."""
        rows = self.execute(
            f"WITH expired AS (SELECT id, host FROM tasks WHERE host <> %s AND lease_until < {DB_NOW} AND {_UNDONE} "
            f"FOR UPDATE SKIP LOCKED) UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s FROM expired "
            "WHERE tasks.id = expired.id RETURNING tasks.id, expired.host", (self.host, self.host, self.lease))
        return {row[0]: row[1] for row in rows}

    def request_cancel(self, task_id: str) -> str | None:
        """Ask whichever host holds an active task to cancel it: the host's name, None if the task is not active,
        "" if the DB cannot be reached."""
        try:
            rows = self.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = %s AND status IN ('queued', "
                                 "'running') RETURNING host", (task_id,))
            if rows:
                self.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, task_id))
        except psycopg.Error as exc:
            log.error("任务 %s 取消请求失败 (%s)", task_id, " ".join(str(exc).split()))
            return ""
        return (rows[0][0] or "?") if rows else None

    def admit(self, task: Task, running_here: list[Task], max_per_user: int) -> bool | None:
        """Whether `task` may start here, counting the other hosts' runs too: its user below `max_per_user` runs in
        all and its conversation running nowhere. If so the row says running on this host before the lock is let
        go (one transaction under an advisory lock per user and per conversation, always taken in that order).
        None: another host took the task over while it waited here (this host's lease lapsed), or it has ended.
        While the DB is unreachable every task is admitted (limits per host) and it is tried again 5 s later."""
        if time.monotonic() < self._admit_off_until:
            return True
        mine = sum(1 for t in running_here if t.user_id == task.user_id)
        # The row says what the run will (attempts + 1): a host killed before the board's own write still counts it.
        row = {**task_to_row(replace(task, status=RUNNING, attempts=task.attempts + 1)), "_host": self.host,
               "_lease": self.lease}
        try:
            with self._lock:
                conn = self._connection()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s)), pg_advisory_xact_lock(hashtext(%s))",
                                 ("user:" + task.user_id, "conversation:" + task.conversation_key))
                    if taken_elsewhere(conn, task, self.host):  # never take it back: both would run and answer it
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
        except psycopg.Error as exc:
            self._drop_connection()
            log.error("集群限额检查失败，暂按本机限额执行 (%s)", " ".join(str(exc).split()))
            self._admit_off_until = time.monotonic() + 5.0
            return True

    def host_of(self, task_id: str) -> str | None:
        """The host holding a task (for /status); None if unknown or the DB cannot say."""
        try:
            rows = self.execute("SELECT host FROM tasks WHERE id = %s", (task_id,))
        except psycopg.Error as exc:
            log.warning("查询任务所在主机失败 %s (%s)", task_id, " ".join(str(exc).split()))
            return None
        return rows[0][0] if rows else None

    def queued_count(self, user_id: str) -> int | None:
        """How many of the user's tasks wait on any live host (MAX_QUEUED_PER_USER); None if the DB cannot say."""
        try:
            rows = self.execute(f"SELECT count(*) FROM tasks WHERE user_id = %s AND status = 'queued' AND "
                                 f"lease_until > {DB_NOW}", (user_id,))
        except psycopg.Error as exc:
            log.warning("查询排队任务数失败 user=%s (%s)", user_id, " ".join(str(exc).split()))
            return None
        return int(rows[0][0])

    # -- threads

    def start(self) -> None:
        """Start renewing leases, taking over expired ones and listening for cancels."""
        for name, target in (("cluster-lease", self._lease_loop), ("cluster-listen", self._listen_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("集群成员已加入: host=%s lease=%.0fs", self.host, self.lease)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads (the leases then expire and other hosts take what is left)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def _lease_loop(self) -> None:
        failing = ""
        while not self._stop.wait(self.lease / 3):
            try:
                if self.claim_pending:  # the start could not claim this host's own tasks: now
                    taken = dict.fromkeys(self.claim_at_start(), self.host)
                    self.claim_pending = False
                else:
                    self.renew()
                    taken = self.take_over()
                if failing:
                    log.warning("集群数据库已恢复，租约续期继续")
                    failing = ""
            except psycopg.Error as exc:
                why = " ".join(str(exc).split())
                if why != failing:  # one line per outage, not per try
                    log.error("集群租约续期失败 (%s)", why)
                failing = why
                continue
            if taken:
                for task_id, old in taken.items():
                    log.warning("接管任务 %s: 主机 %s 的租约已过期", task_id, old)
                # On its own thread: handling them (re-queueing, deliveries) must not hold up the next renewal.
                threading.Thread(target=self._take, args=(set(taken),), name="cluster-takeover", daemon=True).start()

    def _take(self, task_ids: set[str]) -> None:
        try:
            self.on_takeover(task_ids)
        except Exception:
            log.exception("接管任务失败: %s", ", ".join(sorted(task_ids)))

    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout) as conn:
                    _listen_to(conn, list(self._listeners))
                    self.listening.set()
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=0.5):
                            self._notified(notify.channel, notify.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                log.error("集群取消通知连接中断 (%s)，稍后重连", " ".join(str(exc).split()))
                self._stop.wait(_RETRY)

    def _notified(self, channel: str, payload: str) -> None:
        try:
            self._listeners[channel](payload)
        except Exception:
            shown = payload if len(payload) <= 32 else f"{len(payload)} 字节"  # a task id, never an answer's text
            log.exception("处理集群通知失败 (%s): %s", channel, shown)

    def place(self, manager: Any, task: Task, expected: str) -> bool:
        """Conversation affinity for a new task: see `place_task`."""
        return place_task(self, manager, task, expected)

    def queued(self, board: Any, user_id: str) -> int:
        """MAX_QUEUED_PER_USER's count: the user's queued tasks on every host, or this host's if the DB cannot say."""
        here = board.queued_count(user_id)
        everywhere = self.queued_count(user_id)
        return here if everywhere is None else max(here, everywhere)


def _listen_to(conn: psycopg.Connection, channels: list[str]) -> None:
    """LISTEN on every channel, then say so (once per connection: a reconnect logs it again)."""
    for channel in channels:
        conn.execute(f"LISTEN {channel}")
    log.info("集群通知已监听 (channels: %s)", ", ".join(channels))


def conversation_host(cluster: Cluster, conversation_key: str) -> tuple[str | None, bool]:
    """The host that ran the conversation last (it holds its workspace) and whether it is alive;
    (None, False) for a new conversation or when the DB cannot say."""
    try:
        rows = cluster.execute(f"SELECT c.host, coalesce(h.alive_until > {DB_NOW}, false) FROM conversation_hosts c "
                               "LEFT JOIN hosts h ON h.host = c.host WHERE c.conversation_key = %s",
                               (conversation_key,))
    except psycopg.Error as exc:
        log.warning("查询会话所在主机失败 (%s)", " ".join(str(exc).split()))
        return None, False
    return (rows[0][0], bool(rows[0][1])) if rows else (None, False)


def hand_off(cluster: Cluster, task_id: str, host: str) -> bool:
    """Give a queued task (its row written) of this host to `host` and wake it; False if it did not move."""
    try:
        moved = cluster.execute(f"UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s WHERE id = %s AND "
                                "host = %s AND status = 'queued' RETURNING id",
                                (host, cluster.lease, task_id, cluster.host))
        if moved:
            cluster.execute("SELECT pg_notify(%s, %s)", (TASK_CHANNEL, task_id))
    except psycopg.Error as exc:
        log.warning("任务 %s 交给主机 %s 失败 (%s)", task_id, host, " ".join(str(exc).split()))
        return False
    return bool(moved)


def place_task(cluster: Cluster, manager: Any, task: Task, expected: str) -> bool:
    """Issue 16, conversation affinity: send a new task to the live host holding its conversation (acknowledged
    here first; True: it is that host's now). A conversation whose host is gone stays here, and its user is
    told that files from earlier turns are not on this host."""
    owner, alive = conversation_host(cluster, task.conversation_key)
    if owner is None or owner == cluster.host:
        return False
    if not alive:
        manager.outbox.notice(task.route, texts.conversation_moved(task, owner), task_id=task.id)
        return False
    if not manager.store.wait_written(2.0):  # the row must exist before another host reads it
        return False
    with manager.board.lock:
        manager.board.tasks.pop(task.id, None)
        manager.outbox.acknowledge(task, texts.acknowledgement(task, "", expected))
    if hand_off(cluster, task.id, owner):
        log.info("任务 %s 交给会话所在主机 %s", task.id, owner)
        return True
    with manager.board.lock:  # it stays here after all
        manager.board.adopt(task)
        manager.board.enqueue(task)
    return True


def _cancel_if_here(manager: Any, task_id: str) -> None:
    """A cancel sent to every host: the one holding the task stops it and tells the user when it has ended."""
    if task_id not in manager.board.tasks:
        return

    def confirm(task: Any, stopped: bool) -> None:
        manager.outbox.notice(task.route, texts.cancel_outcome(task, stopped), task_id=task.id,
                              allow_webhook=False)

    manager.cancel(task_id, on_ended=confirm)


def _run_handed_task(manager: Any, cluster: Cluster, task_id: str) -> None:
    """A task another host handed to this one (its conversation lives here): queue it here."""
    if task_id in manager.board.tasks or cluster.host_of(task_id) != cluster.host:
        return
    task = manager.store.get(task_id)
    if task is None or task.finished:
        return
    with manager.board.lock:
        manager.board.adopt(task)
        manager.board.enqueue(task)
    log.info("接收任务 %s: 会话 %s 在本主机", task_id, task.conversation_key)


def _admit(cluster: Cluster, board: Any, task: Task, running: list[Task], max_per_user: int) -> bool:
    """The board's admission (it holds its lock): a task another host took over leaves this host's board."""
    admitted = cluster.admit(task, running, max_per_user)
    if admitted is None:
        board.tasks.pop(task.id, None)
        if task.id in board.queue:
            board.queue.remove(task.id)
    return bool(admitted)


def open_task_store(config: Config) -> JournaledStore:
    """The daemon's store (TASK_DB); on PostgreSQL the tasks it creates are leased to this host."""
    return open_store(config.task_db, host=this_host(config), lease_seconds=config.lease_seconds)


def join_cluster(config: Config, manager: Any) -> Cluster | None:
    """Recover the tasks this host restarts with and, with a PostgreSQL TASK_DB, join the hosts sharing it.

    With SQLite: `manager.recover()` (one host). With PostgreSQL: recover only the tasks this host holds, unowned
    or expired ones, then renew leases, take over dead hosts' tasks and answer cross-host cancels.
    """
    if not is_postgres_url(config.task_db):
        manager.recover()
        return None
    cluster = Cluster(config.task_db, this_host(config), lease_seconds=config.lease_seconds,
                      on_takeover=lambda ids: manager.recover(only=ids),
                      on_cancel=lambda task_id: _cancel_if_here(manager, task_id),
                      on_task=lambda task_id: _run_handed_task(manager, cluster, task_id))
    try:
        manager.recover(only=cluster.claim_at_start())
    except psycopg.Error as exc:  # the lease thread claims them once the DB answers
        log.error("集群数据库不可用 (%s): %s", " ".join(str(exc).split()), safe_url(config.task_db))
        cluster.claim_pending = True
    manager.cluster = cluster
    SharedQuestions(cluster, manager.workers.approvals).join()  # an answer may reach a host that did not ask
    manager.outbox.fence = DeliveryFence(cluster)  # a result goes out only while this host holds its task
    limit = manager.board.limits.max_tasks_per_user
    manager.board.admit = lambda task, running: _admit(cluster, manager.board, task, running, limit)
    cluster.start()
    return cluster
