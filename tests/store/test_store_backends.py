"""Both store backends: schema versions created and migrated at start, the org's API budget counter, and the
PostgreSQL store shared by several processes (one msgId makes one task; concurrent budget adds all count; a cancel
another host asked for is never written back to "not asked").

PostgreSQL here is a real server (tests/pg_fixture.py); SQLite a real file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from dingtalk.route import Route
from store.journal import open_backend, open_store
from store.memory import MemoryTaskStore
from store.postgres import PostgresTaskStore, is_postgres_url, safe_url
from store.schema import PG_STEPS, SCHEMA_VERSION, SQLITE_STEPS, StoreError
from tasks.task import Task

FAST = {"busy_timeout": 0.2, "backoff": 0.05, "max_backoff": 0.2}


def _task(task_id: str) -> Task:
    return Task(id=task_id, user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", "c"),
                prompt="p", created_at=1000.0)


def test_a_new_db_is_created_at_the_current_schema_version_and_reopening_keeps_it(target):
    store = target.backend()
    assert store.schema_version() == SCHEMA_VERSION
    store.close()
    again = target.backend()
    assert again.schema_version() == SCHEMA_VERSION and target.rows("SELECT version FROM schema_version") == [
        (SCHEMA_VERSION,)]
    again.close()


def test_a_db_made_by_a_newer_bot_is_refused_with_one_line(target):
    target.backend().close()
    if target.kind == "sqlite":
        db = sqlite3.connect(target.url)
        db.execute("UPDATE schema_version SET version = 99")
        db.commit()
        db.close()
    else:
        with psycopg.connect(target.url) as conn:
            conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError) as caught:
        target.backend()
    assert "schema version 99, newer than this bot's" in str(caught.value) and "\n" not in str(caught.value)


def test_a_sqlite_db_from_before_the_version_table_is_migrated_and_keeps_its_tasks(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SQLITE_STEPS[1])  # what the bot made before schema versions (no api_calls either)
    db.execute("INSERT INTO sessions VALUES ('c', 's')")
    db.commit()
    db.close()
    store = open_store(str(path), **FAST)
    assert store.session_for("c") == "s"
    store.add_api_calls("2026-11", 3)
    assert store.wait_written(5) and store.api_calls("2026-11") == 3
    store.close()
    assert sqlite3.connect(path).execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_api_calls_are_counted_per_month_by_every_store():
    memory = MemoryTaskStore()
    memory.add_api_calls("2026-11", 2)
    memory.add_api_calls("2026-11", 5)
    assert memory.api_calls("2026-11") == 7 and memory.api_calls("2026-12") == 0


def test_api_calls_are_counted_by_kind_and_by_user_and_day_and_kept_across_a_restart(target):
    store = target.open(**FAST)
    for kind, day, user in (("download", "2026-11-29", "u1"), ("download", "2026-11-29", "u1"),
                            ("batchSend", "2026-11-30", "u1"), ("card_create", "", "")):
        store.add_api_calls("2026-11", 1, kind, day, user)
    assert store.user_api_calls("2026-11-29", "u1") == 2  # read before the journal was written: DB plus journal
    store.close()
    again = target.open(**FAST)
    assert again.api_calls("2026-11") == 4
    assert again.api_calls_by_kind("2026-11") == {"download": 2, "batchSend": 1, "card_create": 1}
    assert again.api_calls_by_kind("2026-12") == {}
    assert [again.user_api_calls(day, user) for day, user in (("2026-11-29", "u1"), ("2026-11-30", "u1"),
                                                             ("2026-11-29", "u2"))] == [2, 1, 0]
    again.purge(finished_before=datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp(), seen_before=0)  # Beijing's 30th
    assert again.wait_written(10)
    assert again.user_api_calls("2026-11-29", "u1") == 0 and again.user_api_calls("2026-11-30", "u1") == 1
    assert again.api_calls_by_kind("2026-11")["download"] == 2  # the month's counters stay
    again.close()


def test_api_calls_added_by_several_processes_at_once_all_count(target):
    stores = [target.open(**FAST) for _ in range(3)]  # each one like a bot process of its own

    def add(store) -> None:
        for _ in range(40):
            store.add_api_calls("2026-11", 1, "download", "2026-11-29", "u1")
        assert store.wait_written(30)  # three writers contend for one row: generous on a loaded machine

    threads = [threading.Thread(target=add, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(store.api_calls("2026-11") == 120 for store in stores)
    assert all(store.user_api_calls("2026-11-29", "u1") == 120 for store in stores)  # one user, three hosts
    for store in stores:
        store.close()
    assert target.rows("SELECT calls FROM api_calls") == [(120,)]
    assert target.rows("SELECT calls FROM api_calls_by_kind") == target.rows("SELECT calls FROM user_api_calls") == [
        (120,)]


def test_one_msgid_delivered_to_several_processes_is_new_to_exactly_one(pg_url):
    stores = [open_store(pg_url, **FAST) for _ in range(3)]
    winners: dict[str, list[int]] = {}
    start = threading.Barrier(len(stores))
    now = time.time()

    def take(number: int) -> None:
        start.wait()
        store = stores[number]
        new = [f"msg-{message}" for message in range(60) if store.remember_message(f"msg-{message}", now)]
        assert store.wait_written(10)  # memory answered at once; the DB's unique key decides once it is written
        for msg_id in new:
            if not store.taken_elsewhere(msg_id):
                winners.setdefault(msg_id, []).append(number)

    threads = [threading.Thread(target=take, args=(number,)) for number in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(winners) == sorted(f"msg-{m}" for m in range(60))
    assert all(len(hosts) == 1 for hosts in winners.values()), winners
    for store in stores:
        store.close()


def test_a_task_saved_by_one_process_is_read_by_another(pg_url):
    writer, reader = open_store(pg_url, **FAST), open_store(pg_url, **FAST)
    writer.save(_task("ab" * 8))
    assert writer.wait_written(5)
    assert reader.get("ab" * 8).prompt == "p" and [t.id for t in reader.recent_for_user("u1", 5)] == ["ab" * 8]
    writer.close()
    reader.close()


def test_a_cancel_another_host_asked_for_stays_on_the_row_whatever_the_holder_writes_later(pg_url):
    holder = open_store(pg_url, host="b", **FAST)
    task = _task("cd" * 8)
    holder.save(task)
    assert holder.wait_written(5)
    with psycopg.connect(pg_url) as conn:  # host a's /cancel (its NOTIFY may be lost: b finds it on the row)
        conn.execute("UPDATE tasks SET cancel_requested = 1 WHERE id = %s", (task.id,))
    task.last_step = "工具 Bash"  # b, not told yet, writes the task again
    holder.save(task)
    assert holder.wait_written(5)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT cancel_requested, last_step FROM tasks").fetchall() == [(1, "工具 Bash")]
    holder.close()


def test_an_unreachable_postgres_is_one_line_without_the_password(pg_server):
    url = f"postgresql://bot:s3cret-pw@127.0.0.1:{pg_server.port + 1}/tasks"
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        PostgresTaskStore(url, connect_timeout=1.0)
    message = str(caught.value)
    assert "s3cret-pw" not in message and "bot:***@127.0.0.1" in message and "\n" not in message
    assert "start PostgreSQL" in message and time.monotonic() - started < 10
    assert safe_url("postgresql://u@h/db") == "postgresql://u@h/db"


def test_read_only_postgres_creates_nothing_and_refuses_writes(pg_url):
    with pytest.raises(StoreError, match="no tasks table"):
        PostgresTaskStore(pg_url, read_only=True)
    PostgresTaskStore(pg_url).close()
    reader = PostgresTaskStore(pg_url, read_only=True)
    with pytest.raises(StoreError, match="read-only"):
        reader.save(_task("cd" * 8))
    assert reader.count() == 0
    reader.close()


def test_a_key_value_task_db_opens_postgresql_not_a_sqlite_file_named_after_it(pg_url, tmp_path, monkeypatch):
    """libpq's `host=… dbname=…` form is PostgreSQL too; a file name with `=` in it stays a SQLite file."""
    parts = psycopg.conninfo.conninfo_to_dict(pg_url)
    dsn = " ".join(f"{key}={value}" for key, value in parts.items())
    monkeypatch.chdir(tmp_path)
    backend = open_backend(dsn, host="h1", busy_timeout=1.0)
    try:
        assert isinstance(backend, PostgresTaskStore)
        backend.save(_task("cd" * 8))
    finally:
        backend.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM tasks WHERE id = %s", ("cd" * 8,)).fetchone()[0] == 1
    assert list(tmp_path.iterdir()) == []  # no SQLite file named after the DSN
    assert not is_postgres_url("./data/a=b.db") and not is_postgres_url("tasks.db")


