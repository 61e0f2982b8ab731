"""The write-behind store: writes never wait for the DB nor fail with it, nothing is lost, a bad file is one line.

The backend-independent tests run twice (the `target` fixture, tests/store_targets.py): on a real SQLite file in
tmp_path and on a fresh database of a real PostgreSQL server; a DB held by another session is a real lock taken by
another process (SQLite) or connection (PostgreSQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest

from dingtalk.intake import Intake
from dingtalk.route import Route
from store.journal import LOST, READ_FAILED, RECOVERED, STILL_FAILING, WRITE_FAILED, JournaledStore, open_store
from store.schema import StoreError
from store.sqlite import SQLiteTaskStore
from tasks import board as task_board
from tasks.admission import Limits
from tasks.routing import Router
from tasks.task import FAILED, RUNNING, SUCCEEDED, Task
from tests.standin import poll_until

FAST = {"busy_timeout": 0.2, "backoff": 0.05, "max_backoff": 0.2}  # a held lock is seen and retried in tenths

def _task(task_id: str, created_at: float = 1000.0, **fields) -> Task:
    return Task(id=task_id, user_id=fields.pop("user_id", "u1"), user_name="U", conversation_key="c",
                route=Route("1", "u1", "c"), prompt=fields.pop("prompt", "p"), created_at=created_at, **fields)


def _rows(path: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _lines(caplog, template: str) -> list[str]:
    prefix = template.split("%")[0]
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


class _Wrapped:
    """A backend passing every call on to a real one, unless a test swaps a method."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)


class _Gate:
    """Holds each of a wrapped backend's transactions at its start until `opened` is set."""

    def __init__(self, backend: _Wrapped) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        real = backend.backend.transaction

        @contextlib.contextmanager
        def transaction():
            self.entered.set()
            self.opened.wait()
            with real():
                yield

        backend.transaction = transaction


class _FailingSaves(_Wrapped):
    """Each save raises the next of `errors` (one per flush attempt) until there are none left."""

    def __init__(self, backend, errors: list[Exception]) -> None:
        super().__init__(backend)
        self.errors = list(errors)
        self.saved: list[str] = []

    def save(self, task: Task) -> None:
        if self.errors:
            raise self.errors.pop(0)
        self.saved.append(task.id)
        self.backend.save(task)


# ---------------------------------------------------------------- a DB held by another process


