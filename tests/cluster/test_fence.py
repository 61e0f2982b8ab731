"""The delivery fence on a real PostgreSQL: a host cut off from the DB sends a result only on a lease that included the
task, and no send outlives the lease it started under."""

from __future__ import annotations

import psycopg

from cluster.fence import DeliveryFence
from cluster.hosts import Cluster
from dingtalk.route import Route
from store.journal import open_store
from tasks.task import SUCCEEDED, Task
from tests.pg_proxy import PgProxy


def _task(number: int, **fields) -> Task:
    return Task(id=f"{number:016x}", user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", "c"),
                prompt=f"p{number}", created_at=float(number), **fields)


def test_a_host_cut_off_from_the_db_sends_only_results_whose_task_its_last_renewal_included(pg_url):
    store = open_store(pg_url, host="a")
    store.save(_task(1, status=SUCCEEDED))
    store.save(_task(2, status=SUCCEEDED))
    assert store.wait_written(5)
    proxy = PgProxy(pg_url)
    now = [100.0]
    a = Cluster(proxy.url, "a", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda *told: None,
                connect_timeout=1, clock=lambda: now[0])
    with psycopg.connect(pg_url) as conn:  # b took task 2 over while a's renewals stalled (a loaded machine)
        conn.execute("UPDATE tasks SET host = 'b' WHERE id = %s", (f"{2:016x}",))
    assert a.renew() == 1  # a's renewal extends its one task left: task 2 is not in it
    proxy.cut()  # then a loses the DB
    fence = DeliveryFence(a)
    now[0] = 101.0  # a second after the renewal: its lease holds, but only for the tasks it included
    assert fence(_task(2)) is None  # b's now: a must not answer it on the strength of a renewal without it
    assert fence(_task(1)) == 100.0 + 0.8 * 30 - 101.0  # task 1 was in it: sent, retried within what is left
    a.stop()
    proxy.close()
    store.close()
