"""Usage (usage/): the table on SQLite and PostgreSQL, the book writing off the caller's thread and keeping rows while
the DB is away, the quotas with their numbers and resets, /usage's words and the `bot.py usage` report."""

from __future__ import annotations

import csv
import io
import threading
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from codebuddy.run_usage import Usage
from codebuddy_client import RunResult
from dingtalk.route import Route
from ops.usage_report import print_usage
from store.postgres import PostgresTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.task import Task
from usage.book import UsageBook
from usage.commands import UsageCommands
from usage.quotas import Limits, Quotas
from usage.table import UsageRow, UsageTable

TZ = "Asia/Shanghai"
NOON = datetime(2026, 12, 6, 12, 0, tzinfo=ZoneInfo(TZ)).timestamp()


@pytest.fixture(params=["sqlite", "postgres"])
def task_db(request, tmp_path):
    if request.param == "sqlite":
        path = str(tmp_path / "tasks.db")
        SQLiteTaskStore(path).close()  # the task store migrates it (schema version 7)
        return path
    url = request.getfixturevalue("pg_url")
    PostgresTaskStore(url).close()
    return url


def _task(task_id: str, user: str = "u1", name: str = "张三", chat: str = "c1") -> Task:
    return Task(id=task_id, user_id=user, user_name=name, conversation_key=chat, route=Route("1", user, ""),
                prompt="p")


def _result(inp: int, out: int, cost: float = 0.0, cpu: float = 0.5) -> RunResult:
    return RunResult(ok=True, text="t", duration=2.0, usage=Usage(inp, out, 7, 3, cost, "glm", cpu))


def test_rows_add_up_per_task_and_group_by_user_day_and_chat(task_db):
    table = UsageTable(task_db)
    try:
        # A call made for the task before its run ended: a row without names, which the run's row fills in.
        table.add(UsageRow("t1", "u1", day="2026-12-06", finished_at=NOON, api_calls=1))
        table.add(UsageRow("t1", "u1", "张三", "c1", "2026-12-06", NOON, runs=1, input_tokens=1000, output_tokens=200,
                           cost_usd=0.5, model="glm", cpu_seconds=1.5, wall_seconds=3))
        table.add(UsageRow("t1", "u1", "张三", "c1", "2026-12-06", NOON + 5, runs=1, input_tokens=10,
                           output_tokens=2))  # the task run again (a restart): a second run
        table.add(UsageRow("t2", "u2", "<b>李四</b>", "c2", "2026-12-07", NOON + 86400, runs=1, input_tokens=5000,
                           output_tokens=1))
        table.add(UsageRow("t3", "u1", "张三", "c2", "2026-11-30", NOON - 6 * 86400, runs=1, input_tokens=99))
        mine = table.user_totals("u1", day="2026-12-06")
        assert (mine.runs, mine.input_tokens, mine.output_tokens, mine.api_calls) == (2, 1010, 202, 1)
        assert (mine.cost_usd, mine.cpu_seconds, mine.wall_seconds, mine.tokens) == (0.5, 1.5, 3.0, 1212)
        assert table.user_totals("u1", month="2026-11").input_tokens == 99
        users = table.grouped("2026-12", "user")
        assert [(u.key, u.name, u.runs, u.tokens) for u in users] == [("u2", "<b>李四</b>", 1, 5001),
                                                                     ("u1", "张三", 2, 1212)]
        assert [d.key for d in table.grouped("2026-12", "day")] == ["2026-12-06", "2026-12-07"]
        assert {c.key for c in table.grouped("2026-12", "conversation")} == {"c1", "c2"}
        total = table.month_totals("2026-12")
        assert (total.runs, total.tokens, total.api_calls) == (3, 6213, 1)
    finally:
        table.close()


