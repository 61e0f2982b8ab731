"""Time limits on every PostgreSQL connection (issue 23 item 4): a DB that stops answering (a black-holed network, the
proxy in tests/pg_proxy.py dropping every byte) costs each call at most its time limit, never a hang; and what the
intake thread asks of the store and the cluster is answered from memory or the journal at once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from cluster.hosts import Cluster
from cluster.questions import SharedQuestions
from config import DB_IDLE_IN_TRANSACTION_TIMEOUT, DB_KEEPALIVES, DB_LOCK_TIMEOUT, DB_TCP_USER_TIMEOUT
from dingtalk.route import Route
from store import pg_connect
from store.journal import open_store
from store.pg_connect import connect
from store.postgres import PostgresTaskStore, StoreUnreachable
from tasks.approvals import Approvals
from tasks.task import Task
from tests.pg_proxy import PgProxy

STATEMENT = 1.0  # the statement_timeout these tests give: the client gives up 2 s (DB_CLIENT_MARGIN) after it
WITHIN = STATEMENT + 2.0 + 1.5  # … plus slack for a loaded machine


def _task(number: int, msg_id: str = "") -> Task:
    return Task(id=f"{number:016x}", user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", "c"),
                prompt=f"p{number}", created_at=float(number), msg_id=msg_id)


def _timed(call: Callable[[], Any], limit: float) -> tuple[float, Any]:
    """(seconds `call` took, what it returned or raised); fails if it has not returned within `limit` s (on a thread:
    a call that hangs for ever fails the test instead of hanging it)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    took = time.monotonic() - started
    assert not thread.is_alive(), f"still waiting for the DB after {limit:.1f} s"
    return took, outcome[0]


@pytest.fixture
def proxy(pg_url):
    proxy = PgProxy(pg_url)
    yield proxy
    proxy.close()


def test_every_connection_carries_the_time_limits_and_keepalives(pg_url, monkeypatch):
    opened: list[dict] = []
    real_connect = pg_connect.TimedConnection.connect.__func__

    def recording(cls, conninfo: str = "", **kwargs):
        opened.append(dict(kwargs))
        return real_connect(cls, conninfo, **kwargs)

    monkeypatch.setattr(pg_connect.TimedConnection, "connect", classmethod(recording))
    store = PostgresTaskStore(pg_url, statement_timeout=7, busy_timeout=0.5)
    member = Cluster(pg_url, "a", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda task_id: None,
                     statement_timeout=7)
    try:
        member.execute("SELECT 1")
        member.start()  # the listener connects on its own thread
        deadline = time.monotonic() + 10
        while len(opened) < 4 and time.monotonic() < deadline:  # the store's probe and pool, statements, listener
            time.sleep(0.05)
        assert len(opened) >= 4, opened
        for kwargs in opened:
            assert kwargs["connect_timeout"] == 5 and kwargs["deadline"] == 9.0, kwargs
            assert kwargs["keepalives"] == 1 and (kwargs["keepalives_idle"], kwargs["keepalives_interval"],
                                                  kwargs["keepalives_count"]) == DB_KEEPALIVES
            assert kwargs["tcp_user_timeout"] == int(DB_TCP_USER_TIMEOUT * 1000)
            assert "-c statement_timeout=7000" in kwargs["options"]
            assert f"-c idle_in_transaction_session_timeout={int(DB_IDLE_IN_TRANSACTION_TIMEOUT * 1000)}" in \
                kwargs["options"]
        with store.connection() as conn:  # what the server and libpq took of them
            shown = conn.execute("SELECT current_setting('statement_timeout') AS s, current_setting('lock_timeout') "
                                 "AS l, current_setting('idle_in_transaction_session_timeout') AS i").fetchone()
            assert shown == {"s": "7s", "l": "500ms", "i": f"{DB_IDLE_IN_TRANSACTION_TIMEOUT:.0f}s"}
            assert conn.info.get_parameters()["keepalives_idle"] == str(DB_KEEPALIVES[0])
        assert member.execute("SELECT current_setting('lock_timeout')") == [(f"{DB_LOCK_TIMEOUT:.0f}s",)]
    finally:
        member.stop()
        store.close()


def test_a_statement_against_a_black_holed_db_returns_within_its_time_limit(proxy):
    store = PostgresTaskStore(proxy.url, statement_timeout=STATEMENT, busy_timeout=0.5)
    member = Cluster(proxy.url, "a", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda task_id: None,
                     statement_timeout=STATEMENT)
    try:
        assert store.count() == 0 and member.execute("SELECT 1") == [(1,)]
        proxy.black_hole()  # the connections stay open; nothing comes back
        took, outcome = _timed(store.count, WITHIN)
        assert isinstance(outcome, psycopg.OperationalError) and took >= STATEMENT, (took, outcome)
        took, outcome = _timed(lambda: member.execute("SELECT 1"), WITHIN)
        assert isinstance(outcome, psycopg.OperationalError), outcome
        # A new connection is accepted (the kernel answers) and never answered: connect_timeout ends it.
        took, outcome = _timed(lambda: connect(proxy.url, connect_timeout=2), 2 + 2.0)
        assert isinstance(outcome, psycopg.OperationalError), outcome
        proxy.restore()  # the old connections stay silent (a firewall that lost their state); new ones work
        took, outcome = _timed(store.count, 3 * WITHIN)
        assert outcome == 0, outcome
        assert _timed(lambda: member.execute("SELECT 1"), WITHIN)[1] == [(1,)]
    finally:
        member.stop()
        store.close()


def test_opening_the_store_on_a_black_holed_db_is_unreachable_within_the_connect_timeout(proxy):
    proxy.black_hole()
    took, outcome = _timed(lambda: PostgresTaskStore(proxy.url, connect_timeout=2), 2 + 3.0)
    assert isinstance(outcome, StoreUnreachable), outcome  # start-up tries again: a later try may find it up


def test_the_intake_path_never_waits_on_a_black_holed_db(proxy):
    """What the intake thread asks while the DB is black-holed: dedup, the journaled writes, the queued count, an
    answer to another host's question, placing a task: each answered at once. The ACK's wait for the batch to be
    written is bounded by its timeout, and once a flush is stuck it stops waiting at all."""
    store = open_store(proxy.url, busy_timeout=0.5, statement_timeout=STATEMENT, host="a")
    member = Cluster(proxy.url, "a", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda task_id: None,
                     statement_timeout=STATEMENT)
    questions = SharedQuestions(member, Approvals(send_question=lambda task, text: None, timeout=5))
    try:
        questions.join()
        assert store.remember_message("m0", time.time()) and store.wait_written(5)
        proxy.black_hole()
        started = time.monotonic()
        assert store.remember_message("m1", time.time())
        assert not store.remember_message("m1", time.time())  # a redelivery: memory knows it
        store.save(_task(1, msg_id="m1"))
        assert member.queued(SimpleNamespace(queued_count=lambda user_id: 1), "u1") == 1
        assert questions.answer("c", "u1", False, "同意") is None  # no other host's question waits here
        assert time.monotonic() - started < 0.5
        took, written = _timed(lambda: store.wait_written(2.0), 2.0 + 1.0)  # the ACK's wait: at most its timeout
        assert written is False and took < 2.5, took
        time.sleep(0.2)
        took, written = _timed(lambda: store.wait_written(2.0), 1.0)  # a flush is stuck: no more waiting
        assert written is False and took < 0.2, took
        took, _ = _timed(lambda: store.get(f"{1:016x}"), 1.0)  # reads answer from the journal
        assert took < 0.2
    finally:
        proxy.restore()
        member.stop()
        store.close(timeout=0.5)
