"""The cluster's statements on a real PostgreSQL: leases, a takeover that never gives one task to two hosts, a start
that claims only this host's tasks, and cancels that reach every host; its threads supervised."""

from __future__ import annotations

import logging
import socket
import threading
import time
from types import SimpleNamespace

import psycopg

from cluster.fence import DeliveryFence
from cluster.hosts import Cluster, host_name
from common.supervision import Supervisor
from dingtalk.route import Route
from store.journal import open_store
from tasks.task import RUNNING, SUCCEEDED, Task
from tests.pg_proxy import PgProxy
from tests.standin import poll_until


def _task(number: int, **fields) -> Task:
    return Task(id=f"{number:016x}", user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", "c"),
                prompt=f"p{number}", created_at=float(number), **fields)


def _member(url: str, host: str, lease: float = 30.0, cancels: list[tuple] | None = None) -> Cluster:
    return Cluster(url, host, lease_seconds=lease, on_takeover=lambda ids: None,
                   on_cancel=lambda *told: cancels.append(told) if cancels is not None else None)


def _expire(url: str, host: str | None = None) -> None:
    """Move leases an hour back (of `host`'s tasks only, if named): as if their host had stopped renewing."""
    with psycopg.connect(url) as conn:
        if host is None:
            conn.execute("UPDATE tasks SET lease_until = lease_until - 3600")
        else:
            conn.execute("UPDATE tasks SET lease_until = lease_until - 3600 WHERE host = %s", (host,))


def _start_listening(*members: Cluster, timeout: float = 10.0) -> None:
    """Start the members and wait until each one's listener says every LISTEN is sent (`Cluster.listening`)."""
    for member in members:
        member.start()
    for member in members:
        assert member.listening.wait(timeout), f"{member.host} not listening after {timeout}s"


def test_expired_tasks_are_taken_by_exactly_one_of_several_racing_hosts(pg_url):
    store = open_store(pg_url, host="dead")
    for number in range(200):
        store.save(_task(number, status=RUNNING))
    store.save(_task(999, status=SUCCEEDED, delivered=True))  # done: nobody takes it
    assert store.wait_written(10)
    store.close()
    members = [_member(pg_url, f"host{n}") for n in range(4)]
    assert all(not member.take_over() for member in members)  # leases still live
    _expire(pg_url)
    taken: dict[str, list[str]] = {}
    start = threading.Barrier(len(members))

    def race(member: Cluster) -> None:
        start.wait()
        taken[member.host] = list(member.take_over())

    threads = [threading.Thread(target=race, args=(member,)) for member in members]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every = [task_id for ids in taken.values() for task_id in ids]
    assert sorted(every) == sorted(f"{n:016x}" for n in range(200))  # each once, the finished one not at all
    with psycopg.connect(pg_url) as conn:
        owners = dict(conn.execute("SELECT id, host FROM tasks").fetchall())
    assert all(owners[task_id] == host for host, ids in taken.items() for task_id in ids)
    for member in members:
        member.stop()


def test_renewed_leases_are_not_taken_and_a_start_claims_only_its_own_or_expired_tasks(pg_url):
    mine, other = open_store(pg_url, host="a"), open_store(pg_url, host="b")
    mine.save(_task(1))
    other.save(_task(2))
    assert mine.wait_written(5) and other.wait_written(5)
    a, b = _member(pg_url, "a"), _member(pg_url, "b")
    assert a.claim_at_start() == {f"{1:016x}"}  # b's task is b's while its lease holds
    _expire(pg_url, "b")  # b's lease ran out…
    assert b.renew() == 1  # …but b is alive: its lease moves on
    assert a.take_over() == {}
    _expire(pg_url, "b")  # b stopped renewing
    assert a.take_over() == {f"{2:016x}": "b"} and a.host_of(f"{2:016x}") == "a"
    for store in (mine, other):
        store.close()
    a.stop()
    b.stop()


def test_a_cancel_request_marks_the_task_and_reaches_every_listening_host(pg_url):
    store = open_store(pg_url, host="a")
    store.save(_task(7, status=RUNNING))
    store.save(_task(8, status=SUCCEEDED))
    assert store.wait_written(5)
    heard_a, heard_b = [], []
    a, b = _member(pg_url, "a", cancels=heard_a), _member(pg_url, "b", cancels=heard_b)
    _start_listening(a, b)
    assert b.request_cancel(f"{8:016x}") is None  # finished: nothing to cancel
    command = Route("2", "admin", "cidG", session_webhook="https://hook", webhook_expires_ms=1)  # the /cancel's route
    assert b.request_cancel(f"{7:016x}", reply_to=command) == "a"
    # Within 5 s (a user would call a slower cancel broken; bench/ has the real figures).
    poll_until(lambda: heard_a and heard_b, 5.0, 0.01, lambda: f"heard: a={heard_a} b={heard_b}")
    assert heard_a == heard_b == [(f"{7:016x}", command)]  # the holder confirms there
    assert store.get(f"{7:016x}").cancel_requested
    a.stop()
    b.stop()
    store.close()