class _FlakyTable:
    """A table whose DB is away until `up` is set."""

    def __init__(self, table: UsageTable) -> None:
        self.table, self.up, self.tries = table, threading.Event(), 0

    def add(self, row: UsageRow) -> None:
        self.tries += 1
        if not self.up.is_set():
            raise OSError("connection refused")
        self.table.add(row)

    def __getattr__(self, name: str):
        return getattr(self.table, name)


def test_the_book_writes_off_thread_keeps_rows_while_the_db_is_away_and_counts_them_meanwhile(tmp_path):
    path = str(tmp_path / "tasks.db")
    SQLiteTaskStore(path).close()
    flaky = _FlakyTable(UsageTable(path))
    book = UsageBook(flaky, TZ, clock=lambda: NOON, retry=0.05).start()  # type: ignore[arg-type]
    try:
        started = time.monotonic()
        book.record_run(_task("t1"), _result(1000, 200, cost=0.25))
        book.record_call("t1", "u1", NOON)
        assert time.monotonic() - started < 0.5  # the worker does not wait for the DB
        while flaky.tries < 3:  # tried again and again meanwhile
            time.sleep(0.02)
        today = book.user_day("u1", "2026-12-06")  # what waits counts already
        assert (today.runs, today.tokens, today.api_calls, today.cost_usd) == (1, 1200, 1, 0.25)
        assert not book.flush(0.1)
        flaky.up.set()
        assert book.flush(5)
        assert flaky.table.user_totals("u1", day="2026-12-06").tokens == 1200
        assert book.user_day("u1", "2026-12-06").tokens == 1200  # not counted twice once written
        assert book.totals["input_tokens"] == 1000 and book.totals["runs"] == 1 and book.totals["api_calls"] == 1
    finally:
        book.stop()
        flaky.table.close()


def test_quotas_refuse_with_the_numbers_and_the_reset_admins_exempt_and_a_run_crossing_finishes():
    book = UsageBook(None, TZ, clock=lambda: NOON)
    active = {"u1": 0}
    quotas = Quotas(book, Limits(daily_tokens=5000), exempt={"admin"}, active=lambda user: active.get(user, 0))
    for number in range(4):
        assert quotas.refusal("u1") == ""
        book.record_run(_task(f"t{number}"), _result(1000, 200))
    assert quotas.refusal("u1") == ""  # 4,800 of 5,000: the next run may start, and may cross
    book.record_run(_task("t5"), _result(1000, 200))
    refusal = quotas.refusal("u1")
    assert "6,000/5,000" in refusal and "12-07 00:00 (Asia/Shanghai)" in refusal
    book.record_run(_task("a1", user="admin"), _result(10**6, 0))
    assert quotas.refusal("admin") == "" and quotas.refusal("u2") == ""
    runs = Quotas(book, Limits(daily_runs=6), active=lambda user: active.get(user, 0))
    assert runs.refusal("u1") == ""
    active["u1"] = 1  # one queued: counts as a run already
    assert "6/6" in runs.refusal("u1")
    cost = Quotas(book, Limits(monthly_cost_usd=1.0))
    book.record_run(_task("t9", user="u3"), _result(1, 1, cost=1.0))
    assert "$1.00/$1.00" in cost.refusal("u3") and "01-01 00:00" in cost.refusal("u3")
    assert Quotas(book, Limits()).refusal("u1") == ""


def test_a_db_that_cannot_be_read_refuses_nobody(caplog):
    class Broken:
        def user_totals(self, *args, **kwargs):
            raise OSError("server closed the connection")

    book = UsageBook(Broken(), TZ, clock=lambda: NOON)  # type: ignore[arg-type]
    assert Quotas(book, Limits(daily_tokens=1)).refusal("u1") == ""
    assert "不检查配额" in caplog.text
    assert "暂时无法读取用量" in UsageCommands(Quotas(book, Limits())).handle("", "u1", False, False)