_OLD_TASK = ("INSERT INTO tasks (id, user_id, route, prompt, status, created_at) VALUES ('t5', 'u1', "
             "'{\"conversation_type\": \"1\", \"user_id\": \"u1\", \"conversation_id\": \"\"}', 'old prompt', "
             "'succeeded', 1000.0)")


def test_a_version_5_db_is_migrated_to_7_keeping_its_tasks_and_gaining_schedules_the_label_and_usage(target):
    if target.kind == "sqlite":
        db = sqlite3.connect(target.url)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for step in range(1, 6):
            db.executescript(SQLITE_STEPS[step])
        db.execute("INSERT INTO schema_version VALUES (5)")
        db.execute(_OLD_TASK)
        db.commit()
        db.close()
    else:
        with psycopg.connect(target.url) as conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            for step in range(1, 6):
                conn.execute(PG_STEPS[step])
            conn.execute("INSERT INTO schema_version VALUES (5)")
            conn.execute(_OLD_TASK)
    store = target.backend()
    assert store.schema_version() == 7 == SCHEMA_VERSION
    old = store.get("t5")
    assert old.prompt == "old prompt" and old.label == ""
    labelled = _task("t6")
    labelled.label = "⏰ 定时任务 ab12cd34"
    store.save(labelled)
    assert store.get("t6").label == "⏰ 定时任务 ab12cd34"
    store.close()
    assert target.rows("SELECT count(*) FROM schedules") == [(0,)]
    assert target.rows("SELECT count(*) FROM usage") == [(0,)]