def test_a_listener_cut_off_from_the_db_listens_again_and_still_hears_cancels(pg_url, caplog):
    caplog.set_level(logging.INFO, logger="cluster")
    store = open_store(pg_url, host="a")
    store.save(_task(7, status=RUNNING))
    assert store.wait_written(5)
    proxy = PgProxy(pg_url)
    heard: list[str] = []
    a, b = Cluster(proxy.url, "a", lease_seconds=30, on_takeover=lambda ids: None,
                   on_cancel=lambda task_id, reply_to: heard.append(task_id)), \
        _member(pg_url, "b")
    _start_listening(a)
    proxy.cut()
    poll_until(lambda: not a.listening.is_set(), 10.0, 0.01, lambda: "the cut was not noticed")
    proxy.restore()
    assert a.listening.wait(10.0), "not listening again after the DB came back"
    listened = [r.getMessage() for r in caplog.records if r.getMessage().startswith("集群通知已监听")]
    assert listened == ["集群通知已监听 (channels: bot_cancel, bot_task)"] * 2
    assert b.request_cancel(f"{7:016x}") == "a"
    poll_until(lambda: heard, 5.0, 0.01, lambda: "the cancel did not reach the listener that reconnected")
    assert heard == [f"{7:016x}"]
    for member in (a, b):
        member.stop()
    proxy.close()
    store.close()


def test_a_task_is_admitted_only_while_its_user_and_conversation_have_room_on_every_host(pg_url):
    store = open_store(pg_url, host="a")
    store.save(_task(1, status=RUNNING))  # u1 runs in conversation "c" on host a
    assert store.wait_written(5)
    b = _member(pg_url, "b")
    same_conversation = _task(2)
    other_conversation = Task(id="3" * 16, user_id="u1", user_name="U", conversation_key="c2",
                              route=Route("1", "u1", "c2"), prompt="p", created_at=3.0)
    other_user = Task(id="4" * 16, user_id="u2", user_name="V", conversation_key="c3", route=Route("1", "u2", "c3"),
                      prompt="p", created_at=4.0)
    assert not b.admit(same_conversation, [], max_per_user=5)  # one run per conversation, across hosts
    assert not b.admit(other_conversation, [], max_per_user=1)  # u1's one run is on host a
    assert b.admit(other_conversation, [], max_per_user=2)
    assert not b.admit(other_user, [other_user], max_per_user=1)  # u2 already runs once here
    assert b.admit(other_user, [], max_per_user=1)
    with psycopg.connect(pg_url) as conn:  # admitted rows say running on b at once, before any journal write,
        rows = conn.execute(  # with the run counted: a host killed right after admission still used an attempt
            "SELECT id, status, host, attempts FROM tasks WHERE host = 'b' ORDER BY id").fetchall()
    assert rows == [("3" * 16, RUNNING, "b", 1), ("4" * 16, RUNNING, "b", 1)]
    nothing_here = SimpleNamespace(queued_count=lambda user_id: 0)  # b's own board: no queued task
    b.refresh_queued()
    assert b.queued(nothing_here, "u1") == 0
    store.save(_task(5))  # queued on host a: MAX_QUEUED_PER_USER counts it on every host (from b's last look)
    assert store.wait_written(5) and b.queued(nothing_here, "u1") == 0
    b.refresh_queued()  # the lease thread's, every LEASE_SECONDS/3
    assert b.queued(nothing_here, "u1") == 1 and b.host_of(f"{5:016x}") == "a"
    b.stop()
    store.close()


def test_a_task_taken_over_while_it_waited_is_dropped_here_not_taken_back(pg_url):
    store = open_store(pg_url, host="a")
    store.save(_task(1))  # queued on host a, whose renewals then stall past the lease (a loaded machine)
    assert store.wait_written(5)
    a, b = _member(pg_url, "a"), _member(pg_url, "b")
    _expire(pg_url, "a")
    assert b.take_over() == {f"{1:016x}": "a"}  # b queues it; a, alive, still has it queued too
    assert a.admit(_task(1), [], max_per_user=5) is None  # a must not take it back and run it as well
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT host, status FROM tasks").fetchall() == [("b", "queued")]
    assert b.admit(_task(1), [], max_per_user=5) is True  # the taker runs it
    a.stop()
    b.stop()
    store.close()


