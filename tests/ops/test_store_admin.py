"""Operating a PostgreSQL task DB: `bot.py check`'s database line and `bot.py migrate-store` from SQLite, for real."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import pytest

from config import bot_files, load_config
from dingtalk.api_budget import month_of
from dingtalk.route import Route
from ops import doctor
from ops.startup import refuse_a_clock_far_off
from ops.store_admin import check_postgres, clock_problem
from schedules.table import Schedule, ScheduleTable
from store.journal import open_store
from store.postgres import PostgresTaskStore
from store.schema import SCHEMA_VERSION, StoreError
from tasks.task import SUCCEEDED, Task
from tests.conftest import ROOT
from tests.pg_proxy import PgProxy
from usage.table import UsageRow, UsageTable


def _bot(tmp_path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_", "TASK_DB"))}
    return subprocess.run([sys.executable, str(ROOT / "bot.py"), *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_check_says_the_database_answers_its_schema_version_and_the_clock_skew(pg_url):
    ok, detail = check_postgres(pg_url)
    assert ok and f"migrates it to {SCHEMA_VERSION} at start" in detail  # empty: the bot creates it
    PostgresTaskStore(pg_url).close()
    result = doctor.check_task_db(pg_url)
    assert result.ok and f"schema version {SCHEMA_VERSION}; clock skew" in result.detail, result.detail
    ok, detail = check_postgres(pg_url, clock=lambda: time.time() + 30)  # this host's clock 30 s ahead
    assert not ok and "+30" in detail and "NTP" in detail


def test_check_of_an_unreachable_database_fails_without_showing_the_password(pg_server):
    ok, detail = check_postgres(f"postgresql://bot:pw-XYZ-secret@127.0.0.1:{pg_server.port + 1}/tasks", timeout=1)
    assert not ok and "cannot be reached" in detail and "pw-XYZ-secret" not in detail


def test_check_of_a_black_holed_database_ends_within_its_time_limit(pg_url):
    """A server that answered the connection and then answers nothing (black-holed between the connect and the first
    query, through the check's clock): `check` says so in seconds, not never."""
    proxy = PgProxy(pg_url)

    def clock_that_cuts_the_db() -> float:
        proxy.black_hole()
        return time.time()

    try:
        assert check_postgres(proxy.url, timeout=2)[0]
        started = time.monotonic()
        ok, detail = check_postgres(proxy.url, timeout=2, clock=clock_that_cuts_the_db)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert not ok and "cannot be reached" in detail and elapsed < 15, (elapsed, detail)


def test_checks_budget_line_reads_a_postgres_task_db_by_kind(pg_url, tmp_path):
    now = time.time()
    assert doctor.api_budget_line(pg_url, 5000, now).startswith("· API budget: not counted yet")  # no tables yet
    store = open_store(pg_url)
    month = month_of(now)
    store.add_api_calls(month, 3, "download", "2026-11-29", "u1")
    store.add_api_calls(month, 2, "card_stream")
    store.close()
    line = doctor.api_budget_line(pg_url, 5000, now)
    assert line.startswith(f"· API budget: 5 of 5000 metered calls in {month} (0%)") and "no task DB" not in line
    assert line.endswith("; downloads 3, uploads 0, pushes 0, cards 2")
    assert doctor.api_budget_line(str(tmp_path / "none.db"), 5000, now).endswith("(no task DB yet)")


def test_migrate_store_copies_a_sqlite_db_into_postgres_once(tmp_path, pg_url):
    path = tmp_path / "tasks.db"
    store = open_store(str(path))
    for number in range(3):
        store.save(Task(id=f"{number:016x}", user_id="u1", user_name="U", conversation_key="c",
                        route=Route("1", "u1", "c"), prompt=f"p{number}", created_at=float(number), status=SUCCEEDED))
    store.remember_message("m1", time.time())
    store.set_session("c", "s1")
    store.record_duration("u1", "报告", 42.0, time.time())
    store.add_api_calls("2026-11", 17)
    store.add_api_calls("2026-11", 2, "download", "2026-11-29", "u1")
    store.close()
    schedules = ScheduleTable(str(path))
    schedules.add(Schedule(id="ab12cd34", user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", ""),
                           cron="0 9 * * 1-5", words="工作日 09:00", prompt="生成日报", created_at=1.0, next_fire=2.0))
    schedules.close()
    usage = UsageTable(str(path))
    usage.add(UsageRow("0" * 16, "u1", "U", "c", "2026-11-29", 5.0, runs=1, input_tokens=1000, output_tokens=200,
                       api_calls=2))
    usage.close()

    result = _bot(tmp_path, "migrate-store", str(path), "--to", pg_url)
    assert result.returncode == 0, result.stderr
    assert ("copied 3 tasks, 1 seen_messages, 1 durations, 1 sessions, 1 api_calls, 1 api_calls_by_kind, "
            "1 user_api_calls, 1 schedules, 1 usage") in result.stdout
    target = open_store(pg_url)
    assert [t.prompt for t in target.load()] == ["p0", "p1", "p2"] and target.session_for("c") == "s1"
    assert target.durations("报告") == [42.0] and target.api_calls("2026-11") == 19
    assert target.api_calls_by_kind("2026-11") == {"download": 2} and target.user_api_calls("2026-11-29", "u1") == 2
    assert not target.remember_message("m1", time.time())  # a redelivery after the move is still caught
    target.close()
    moved = ScheduleTable(pg_url)
    assert moved.get("ab12cd34").prompt == "生成日报" and moved.get("ab12cd34").route == Route("1", "u1", "")
    moved.close()
    moved_usage = UsageTable(pg_url)
    assert moved_usage.user_totals("u1", day="2026-11-29").tokens == 1200
    assert moved_usage.grouped("2026-11")[0].name == "U"
    moved_usage.close()

    again = _bot(tmp_path, "migrate-store", str(path), "--to", pg_url)
    assert again.returncode == 1 and "already holds 3 task(s)" in again.stderr
    elsewhere = _bot(tmp_path, "migrate-store", str(path), "--to", str(tmp_path / "other.db"))
    assert elsewhere.returncode == 1 and "postgresql://" in elsewhere.stderr


def test_check_never_prints_the_database_password(tmp_path, pg_server):
    url = f"postgresql://bot:pw-SHOWN-nowhere@127.0.0.1:{pg_server.port}/tasks"
    env = {"TASK_DB": url, "DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret", "CODEBUDDY_BIN": "true",
           "DINGTALK_OPENAPI_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens: no request leaves the machine
    out = io.StringIO()
    doctor.run_check(env, dotenv_path=None, out=out, cli_timeout=5)
    text = out.getvalue()
    assert "pw-SHOWN-nowhere" not in text and "postgresql://bot:***@127.0.0.1" in text
    assert "✗ task DB" in text  # no such database and no such user: said, without the password
    # Nor does it reach a CLI run's sandbox arguments (visible to every local user in the process list).
    assert not any("pw-SHOWN-nowhere" in path for path in bot_files(url, "", str(tmp_path / "w")))


def test_a_host_whose_clock_is_a_day_ahead_does_not_start_on_a_shared_db(pg_url, tmp_path):
    """Its dedup window would take every redelivered message for a new one, and its purge would take the other
    hosts' fresh records for old: it refuses to start (exit 2 with the words), one within a minute starts."""
    config = load_config({"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret", "TASK_DB": pg_url,
                          "CODEBUDDY_WORKDIR": str(tmp_path / "w"), "LOG_FILE": ""}, dotenv_path=None)
    store = open_store(pg_url, host="h1")
    refuse_a_clock_far_off(config, store, clock=lambda: time.time() + 30)  # within a minute: starts
    with pytest.raises(StoreError, match=r"clock is \+86400 s off the task DB's .*NTP"):
        refuse_a_clock_far_off(config, store, clock=lambda: time.time() + 86400)
    assert clock_problem(pg_url, clock=lambda: time.time() - 3600).startswith("this host's clock is -3600 s off")
