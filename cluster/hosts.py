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
from typing import Any

import psycopg

from cluster.admission import Admission
from cluster.fence import DeliveryFence
from cluster.inbox import RECONCILE_SECONDS, Inbox, cancel_payload, cancel_told
from cluster.placement import TASK_CHANNEL, place_task
from cluster.questions import SharedQuestions
from cluster.statements import Statements, warn_unless_known
from common.supervision import Supervisor
from config import DB_CONNECT_TIMEOUT, DB_LOCK_TIMEOUT, PROJECT_DIR, Config
from dingtalk.route import Route
from store.journal import JournaledStore, open_store
from store.pg_connect import DEFAULT_STATEMENT_TIMEOUT, connect
from store.postgres import DB_NOW, is_postgres_url, safe_url
from tasks.task import Task

log = logging.getLogger("cluster")

CANCEL_CHANNEL = "bot_cancel"
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


def this_host(config: Config) -> str:
    """This process's name among the hosts (`host_name` of its settings)."""
    return host_name(config.host_name, config.codebuddy_workdir)


class Cluster:
    """This host's membership: its leases, taking over expired ones, and cross-host cancels.

    `on_takeover(ids)` gets the tasks this host took from a dead one; `on_cancel(id, reply_to)` a task id some host was
    asked to cancel (ignore it unless this host holds the task) and the route of the command to confirm to (None: the
    task's own); `on_task(id)` a task handed to this host. They run on the cluster's threads.
    """

    def __init__(self, url: str, host: str, *, lease_seconds: float, on_takeover: Callable[[set[str]], None],
                 on_cancel: Callable[[str, Route | None], None], on_task: Callable[[str], None] = lambda task_id: None,
                 connect_timeout: float = DB_CONNECT_TIMEOUT, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic, supervisor: Supervisor | None = None) -> None:
        self.url, self.host, self.lease, self.clock = url, host, lease_seconds, clock
        self.supervisor = supervisor or Supervisor()  # the bot's: a thread that dies is logged and restarted
        self.on_takeover = on_takeover
        self._listeners: dict[str, Callable[[str], None]] = {
            CANCEL_CHANNEL: lambda payload: on_cancel(*cancel_told(payload)), TASK_CHANNEL: on_task}
        # Every connection of the cluster (statements, LISTEN) with the bot's time limits (store/pg_connect.py).
        self._limits = {"connect_timeout": connect_timeout, "statement_timeout": statement_timeout,
                        "lock_timeout": DB_LOCK_TIMEOUT}
        self.statements = Statements(url, self._limits)
        self.admission = Admission(self.statements, host, lease_seconds)
        self._stop = threading.Event()
        self.listening = threading.Event()  # set once every LISTEN is sent, cleared while the listener reconnects
        self._threads: list[threading.Thread] = []
        self._jobs: list[tuple[str, float, Callable[[], None]]] = []  # periodic work started with the threads
        self._queued_elsewhere: dict[str, int] = {}  # user → queued tasks on the other live hosts (lease thread)
        self.claim_pending = False  # the start's claim failed: the lease thread retries it
        self.inbox: Inbox | None = None  # what the other hosts send this one (join_cluster sets it)
        self._leased: dict[str, float] = {}  # task id → when the statement that last leased it to this host was sent
        self._leased_lock = threading.Lock()
        # The tasks the lease thread took over (or claimed) until they are on the board: a look at the rows
        # (`reconcile`) must not queue them a second time (cluster/inbox.py, under `takeover_lock`).
        self.taking: set[str] = set()
        self.takeover_lock = threading.Lock()

    # -- statements

    @property
    def db_down(self) -> bool:
        """Whether a statement failed for want of the DB within the last few seconds (none has succeeded since)."""
        return self.statements.down

    def execute(self, sql: str, args: tuple = (), *, quick: bool = False) -> list[tuple]:
        """One statement on this host's connection: its rows ([] for none); psycopg.Error when the DB fails.
        `quick`: the caller answers from memory without it (the intake's, placement's): see cluster/statements.py."""
        return self.statements.execute(sql, args, quick=quick)

    def later(self, job: Callable[[], object]) -> None:
        """Run `job` on the offload thread, after what was handed over before it (errors are logged)."""
        self.statements.later(job)

    def every(self, seconds: float, job: Callable[[], None], name: str) -> None:
        """Run `job` every `seconds` on a thread of its own from `start` on, until `stop`; before `start`."""
        self._jobs.append((name, seconds, job))

    def listen(self, channel: str, handler: Callable[[str], None]) -> None:
        """Have `handler(payload)` called (on the listener thread) for each NOTIFY on `channel`; before `start`."""
        self._listeners[channel] = handler

    def claim_at_start(self) -> set[str]:
        """The undone tasks this host restarts with: its own, unowned ones (a migrated DB) and expired ones."""
        self.renew()
        sent = self.clock()
        rows = self.execute(f"UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s WHERE {_UNDONE} AND "
                             f"(host = %s OR host IS NULL OR lease_until < {DB_NOW}) RETURNING id",
                             (self.host, self.lease, self.host))
        self.leased({row[0] for row in rows}, sent)
        return {row[0] for row in rows}

    def renew(self) -> int:
        """Mark this host alive and extend the leases of every undone task it holds; how many."""
        sent = self.clock()  # the leases run from the DB's now, which is later: `sent` errs on the safe side
        self.execute(f"INSERT INTO hosts VALUES (%s, {DB_NOW} + %s) ON CONFLICT (host) DO UPDATE SET "
                     "alive_until = excluded.alive_until", (self.host, self.lease))
        renewed = self.execute(f"UPDATE tasks SET lease_until = {DB_NOW} + %s WHERE host = %s AND {_UNDONE} "
                               "RETURNING id", (self.lease, self.host))
        with self._leased_lock:  # a task this renewal left out is not this host's any more (or not written yet)
            self._leased = dict.fromkeys((row[0] for row in renewed), sent)
        return len(renewed)

    def leased(self, task_ids: set[str], sent: float) -> None:
        """Record that a statement sent at `sent` (`clock`) leased these tasks to this host (it returned them)."""
        with self._leased_lock:
            self._leased.update(dict.fromkeys(task_ids, sent))

    def leased_at(self, task_id: str) -> float:
        """When the statement that last leased `task_id` to this host was sent (`clock`); -inf if none since the
        last renewal, which left it out: another host may hold it."""
        with self._leased_lock:
            return self._leased.get(task_id, float("-inf"))

    def take_over(self) -> dict[str, str]:
        """Take the undone tasks whose lease expired (their host is gone): {task id: the host it had}."""
        sent = self.clock()
        rows = self.execute(
            f"WITH expired AS (SELECT id, host FROM tasks WHERE host <> %s AND lease_until < {DB_NOW} AND {_UNDONE} "
            f"FOR UPDATE SKIP LOCKED) UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s FROM expired "
            "WHERE tasks.id = expired.id RETURNING tasks.id, expired.host", (self.host, self.host, self.lease))
        self.leased({row[0] for row in rows}, sent)
        return {row[0]: row[1] for row in rows}

    def request_cancel(self, task_id: str, reply_to: Route | None = None) -> str | None:
        """Ask whichever host holds an active task to cancel it, and to confirm to `reply_to` (the command message's
        route: its session webhook is free, and any host may post to it): the host's name, None if the task is not
        active, "" if the DB cannot be reached."""
        try:
            rows = self.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = %s AND status IN ('queued', "
                                 "'running') RETURNING host", (task_id,), quick=True)
            if rows:
                self.execute("SELECT pg_notify(%s, %s)", (CANCEL_CHANNEL, cancel_payload(task_id, reply_to)),
                             quick=True)
        except psycopg.Error as exc:
            log.error("任务 %s 取消请求失败 (%s)", task_id, " ".join(str(exc).split()))
            return ""
        return (rows[0][0] or "?") if rows else None

    def admit(self, task: Task, running_here: list[Task], max_per_user: int) -> bool | None:
        """Whether `task` may start here given the other hosts' runs (cluster/admission.py); None: it is not this
        host's to run any more. Called without the board's lock: it may wait for the DB up to its time limits."""
        return self.admission(task, running_here, max_per_user)

    def host_of(self, task_id: str, *, quick: bool = True) -> str | None:
        """The host holding a task (for /status: `quick`); None if unknown or the DB cannot say."""
        try:
            rows = self.execute("SELECT host FROM tasks WHERE id = %s", (task_id,), quick=quick)
        except psycopg.Error as exc:
            warn_unless_known(exc, f"查询任务所在主机失败 {task_id} (%s)")
            return None
        return rows[0][0] if rows else None

    def refresh_queued(self) -> None:
        """Count the queued tasks of each user on the other live hosts, for `queued` (on the lease thread)."""
        rows = self.execute(f"SELECT user_id, count(*) FROM tasks WHERE status = 'queued' AND host <> %s AND "
                            f"lease_until > {DB_NOW} GROUP BY user_id", (self.host,))
        self._queued_elsewhere = {user: int(count) for user, count in rows}

    # -- threads

    def start(self) -> None:
        """Start renewing leases, taking over expired ones, listening for cancels, and the periodic jobs, each on a
        supervised thread (common/supervision.py: an unexpected exception is logged and the loop started again)."""
        threads = [("cluster-lease", self._lease_loop), ("cluster-listen", self._listen_loop)]
        threads += [(name, lambda seconds=seconds, job=job: self._repeat(seconds, job))
                    for name, seconds, job in self._jobs]
        self._threads += [self.supervisor.start(name, target) for name, target in threads]
        log.info("集群成员已加入: host=%s lease=%.0fs", self.host, self.lease)

    def _repeat(self, seconds: float, job: Callable[[], None]) -> None:
        while not self._stop.wait(seconds):
            try:
                job()
            except psycopg.Error:
                pass  # the DB is down: the lease thread says so, once per outage
            except Exception:
                log.exception("集群定时任务失败")

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads (the leases then expire and other hosts take what is left)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        self.statements.close()

    def _lease_loop(self) -> None:
        failing = ""
        while not self._stop.wait(self.lease / 3):
            try:
                claiming = self.claim_pending  # the start could not claim this host's own tasks: now
                if not claiming:
                    self.renew()
                with self.takeover_lock:
                    taken = dict.fromkeys(self.claim_at_start(), self.host) if claiming else self.take_over()
                    self.taking |= set(taken)
                self.claim_pending = False
                if not claiming:
                    self.refresh_queued()
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
        finally:
            with self.takeover_lock:
                self.taking -= task_ids

    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.url, **self._limits) as conn:
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
        """Take a new task from the intake (always True: it is placed on the offload thread, see `place_task`)."""
        self.later(lambda: place_task(self, manager, task, expected))
        return True

    def queued(self, board: Any, user_id: str) -> int:
        """MAX_QUEUED_PER_USER's count, from memory (the intake never waits on the DB): the user's queued tasks here
        plus those on the other hosts at the lease thread's last look (every LEASE_SECONDS/3)."""
        return board.queued_count(user_id) + self._queued_elsewhere.get(user_id, 0)