def test_usage_in_chat_mine_and_all_for_an_admin_in_a_private_chat_only(task_db):
    table = UsageTable(task_db)
    book = UsageBook(table, TZ, clock=lambda: NOON).start()
    try:
        for number in range(3):
            book.record_run(_task(f"t{number}"), _result(1000, 200, cpu=1.0))
        book.record_run(_task("x1", user="u2", name="<script>x</script>"), _result(50, 5))
        assert book.flush(5)
        commands = UsageCommands(Quotas(book, Limits(daily_tokens=5000), exempt={"admin"}))
        mine = commands.handle("", "u1", False, False)
        assert "今天 (12-06): 3 次运行，输入 3,000 / 输出 600 tokens，费用 $0.00，CPU 3.0 秒" in mine
        assert "本月 (2026-12): 3 次运行" in mine and "今日 token 剩 1,400/5,000" in mine
        assert "只有管理员" in commands.handle("all", "u1", False, False)
        assert "单聊" in commands.handle("all", "admin", True, True)
        everyone = commands.handle("all", "admin", True, False)
        assert "本月 (2026-12) 全部用量: 4 次运行，输入 3,050 / 输出 605 tokens" in everyone and "2 位用户" in everyone
        assert everyone.index("张三 (u1)") < everyone.index("<script>x</script> (u2)")
        assert "管理员不受限" in commands.handle("", "admin", True, False)
    finally:
        book.stop()
        table.close()


def test_the_report_sums_to_the_total_and_csv_cells_cannot_be_formulas(task_db, capsys):
    table = UsageTable(task_db)
    try:
        table.add(UsageRow("t1", "u1", "=HYPERLINK(\"x\")", "c1", "2026-12-06", NOON, runs=2, input_tokens=300,
                           output_tokens=30, api_calls=2))
        table.add(UsageRow("t2", "u2", "王五\x1b[31m", "c2", "2026-12-07", NOON, runs=1, input_tokens=700,
                           output_tokens=70, cost_usd=0.125))
    finally:
        table.close()
    out = io.StringIO()
    assert print_usage(task_db, TZ, month="2026-12", as_csv=True, out=out) == 0
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0][:4] == ["USER", "NAME", "RUNS", "INPUT"] and rows[-1][0] == "TOTAL"
    body = rows[1:-1]
    for column in (2, 3, 4, 10):
        assert sum(int(row[column]) for row in body) == int(rows[-1][column])
    assert [row[3] for row in body] == ["700", "300"] and rows[-1][3] == "1000"
    assert any(row[1] == "'=HYPERLINK(\"x\")" for row in body)
    out = io.StringIO()
    assert print_usage(task_db, TZ, month="2026-12", by="day", out=out) == 0
    assert "2026-12-06" in out.getvalue() and "\x1b" not in out.getvalue() and "TOTAL" in out.getvalue()
    assert print_usage(task_db, TZ, month="2026-13") == 2
    assert "--month YYYY-MM" in capsys.readouterr().err


def test_a_users_sums_read_while_a_row_is_being_written_count_it_once(tmp_path):
    path = str(tmp_path / "tasks.db")
    SQLiteTaskStore(path).close()
    table = UsageTable(path)
    committed, release = threading.Event(), threading.Event()

    class CommitThenPause:  # the row is in the DB, and the writer has not yet taken it off its queue
        def add(self, row: UsageRow) -> None:
            table.add(row)
            committed.set()
            release.wait(5)

        def __getattr__(self, name: str):
            return getattr(table, name)

    book = UsageBook(CommitThenPause(), TZ, clock=lambda: NOON).start()  # type: ignore[arg-type]
    try:
        book.record_run(_task("t1"), _result(1000, 200))
        assert committed.wait(5)
        threading.Timer(0.2, release.set).start()
        today = book.user_day("u1", "2026-12-06")
        assert (today.runs, today.tokens) == (1, 1200)  # not twice: the DB's row and the queue's
    finally:
        release.set()
        book.stop()
        table.close()