def test_the_delivery_fence_lets_a_result_out_only_while_this_host_holds_its_task(pg_url):
    store = open_store(pg_url, host="a")
    store.save(_task(1, status=SUCCEEDED))
    store.save(_task(2, status=SUCCEEDED))
    assert store.wait_written(5)
    a, b = _member(pg_url, "a", lease=3), _member(pg_url, "b", lease=3)
    _expire(pg_url)
    assert set(b.take_over()) == {f"{1:016x}", f"{2:016x}"}
    fence = DeliveryFence(a)
    assert fence(_task(1)) == 0  # b took both: a must not answer them
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE tasks SET host = 'a' WHERE id = %s", (f"{1:016x}",))
        before = conn.execute("SELECT lease_until FROM tasks WHERE id = %s", (f"{1:016x}",)).fetchone()[0]
    assert 0 < fence(_task(1)) <= 0.8 * 3  # a may send, retrying within what is left of the lease
    with psycopg.connect(pg_url) as conn:  # and its lease was extended: b cannot take it while a sends
        assert conn.execute("SELECT lease_until FROM tasks WHERE id = %s", (f"{1:016x}",)).fetchone()[0] > before
    assert fence(_task(3)) > 0  # no row yet (still in a's journal): nobody else can hold it
    assert fence.refused == 1

    now = [100.0]
    cut_off = Cluster("postgresql://nobody@127.0.0.1:1/none", "a", lease_seconds=3, on_takeover=lambda ids: None,
                      on_cancel=lambda *told: None, connect_timeout=1, clock=lambda: now[0])
    unreachable = DeliveryFence(cut_off)
    cut_off.leased({f"{1:016x}"}, 99.0)  # a renewal that included the task, a second ago: its lease still holds
    assert unreachable(_task(1)) == 99.0 + 0.8 * 3 - 100.0  # what is left of that lease: no retry past it
    now[0] = 103.0  # past 0.8 of the lease since the renewal: maybe taken over, so wait for the DB
    assert unreachable(_task(1)) is None
    for member in (a, b):
        member.stop()
    store.close()


def test_a_stalled_host_does_not_take_back_a_task_another_host_took_over_and_answered(pg_url):
    store = open_store(pg_url, host="a")
    queued = _task(9)
    store.save(queued)  # queued on host a, which then stalls past its lease
    assert store.wait_written(5)
    with psycopg.connect(pg_url) as conn:  # host b took it over and answered it
        conn.execute("UPDATE tasks SET host = 'b', status = %s WHERE id = %s", (SUCCEEDED, queued.id))
    a = _member(pg_url, "a")
    assert a.admit(queued, [], max_per_user=5) is None  # not a's to run any more: never run (and answered) twice
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT host, status FROM tasks WHERE id = %s", (queued.id,)).fetchone() == ("b",
                                                                                                        SUCCEEDED)
    mine = _task(10)
    store.save(mine)
    assert store.wait_written(5)
    assert a.admit(mine, [], max_per_user=5) is True  # its own queued task it still starts
    store.close()


def test_without_host_name_each_installation_is_a_host_of_its_own_and_stays_one_across_restarts(tmp_path):
    first, second = str(tmp_path / "one" / "workspace"), str(tmp_path / "two" / "workspace")
    assert host_name("", first) == host_name("", first) != host_name("", second)
    assert host_name("", first).startswith(socket.gethostname() + "-")
    assert host_name("bot-a", first) == "bot-a"  # a HOST_NAME wins


def test_the_lease_thread_is_supervised_a_crash_is_logged_and_the_renewals_go_on(pg_url, caplog):
    caplog.set_level(logging.INFO)
    open_store(pg_url, host="a").close()  # the schema
    supervisor = Supervisor(restart_delay=0.05)
    a = Cluster(pg_url, "a", lease_seconds=0.3, on_takeover=lambda ids: None, on_cancel=lambda *told: None,
                supervisor=supervisor)
    renewals, renew = [], a.renew

    def renew_with_a_bug() -> int:
        renewals.append(time.monotonic())
        if len(renewals) == 1:
            raise RuntimeError("a bug in the lease thread")  # not a DB error: nothing in the loop catches it
        return renew()

    a.renew = renew_with_a_bug
    a.start()
    poll_until(lambda: len(renewals) >= 3, 5.0, 0.01, lambda: f"renewals stopped after {len(renewals)}")
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("线程 cluster-lease 异常")]
    assert supervisor.healthy()
    a.stop()
