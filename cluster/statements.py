"""This host's statement connections to the shared task DB, with the bot's time limits: one for the cluster's own
statements (leases, fence, questions, admission), one for the calls that can do without the DB (the intake's and
placement's: they never queue behind a transaction), and an offload thread for work the intake hands over so that
it never waits on the network.

A statement that fails for want of the DB (no answer within the time limits, a broken connection) marks the DB down
for `DOWN_FOR` s: calls made with `quick=True` are then not sent at all and their callers answer from memory; the
lease thread's statements keep trying and the first that succeeds ends it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from store.pg_connect import connect

log = logging.getLogger("cluster")

DOWN_FOR = 5.0  # seconds quick calls skip the DB after it did not answer (the lease thread probes meanwhile)
QUICK_WAIT = 1.0  # seconds a quick call waits for the connection while another thread's statement runs


class DBUnavailable(psycopg.OperationalError):
    """A call that can do without the DB was not sent: it failed a moment ago, or its connection is busy."""


def lost_the_db(exc: psycopg.Error) -> bool:
    """Whether `exc` says the DB cannot be reached (no answer, a broken connection), not that it refused a statement."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(exc, psycopg.OperationalError) and (state is None or state.startswith("08"))


def warn_unless_known(exc: psycopg.Error, line: str) -> None:
    """Log a failed statement; not one that was never sent because the DB is known down (said once, elsewhere)."""
    if not isinstance(exc, DBUnavailable):
        log.warning(line, " ".join(str(exc).split()))


class _Connection:
    """One connection, opened on first use and again after a failure, and the lock that guards it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: psycopg.Connection | None = None


class Statements:
    """The statement connections (`limits`: `pg_connect.connection_options`'), one statement or transaction at a
    time on each; and the offload thread."""

    def __init__(self, url: str, limits: dict[str, Any]) -> None:
        self.url, self.limits = url, limits
        self._main, self._quick = _Connection(), _Connection()
        self._down_until = 0.0  # monotonic: quick calls skip the DB until then
        # Work handed off by the intake (placing a new task, relaying an answer): one thread, in order.
        self._offload = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cluster-offload")

    @property
    def down(self) -> bool:
        """Whether a statement failed for want of the DB within the last few seconds (none has succeeded since)."""
        return time.monotonic() < self._down_until

    def execute(self, sql: str, args: tuple | dict = (), *, quick: bool = False) -> list[tuple]:
        """One statement: its rows ([] for none); psycopg.Error when the DB fails. `quick`: DBUnavailable at once
        while the DB is down, or after `QUICK_WAIT` s if another thread's statement holds the connection."""
        if quick and self.down:
            raise DBUnavailable("the task DB did not answer a moment ago")
        slot = self._quick if quick else self._main
        if not slot.lock.acquire(timeout=QUICK_WAIT if quick else -1):
            raise DBUnavailable("the task DB connection is busy with a statement still waiting for an answer")
        try:
            with self._session(slot) as conn:
                cursor = conn.execute(sql, args)
                return cursor.fetchall() if cursor.description else []
        finally:
            slot.lock.release()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """The connection for several statements in one transaction, this thread's until it ends (admission's)."""
        with self._main.lock, self._session(self._main) as conn, conn.transaction():
            yield conn

    @contextlib.contextmanager
    def _session(self, slot: _Connection) -> Iterator[psycopg.Connection]:
        """The slot's connection (its lock held); a psycopg.Error drops it, and marks the DB down if it is gone."""
        try:
            if slot.conn is None or slot.conn.closed:
                slot.conn = connect(self.url, **self.limits)
            yield slot.conn
            self._down_until = 0.0
        except psycopg.Error as exc:
            if slot.conn is not None:
                slot.conn.close()
            slot.conn = None
            if lost_the_db(exc):
                self._down_until = time.monotonic() + DOWN_FOR
            raise

    def later(self, job: Callable[[], object]) -> None:
        """Run `job` on the offload thread, after what was handed over before it (errors are logged)."""
        def run() -> None:
            try:
                job()
            except Exception:
                log.exception("集群后台操作失败")

        try:
            self._offload.submit(run)
        except RuntimeError:  # closed: nothing else runs it
            run()

    def close(self) -> None:
        self._offload.shutdown(wait=False)
        for slot in (self._main, self._quick):
            with slot.lock:
                if slot.conn is not None:
                    slot.conn.close()
