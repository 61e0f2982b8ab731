"""Nothing dies silently, and races end as a user expects: supervised threads, delivery retries and give-up,
cancels that are final, notices that come before results, health that tells the truth (unit level).

The end-to-end fault-injection suite is tests/e2e/test_e2e_outages.py.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

from async_task_manager import AsyncTaskManager
from codebuddy_client import RunResult
from common.supervision import Supervisor, install_exception_hooks
from dingtalk.route import Route
from dingtalk_sender import Delivery
from ops import health, systemd_notify
from store.memory import MemoryTaskStore
from tasks.task import CANCELLED, QUEUED, RUNNING, SUCCEEDED
from tests.conftest import ROOT

ROUTE = Route("1", "u1", "", "", 0)


def _wait(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


class RecordingSender:
    """Records every send; `fail` decides per text whether it fails (and whether permanently)."""

    def __init__(self, fail=lambda text: None, delay=lambda text: 0.0) -> None:
        self.sent: list[str] = []
        self.attempts: list[str] = []
        self.fail = fail
        self.delay = delay
        self.lock = threading.Lock()

    def send(self, route, text, *, markdown=False, title="", allow_webhook=True, retry_window=None):
        time.sleep(self.delay(text))
        with self.lock:
            self.attempts.append(text)
        failure = self.fail(text)
        if failure is not None:
            return Delivery(ok=False, path="batchSend", error="boom", permanent=failure == "permanent")
        with self.lock:
            self.sent.append(text)
        return Delivery(ok=True, path="batchSend")


class ScriptedClient:
    """A CLI client whose run blocks until released, then returns `result` (whatever the cancel event says)."""

    def __init__(self, result: RunResult) -> None:
        self.result = result
        self.release = threading.Event()
        self.started = threading.Event()
        self.cancels: list[str] = []

    def run(self, prompt, *, cancel_event=None, **kwargs):
        self.started.set()
        self.release.wait(10)
        return self.result

    def cancel(self, run_tag):
        self.cancels.append(run_tag)
        return True

    def close(self):
        pass


# ---------------------------------------------------------------- supervised threads


def test_a_crashing_loop_is_logged_with_its_traceback_and_restarted(caplog):
    runs = []

    def loop():
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"crash {len(runs)}")

    supervisor = Supervisor(restart_delay=0.01)
    with caplog.at_level(logging.ERROR):
        supervisor.start("worker-x", loop).join(5)
    assert len(runs) == 3 and supervisor.healthy()
    crashes = [r for r in caplog.records if "线程 worker-x 异常" in r.getMessage()]
    assert len(crashes) == 2 and all(r.exc_info and "crash" in str(r.exc_info[1]) for r in crashes)


def test_a_crash_looping_thread_is_reported_dead_until_shutdown(caplog):
    supervisor = Supervisor(restart_delay=0.0, crash_limit=3)

    def loop():
        raise OSError("disk")

    supervisor.start("intake", loop).join(5)
    assert supervisor.dead() == ["intake"] and not supervisor.healthy()
    assert any("不再重启" in r.getMessage() for r in caplog.records)
    supervisor.stop()
    assert supervisor.healthy()  # a shutdown is not a death


def test_uncaught_exceptions_in_plain_threads_reach_the_log(caplog):
    previous = threading.excepthook
    install_exception_hooks()
    try:
        thread = threading.Thread(target=lambda: 1 / 0, name="stray")
        thread.start()
        thread.join()
    finally:
        threading.excepthook = previous
    record = next(r for r in caplog.records if "线程 stray 未捕获的异常" in r.getMessage())
    assert record.exc_info and record.exc_info[0] is ZeroDivisionError


def test_an_uncaught_main_thread_exception_is_logged_redacted_and_not_printed_raw(tmp_path):
    secret = "main-thread-secret-77Qz"
    script = (
        "import logging, sys\n"
        "from common.logs import setup_logging\n"
        "from common.supervision import install_exception_hooks\n"
        f"setup_logging({str(tmp_path / 'bot.log')!r}, 'INFO', ({secret!r},), echo=False)\n"
        "install_exception_hooks()\n"
        f"raise RuntimeError('connect failed with password ' + {secret!r})\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert secret not in done.stderr and "RuntimeError (the traceback is in the log)" in done.stderr, done.stderr
    logged = (tmp_path / "bot.log").read_text(encoding="utf-8")
    assert "未捕获的异常，程序退出" in logged and "Traceback" in logged and secret not in logged, logged


# ---------------------------------------------------------------- delivery: retries, give-up, order


def _manager(client, sender, **kwargs) -> AsyncTaskManager:
    return AsyncTaskManager(client, sender, MemoryTaskStore(), tick=0.02, **kwargs)


def test_undelivered_result_is_retried_while_running_with_backoff_then_delivered():
    results_failing = {"left": 2}

    def fail(text):
        if "answer" in text and results_failing["left"] > 0:
            results_failing["left"] -= 1
            return "retry"
        return None

    sender = RecordingSender(fail=fail)
    manager = _manager(ScriptedClient(RunResult(ok=True, text="answer")), sender, retry_backoff=0.1)
    manager.client.release.set()
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    _wait(lambda: manager.store.get(task.id).delivered)
    assert [t for t in sender.attempts if "answer" in t] == ["answer"] * 3
    assert manager.outbox.waiting_retries == 0
    manager.shutdown(0.5)


def test_result_is_given_up_after_the_give_up_time_and_never_pushed_again(caplog):
    sender = RecordingSender(fail=lambda text: "retry" if "answer" in text else None)
    manager = _manager(ScriptedClient(RunResult(ok=True, text="answer")), sender, retry_backoff=0.05,
                       give_up_after=0.4)
    manager.client.release.set()
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    _wait(lambda: manager.store.get(task.id).undeliverable)
    stored = manager.store.get(task.id)
    assert stored.status == SUCCEEDED and not stored.delivered and task.id not in manager.board.tasks
    attempts = len(sender.attempts)
    time.sleep(0.3)
    assert len(sender.attempts) == attempts and manager.outbox.waiting_retries == 0
    assert any("已放弃" in r.getMessage() and task.id in r.getMessage() for r in caplog.records)
    manager.shutdown(0.5)
    # A restart does not push it again, and purge removes it like a delivered task.
    again = AsyncTaskManager(ScriptedClient(RunResult(ok=True)), sender, manager.store)
    again.recover()
    time.sleep(0.2)
    assert len(sender.attempts) == attempts
    assert manager.store.purge(time.time() + 1, 0) == 1


def test_a_permanent_refusal_is_given_up_at_once():
    sender = RecordingSender(fail=lambda text: "permanent" if "answer" in text else None)
    manager = _manager(ScriptedClient(RunResult(ok=True, text="answer")), sender, retry_backoff=0.05)
    manager.client.release.set()
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    _wait(lambda: manager.store.get(task.id).undeliverable)
    time.sleep(0.2)
    assert len([t for t in sender.attempts if "answer" in t]) == 1
    manager.shutdown(0.5)


def test_moved_to_background_notice_always_comes_before_the_result():
    # The notice is slow to send (a throttled webhook); the result is ready at once: it must wait.
    sender = RecordingSender(delay=lambda text: 0.4 if "转入后台" in text else 0.0)
    client = ScriptedClient(RunResult(ok=True, text="answer"))
    manager = _manager(client, sender, sync_timeout=0.05)
    manager.start()
    manager.submit("hi", ROUTE, user_id="u1")
    _wait(lambda: manager.board.tasks and next(iter(manager.board.tasks.values())).background)
    client.release.set()
    _wait(lambda: any("answer" in t for t in sender.sent))
    order = [("notice" if "转入后台" in t else "result") for t in sender.sent if "转入后台" in t or "answer" in t]
    assert order == ["notice", "result"]
    manager.shutdown(0.5)


# ---------------------------------------------------------------- cancel races


def test_cancel_that_lands_after_the_answer_does_not_turn_it_into_cancelled():
    sender = RecordingSender()
    client = ScriptedClient(RunResult(ok=True, text="the answer"))  # the CLI finished on its own
    manager = _manager(client, sender)
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    client.started.wait(5)
    outcomes = []
    manager.cancel(task.id, on_ended=lambda ended, stopped: outcomes.append((ended.status, stopped)))
    client.release.set()
    _wait(lambda: outcomes)
    _wait(lambda: any("the answer" in t for t in sender.sent))
    assert outcomes == [(SUCCEEDED, True)]
    assert manager.store.get(task.id).status == SUCCEEDED
    manager.shutdown(0.5)


def test_cancelled_run_gets_only_the_confirmation_never_an_answer():
    sender = RecordingSender()
    client = ScriptedClient(RunResult(ok=False, cancelled=True, error="任务已取消"))
    manager = _manager(client, sender)
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    client.started.wait(5)
    outcomes = []
    manager.cancel(task.id, on_ended=lambda ended, stopped: outcomes.append((ended.status, stopped)))
    assert client.cancels == [task.id]
    client.release.set()
    _wait(lambda: outcomes)
    time.sleep(0.2)
    assert outcomes == [(CANCELLED, True)]
    assert not any("失败" in t or "任务已取消" in t for t in sender.sent)  # only the ack went out
    manager.shutdown(0.5)


def test_cancel_still_running_after_the_wait_says_so_once():
    sender = RecordingSender()
    client = ScriptedClient(RunResult(ok=False, cancelled=True))
    manager = AsyncTaskManager(client, sender, MemoryTaskStore(), tick=0.02)
    manager.monitor.cancel_confirm_wait = 0.1
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    client.started.wait(5)
    outcomes = []
    manager.cancel(task.id, on_ended=lambda ended, stopped: outcomes.append(stopped))
    _wait(lambda: outcomes)
    client.release.set()
    time.sleep(0.2)
    assert outcomes == [False]  # the still-exiting note, and no second message later
    manager.shutdown(0.5)


def test_users_cancel_during_shutdown_is_final_and_not_rerun():
    store = MemoryTaskStore()
    client = ScriptedClient(RunResult(ok=False, cancelled=True))
    manager = AsyncTaskManager(client, RecordingSender(), store, tick=0.02)
    manager.start()
    task = manager.submit("hi", ROUTE, user_id="u1")
    client.started.wait(5)
    stopper = threading.Thread(target=manager.shutdown, args=(0.3,))
    stopper.start()
    time.sleep(0.1)
    manager.cancel(task.id)  # in the last moments of the grace
    _wait(lambda: manager.board.running[task.id].by_shutdown)  # the shutdown stops it too, then it ends
    client.release.set()
    stopper.join(10)
    assert store.get(task.id).status == CANCELLED
    restarted = AsyncTaskManager(ScriptedClient(RunResult(ok=True)), RecordingSender(), store)
    restarted.recover()
    assert store.get(task.id).status == CANCELLED and not restarted.board.queue


def test_cancel_recorded_before_a_crash_is_final_after_the_restart():
    store = MemoryTaskStore()
    crashed = AsyncTaskManager(ScriptedClient(RunResult(ok=True)), RecordingSender(), store)
    task = crashed.create_task("u1", "hi", ROUTE)
    crashed.update_status(task.id, RUNNING, started_at=time.time(), attempts=1)
    crashed.board.transition(task, cancel_requested=True)  # the bot died before the CLI was gone
    sender = RecordingSender()
    restarted = AsyncTaskManager(ScriptedClient(RunResult(ok=True)), sender, store)
    restarted.recover()
    assert store.get(task.id).status == CANCELLED and not restarted.board.queue
    _wait(lambda: sender.sent)
    assert sender.sent == [f"已取消任务 {task.id}"]


def test_cancel_of_a_task_requeued_by_shutdown_does_not_raise():
    manager = AsyncTaskManager(ScriptedClient(RunResult(ok=True)), RecordingSender(), MemoryTaskStore())
    task = manager.create_task("u1", "hi", ROUTE)
    assert task.status == QUEUED and task.id not in manager.board.queue
    assert manager.cancel(task.id).status == CANCELLED


# ---------------------------------------------------------------- health


def _sources(*, dead=(), connected=True, store_ok=True, retries=0, backlog=0.0):
    return SimpleNamespace(
        supervisor=SimpleNamespace(dead=lambda: list(dead)),
        intake=SimpleNamespace(backlog_age=lambda now: backlog),
        stream=SimpleNamespace(connected=connected),
        store=SimpleNamespace(health=lambda: SimpleNamespace(ok=store_ok, reason="" if store_ok else "database is "
                                                             "locked", pending=0 if store_ok else 3)),
        manager=SimpleNamespace(outbox=SimpleNamespace(waiting_retries=retries)),
        client=SimpleNamespace(warm_stats=lambda: {"live": 1}))


def test_health_is_ok_degraded_or_unhealthy_with_the_reason():
    assert health.assess(_sources()) == (200, {"status": "ok", "stream_connected": True,
                                                "stream_connections": {"live": 1, "wanted": 1}, "store_writable": True,
                                                "store_pending": 0, "dead_threads": [], "warm_processes": {"live": 1}})
    code, body = health.assess(_sources(store_ok=False, retries=2))
    assert code == 200 and body["status"] == "degraded" and body["store_error"] == "database is locked"
    assert any("3 record(s) kept in memory" in r for r in body["reasons"])
    assert any("2 result(s) waiting" in r for r in body["reasons"])
    code, body = health.assess(_sources(dead=["worker-1"]))
    assert code == 503 and body["dead_threads"] == ["worker-1"]
    code, body = health.assess(_sources(backlog=health.INTAKE_STUCK_SECONDS + 1))
    assert code == 503 and "intake stuck" in body["reasons"][0]


def test_watchdog_pings_stop_while_a_core_thread_is_dead(caplog):
    sent: list[str] = []
    notifier = systemd_notify.SystemdNotifier("@x", watchdog_usec=20_000)  # ping every 10 ms
    notifier.notify = lambda *fields: sent.extend(fields) or True
    alive = {"value": True}

    async def scenario():
        task = asyncio.create_task(systemd_notify.notify_systemd(notifier, lambda: True, alive=lambda: alive["value"],
                                                                 poll=0.005))
        await asyncio.sleep(0.1)
        alive["value"] = False
        pings_before = sent.count("WATCHDOG=1")
        await asyncio.sleep(0.1)
        task.cancel()
        return pings_before

    pings_before = asyncio.run(scenario())
    assert pings_before >= 3 and sent.count("WATCHDOG=1") == pings_before
    assert sum("停止 systemd watchdog 心跳" in r.getMessage() for r in caplog.records) == 1