def test_saves_return_at_once_while_another_process_holds_the_db(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    store = target.open(**FAST)
    held = target.hold_write_lock()
    try:
        started = time.monotonic()
        task = _task("a" * 16)
        store.save(task)
        store.record_duration("u1", "报告", 30.0, 1.0)
        store.set_session("c", "s1")
        for status in (RUNNING, SUCCEEDED):
            task.status = status
            store.save(task)
        store.save(_task("b" * 16, created_at=1001.0))
        store.record_duration("u1", "报告", 60.0, 2.0)
        store.set_session("c", "s2")
        assert time.monotonic() - started < 0.1  # nothing waited for the lock
        assert store.get(task.id).status == SUCCEEDED  # reads see what is not written yet
        assert [t.id for t in store.recent_for_user("u1", 10)] == ["b" * 16, "a" * 16]
        assert [t.id for t in store.load([SUCCEEDED])] == ["a" * 16]
        assert store.session_for("c") == "s2" and store.durations("报告") == [60.0, 30.0]
        # 6 records: the three saves of one task are written as its last one
        poll_until(lambda: not store.health().ok and store.health().pending == 6, 3, 0.02,
                   lambda: f"never degraded: {store.health()}")
        health = store.health()
        assert health.reason == target.locked_reason and health.since is not None
        waited = time.monotonic()
        assert store.wait_written(5) is False and time.monotonic() - waited < 0.1  # False at once
        time.sleep(0.6)  # several retries, still one line
    finally:
        held.release()
    poll_until(lambda: store.health().ok, 5, 0.02, lambda: f"never recovered: {store.health()}")
    assert store.wait_written(5) and store.health().pending == 0
    assert _lines(caplog, WRITE_FAILED) == [f"任务数据库写入失败，记录暂存内存 ({target.locked_reason})"]
    assert len(_lines(caplog, RECOVERED)) == 1 and not _lines(caplog, STILL_FAILING)
    store.close()
    assert target.rows("SELECT id, status FROM tasks ORDER BY created_at") == [("a" * 16, SUCCEEDED),
                                                                               ("b" * 16, "queued")]
    assert target.rows("SELECT seconds FROM durations ORDER BY finished_at") == [(30.0,), (60.0,)]  # in order
    assert target.rows("SELECT session_id FROM sessions") == [("s2",)]


def test_a_full_disk_keeps_records_in_memory_until_it_has_room(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    full = [sqlite3.OperationalError("database or disk is full"), OSError(errno.ENOSPC, "No space left on device"),
            sqlite3.OperationalError("database or disk is full")]
    backend = _FailingSaves(target.backend(), full)
    gate = _Gate(backend)
    store = JournaledStore(backend, backoff=0.05, max_backoff=0.1)
    store.set_session("c", "s")  # the writer takes this one alone and waits at the gate
    assert gate.entered.wait(5)
    store.record_duration("u1", "报告", 5.0, 1.0)  # written in the same transaction as the failing save
    assert store.remember_message("m1", 1.0)
    store.save(_task("c" * 16))
    gate.opened.set()
    poll_until(lambda: store.health().ok and not store.health().pending, 5, 0.02, lambda: str(store.health()))
    assert _lines(caplog, WRITE_FAILED) == ["任务数据库写入失败，记录暂存内存 (database or disk is full)"]
    assert len(_lines(caplog, RECOVERED)) == 1
    assert not backend.errors and backend.saved == ["c" * 16]
    store.close()
    assert target.rows("SELECT seconds FROM durations") == [(5.0,)]  # the failed tries were rolled back
    assert target.rows("SELECT msg_id FROM seen_messages") == [("m1",)]


def test_the_writer_survives_an_unexpected_error_and_logs_its_traceback(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    backend = _FailingSaves(target.backend(), [RuntimeError("boom"), KeyError("k")])
    store = JournaledStore(backend, backoff=0.05)
    store.save(_task("d" * 16))
    poll_until(lambda: store.health().ok and backend.saved, 5, 0.02, lambda: str(store.health()))
    failures = [r for r in caplog.records if r.getMessage().startswith(("任务数据库写入失败", "任务数据库仍不可用"))]
    assert [r.getMessage() for r in failures] == ["任务数据库写入失败，记录暂存内存 (boom)", "任务数据库仍不可用 ('k')"]
    assert all(r.exc_info for r in failures)  # a bug is logged with its traceback
    store.save(_task("e" * 16))
    assert store.wait_written(5)
    store.close()


def test_reads_that_fail_answer_from_memory_and_mark_the_store_degraded(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    backend = _Wrapped(target.backend())
    gate = _Gate(backend)  # nothing is committed until the gate opens
    store = JournaledStore(backend, backoff=0.05)

    def failing(*args):
        raise sqlite3.OperationalError("disk I/O error")

    for name in ("get", "load", "recent_for_user", "durations", "session_for"):
        setattr(backend, name, failing)
    store.save(_task("f" * 16))
    assert store.get("f" * 16).id == "f" * 16 and store.get("nope") is None
    assert [t.id for t in store.load()] == ["f" * 16] and store.recent_for_user(None, 5)[0].id == "f" * 16
    assert store.remember_message("m1", 1.0) and not store.remember_message("m1", 1.0)
    assert store.durations("x") == [] and store.session_for("c") is None
    assert store.health().reason == "disk I/O error"
    assert _lines(caplog, READ_FAILED) == ["任务数据库读取失败，使用内存中的记录 (disk I/O error)"]
    gate.opened.set()
    store.close()


# ---------------------------------------------------------------- order, coalescing, waiting, closing


def test_several_saves_of_a_task_in_one_flush_write_its_last_state_in_order(target):
    backend = _FailingSaves(target.backend(), [])
    gate = _Gate(backend)
    store = JournaledStore(backend)
    store.save(_task("0" * 16))  # the writer takes this one alone and waits at the gate
    assert gate.entered.wait(5)
    first, second = _task("1" * 16), _task("2" * 16, created_at=1001.0)
    for status in (RUNNING, SUCCEEDED):
        store.save(first)
        first.status = status
    store.save(second)
    store.save(first)
    gate.opened.set()
    assert store.wait_written(5)
    assert backend.saved == ["0" * 16, "2" * 16, "1" * 16]
    assert store.get("1" * 16).status == SUCCEEDED
    store.close()


def test_wait_written_returns_true_once_committed_and_false_on_timeout(target):
    backend = _Wrapped(target.backend())
    gate = _Gate(backend)
    store = JournaledStore(backend)
    store.save(_task("3" * 16))
    assert gate.entered.wait(5)  # the writer thread is writing it, slowly
    started = time.monotonic()
    assert store.wait_written(0.2) is False and 0.15 < time.monotonic() - started < 1
    assert store.health().ok and store.health().pending == 1  # slow is not down
    gate.opened.set()
    assert store.wait_written(5)
    assert target.rows("SELECT id FROM tasks") == [("3" * 16,)]  # visible to another connection
    assert store.wait_written(0)  # nothing pending: True at once
    store.close()


def test_wait_written_writes_at_once_without_waiting_for_the_writer(target):
    store = JournaledStore(target.backend(), flush_delay=30.0)  # the writer would wait 30 s
    store.save(_task("e1" * 8))
    started = time.monotonic()
    assert store.wait_written(5) and time.monotonic() - started < 1
    assert target.rows("SELECT id FROM tasks") == [("e1" * 8,)]
    store.close()


def test_wait_written_that_meets_a_locked_db_says_false_and_leaves_the_retries_to_the_writer(target):
    store = target.open(**FAST, flush_delay=30.0)
    held = target.hold_write_lock()
    try:
        store.save(_task("f1" * 8))
        started = time.monotonic()
        assert store.wait_written(5) is False and time.monotonic() - started < 1.5  # the busy timeout, not 5 s
        assert store.health().reason == target.locked_reason
    finally:
        held.release()
    poll_until(lambda: store.health().ok, 5, 0.02, lambda: str(store.health()))
    assert target.rows("SELECT id FROM tasks") == [("f1" * 8,)]
    store.close()


def test_saves_from_many_threads_end_in_each_tasks_last_state(target):
    store = target.open(**FAST, flush_delay=0.001)

    def work(worker: int) -> None:
        tasks = [_task(f"{worker:02d}{number:014d}", created_at=float(number)) for number in range(20)]
        for step in range(10):
            for task in tasks:
                task.attempts = step
                store.save(task)
            store.record_duration(f"w{worker}", "k", float(step), float(step))
            if worker == 0:
                store.wait_written(5)  # as the intake does, while the others and the writer write too

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.wait_written(5)
    store.close()
    assert target.rows("SELECT DISTINCT attempts FROM tasks") == [(9,)]
    assert len(target.rows("SELECT id FROM tasks")) == 80
    for worker in range(4):  # each thread's durations in the order it recorded them
        seconds = target.rows(f"SELECT seconds FROM durations WHERE user_id = 'w{worker}' ORDER BY finished_at")
        assert seconds == [(float(step),) for step in range(10)]


def test_close_writes_what_is_pending(target):
    store = target.open(**FAST)
    for number in range(50):
        store.save(_task(f"{number:016x}", created_at=float(number)))
    store.close()
    assert len(target.rows("SELECT id FROM tasks")) == 50


def test_close_logs_how_many_records_it_could_not_write(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    store = target.open(**FAST)
    held = target.hold_write_lock()
    try:
        store.save(_task("4" * 16))
        store.set_session("c", "s")
        poll_until(lambda: not store.health().ok, 3, 0.02, lambda: str(store.health()))
        started = time.monotonic()
        store.close(timeout=0.3)
        assert time.monotonic() - started < 1.0
    finally:
        held.release()
    assert _lines(caplog, LOST) == [f"任务数据库关闭时仍有 2 条记录未写入，已丢失 ({target.locked_reason})"]


def test_purge_is_journaled_and_its_count_logged_once_written(target, caplog):
    caplog.set_level(logging.INFO, logger="task_store")
    store = target.open(**FAST)
    store.save(_task("5" * 16, status=FAILED, finished_at=10.0, delivered=True))
    store.save(_task("6" * 16, status=FAILED, finished_at=10.0))  # undelivered: kept
    assert store.purge(100.0, 0.0) == 0
    assert store.wait_written(5)
    assert [t.id for t in store.load()] == ["6" * 16]
    assert "清理任务: 数据库 1 个" in caplog.messages
    store.close()


# ---------------------------------------------------------------- dedup and ids


def test_remember_message_is_answered_from_memory_holding_the_days_msgids_from_the_db(target):
    now = time.time()
    store = target.open(**FAST)
    assert store.remember_message("m1", now) and not store.remember_message("m1", now + 1)
    assert store.remember_message("old", now - 2 * 86400)
    store.close()
    again = target.open(**FAST)  # a restart loads the msgIds of the last day: a redelivery is still caught
    assert not again.remember_message("m1", now + 2) and again.remember_message("m2", now + 2)
    assert again.remember_message("old", now + 2)  # outside the dedup window
    again.purge(0, now + 3)  # the window moves on: memory forgets with the DB (a shared DB once it is written)
    assert again.wait_written(5)
    assert again.remember_message("m1", now + 4)
    again.close()


def test_a_second_task_with_a_used_id_never_overwrites_the_first(target, caplog):
    store = target.backend()
    first = _task("7" * 16, prompt="first", created_at=1.0)
    store.save(first)
    store.save(_task("7" * 16, prompt="intruder", created_at=2.0))
    first.status = SUCCEEDED
    store.save(first)  # later saves of the task itself update its row
    store.close()
    assert target.rows("SELECT prompt, status FROM tasks") == [("first", SUCCEEDED)]
    assert any("任务ID冲突" in message for message in caplog.messages)


def test_the_board_never_hands_out_the_id_of_a_live_task(target, monkeypatch):
    store = target.open(**FAST)
    board = task_board.TaskBoard(store, Router(store), limits=Limits(1, 1), clock=time.time)
    board.adopt(_task("8" * 16))
    ids = iter([uuid.UUID("8" * 32), uuid.UUID("9" * 32)])
    monkeypatch.setattr(task_board.uuid, "uuid4", lambda: next(ids))
    task = board.create("u1", "hi", Route("1", "u1", "c"))
    assert task.id == "9" * 16 and len(task.id) == 16
    store.close()


# ---------------------------------------------------------------- opening the file


def test_a_corrupt_db_file_is_one_clear_line(tmp_path):
    path = tmp_path / "tasks.db"
    path.write_bytes(b"this is not sqlite, just some bytes\n" * 200)
    for open_it in (lambda: open_store(str(path)), lambda: SQLiteTaskStore(str(path), read_only=True)):
        with pytest.raises(StoreError) as error:
            open_it()
        message = str(error.value)
        assert "\n" not in message and str(path) in message
        assert "not a SQLite database" in message and "point TASK_DB elsewhere" in message


def test_a_db_path_under_a_regular_file_is_one_clear_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match=r"cannot create its directory .*afile \(a file is in the way\)") as error:
        open_store(str(tmp_path / "afile" / "tasks.db"))
    assert "\n" not in str(error.value)


def test_a_db_path_that_cannot_be_opened_as_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "tasks.db").mkdir()
    with pytest.raises(StoreError, match=r"tasks.db cannot be opened for reading and writing \(Is a directory\)"):
        open_store(str(tmp_path / "tasks.db"))


def test_read_only_creates_nothing_and_refuses_writes(tmp_path):
    missing = tmp_path / "missing.db"
    with pytest.raises(StoreError, match="missing.db"):
        SQLiteTaskStore(str(missing), read_only=True)
    assert not missing.exists()
    path = tmp_path / "tasks.db"
    writer = SQLiteTaskStore(str(path))
    writer.save(_task("a1" * 8))
    writer.close()
    before = sorted(os.listdir(tmp_path))
    reader = SQLiteTaskStore(str(path), read_only=True)
    assert reader.get("a1" * 8) is not None
    with pytest.raises(StoreError, match="read-only"):
        reader.save(_task("b2" * 8))
    reader.close()
    assert sorted(os.listdir(tmp_path)) == before  # no -wal or -shm left behind (owned by whoever ran it)


def test_read_only_sees_what_a_running_bot_has_committed(tmp_path):
    path = tmp_path / "tasks.db"
    store = open_store(str(path), **FAST)
    store.save(_task("c3" * 8))
    assert store.wait_written(5)
    reader = SQLiteTaskStore(str(path), read_only=True)
    assert [t.id for t in reader.recent_for_user(None, 5)] == ["c3" * 8]
    reader.close()
    store.close()


# ---------------------------------------------------------------- the intake


def test_the_intake_acks_a_batch_after_its_records_are_written_or_the_store_gave_up():
    events: list[str] = []
    answers = iter([True, False])

    def written() -> bool:
        events.append("written")
        return next(answers)

    intake = Intake(lambda data: events.append(f"handled {data['n']}"), written)

    async def send(n: int) -> bool:
        loop = asyncio.get_running_loop()
        recorded = loop.create_future()
        intake.submit({"n": n}, loop, recorded)
        return await asyncio.wait_for(recorded, 5)

    assert asyncio.run(send(1)) is True
    assert asyncio.run(send(2)) is True  # the store is down: ACKed anyway, the record stays in memory
    assert events == ["handled 1", "written", "handled 2", "written"]
    intake.shutdown()


def test_a_budget_count_read_while_a_flush_commits_its_adds_counts_each_once(target):
    """A count is the DB's plus the journal's pending adds: a flush committing those adds between the two reads once
    made a user's 3 calls read as 6 (seen in a stressed run: "已用 6 次，达到每人每天 3 次的上限")."""
    backend = _Wrapped(target.backend())
    store = JournaledStore(backend, flush_delay=30.0)  # nothing is written until the read below makes it so
    for name in ("user_api_calls", "api_calls", "api_calls_by_kind"):
        real = getattr(backend.backend, name)

        def read_after_a_flush(*args, real=real, name=name):
            if name not in flushed:  # the first read of each counter: the adds are committed just before it
                flushed.add(name)
                store.add_api_calls("2026-12", 1, "download", "2026-12-07", "u1")
                assert store.wait_written(5)
            return real(*args)

        setattr(backend, name, read_after_a_flush)
    flushed: set[str] = set()
    for _ in range(3):
        store.add_api_calls("2026-12", 1, "download", "2026-12-07", "u1")
    assert store.user_api_calls("2026-12-07", "u1") == 4  # 3 counted pending, committed with a 4th meanwhile
    assert store.api_calls("2026-12") == 5
    assert store.api_calls_by_kind("2026-12") == {"download": 6}
    store.close()