def _listen_to(conn: psycopg.Connection, channels: list[str]) -> None:
    """LISTEN on every channel, then say so (once per connection: a reconnect logs it again)."""
    for channel in channels:
        conn.execute(f"LISTEN {channel}")
    log.info("集群通知已监听 (channels: %s)", ", ".join(channels))


def _shown_approval(manager: Any, track: str) -> tuple[str | None, str]:
    """(its task, the request whose buttons it shows) of this host's card `track`; (None, "") if not its card."""
    cards = manager.outbox.cards
    return cards.shown_approval(track) if cards is not None else (None, "")


def open_task_store(config: Config) -> JournaledStore:
    """The daemon's store (TASK_DB); on PostgreSQL the tasks it creates are leased to this host."""
    return open_store(config.task_db, host=this_host(config), lease_seconds=config.lease_seconds,
                      statement_timeout=config.db_statement_timeout)


def join_cluster(config: Config, manager: Any, *, reconcile_seconds: float = RECONCILE_SECONDS) -> Cluster | None:
    """Recover the tasks this host restarts with and, with a PostgreSQL TASK_DB, join the hosts sharing it.

    With SQLite: `manager.recover()` (one host). With PostgreSQL: recover only the tasks this host holds, unowned
    or expired ones, then renew leases, take over dead hosts' tasks and answer cross-host cancels.
    """
    if not is_postgres_url(config.task_db):
        manager.recover()
        return None
    cluster = Cluster(config.task_db, this_host(config), lease_seconds=config.lease_seconds,
                      statement_timeout=config.db_statement_timeout, on_takeover=lambda ids: manager.recover(only=ids),
                      on_cancel=lambda task_id, reply_to: inbox.cancel(task_id, reply_to),
                      on_task=lambda task_id: inbox.handed(task_id), supervisor=manager.supervisor)
    inbox = cluster.inbox = Inbox(cluster, manager, reconcile_seconds=reconcile_seconds)  # hand-offs, cancels
    try:
        manager.recover(only=cluster.claim_at_start())
    except psycopg.Error as exc:  # the lease thread claims them once the DB answers
        log.error("集群数据库不可用 (%s): %s", " ".join(str(exc).split()), safe_url(config.task_db))
        cluster.claim_pending = True
    manager.cluster = cluster
    SharedQuestions(cluster, manager.workers.approvals, admins=config.admin_users,  # an answer may reach another host
                    shown=lambda track: _shown_approval(manager, track)).join()
    manager.outbox.fence = DeliveryFence(cluster)  # a result goes out only while this host holds its task
    limit = manager.board.limits.max_tasks_per_user
    manager.board.admit = lambda task, running: cluster.admit(task, running, limit)
    cluster.start()
    return cluster
