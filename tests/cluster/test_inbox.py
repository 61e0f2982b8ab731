"""A host of several, in process on a real PostgreSQL (its task manager, the fake CLI below, a sender that records):
what another host sends it — a hand-off, a cancel — reaches it even when the notification is lost, and is done once;
a cancel is confirmed where the command was given."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from async_task_manager import AsyncTaskManager
from cluster.hosts import Cluster, join_cluster, open_task_store
from codebuddy_client import RunResult
from config import load_config
from dingtalk.route import Route
from dingtalk_sender import Delivery
from store.journal import open_store
from tasks.task import Task
from tests.standin import poll_until

RECONCILE = 0.2  # the look at the host's rows, seconds (RECONCILE_SECONDS is 5 in production)


class _Client:
    """Answers at once; a prompt with "[block]" runs until it is cancelled."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def run(self, prompt, *, cancel_event=None, **_):
        self.runs.append(prompt)
        if "[block]" in prompt:
            cancel_event.wait(30)
            return RunResult(ok=False, cancelled=True, error="cancelled")
        return RunResult(ok=True, text=f"回答: {prompt}", duration=0.01)

    def kill_leftovers(self, run_tag):
        return 0

    def cancel(self, run_tag):
        return True

    def close(self):
        pass


class _Sender:
    """Records every message: (route, text, allow_webhook)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Route, str, bool]] = []
        self.lock = threading.Lock()

    def send(self, route, text, *, allow_webhook=True, **_):
        with self.lock:
            self.sent.append((route, text, allow_webhook))
        return Delivery(ok=True, path="webhook" if allow_webhook else "batchSend")

    def texts(self, part: str) -> list[str]:
        with self.lock:
            return [text for _, text, _ in self.sent if part in text]


@pytest.fixture
def host_b(pg_url):
    """Host "b": a task manager that joined the cluster, its workers started."""
    config = load_config({"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret", "TASK_DB": pg_url,
                          "HOST_NAME": "b"}, dotenv_path=None)
    client, sender = _Client(), _Sender()
    manager = AsyncTaskManager(client, sender, open_task_store(config), tick=0.05)
    cluster = join_cluster(config, manager, reconcile_seconds=RECONCILE)
    manager.start()
    yield manager, cluster, client, sender
    cluster.stop()
    manager.shutdown(grace=0.5, after_grace=1.0)


def _row(pg_url: str, sql: str, *args) -> list[tuple]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql, args).fetchall()


def _looks(cluster, count: int) -> None:
    """Wait until the host has looked at its rows `count` more times (a second action would have come by then)."""
    target = cluster.inbox.reconciled + count
    poll_until(lambda: cluster.inbox.reconciled >= target, 5.0, 0.02, lambda: "the host stopped looking at its rows")


def test_a_task_handed_to_a_host_whose_notification_was_lost_runs_there_once_within_the_reconcile_period(
        pg_url, host_b):
    manager, cluster, client, sender = host_b
    origin = open_store(pg_url, host="a")
    task = Task(id="ab" * 8, user_id="u1", user_name="U", conversation_key="c1", route=Route("1", "u1", "c1"),
                prompt="交给 b 的任务", created_at=time.time())
    origin.save(task)
    assert origin.wait_written(5)
    _row(pg_url, "UPDATE tasks SET host = 'b' WHERE id = %s RETURNING id", task.id)  # handed off; its NOTIFY lost
    poll_until(lambda: sender.texts("回答: 交给 b 的任务"), 5.0, 0.02,
               lambda: f"not answered: {_row(pg_url, 'SELECT host, status FROM tasks')}")
    _looks(cluster, 3)
    assert client.runs == ["交给 b 的任务"] and len(sender.texts("回答: 交给 b 的任务")) == 1
    origin.close()


def test_a_cancel_asked_on_another_host_whose_notification_was_lost_stops_the_run_once_within_the_reconcile_period(
        pg_url, host_b):
    manager, cluster, client, sender = host_b
    task = manager.submit("长任务 [block]", Route("1", "u2", "c2"), user_id="u2", conversation_key="c2")
    poll_until(lambda: client.runs, 5.0, 0.02, lambda: "the task did not start")
    assert manager.store.wait_written(5)
    _row(pg_url, "UPDATE tasks SET cancel_requested = 1 WHERE id = %s RETURNING id", task.id)  # its NOTIFY lost
    poll_until(lambda: sender.texts(f"已取消任务 {task.id}"), 5.0, 0.02,
               lambda: f"not cancelled: {_row(pg_url, 'SELECT status, cancel_requested FROM tasks')}")
    _looks(cluster, 3)
    assert len(sender.texts(f"已取消任务 {task.id}")) == 1  # confirmed once, however often the row is looked at
    assert manager.store.wait_written(5)
    assert _row(pg_url, "SELECT status, cancel_requested FROM tasks WHERE id = %s", task.id) == [("cancelled", 1)]


def test_a_cross_host_cancel_is_confirmed_through_the_command_messages_own_session_webhook(pg_url, host_b):
    manager, cluster, client, sender = host_b
    task = manager.submit("长任务 [block]", Route("1", "u3", "c3"), user_id="u3", conversation_key="c3")
    poll_until(lambda: client.runs, 5.0, 0.02, lambda: "the task did not start")
    assert manager.store.wait_written(5)
    other = Cluster(pg_url, "a", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda *told: None)
    command = Route("1", "u3", "c3", session_webhook="https://oapi.dingtalk.com/robot/sendBySession?session=x",
                    webhook_expires_ms=int(time.time() * 1000) + 3_600_000)  # the /cancel message host a received
    assert other.request_cancel(task.id, reply_to=command) == "b"
    poll_until(lambda: sender.texts(f"已取消任务 {task.id}"), 5.0, 0.02, lambda: "no confirmation")
    # Any host may post to that webhook, and it is free: no metered push for a command's answer.
    assert [(route, allow_webhook) for route, text, allow_webhook in sender.sent
            if f"已取消任务 {task.id}" in text] == [(command, True)]
    other.stop()
