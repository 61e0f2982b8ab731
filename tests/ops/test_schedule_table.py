"""`bot.py schedules`: every schedule of the task DB as a table, control characters escaped, secrets hidden."""

from __future__ import annotations

import io

from dingtalk.route import Route
from ops.schedule_table import print_schedules, schedules_line
from schedules.forms import local_time
from schedules.table import Schedule, ScheduleTable
from store.sqlite import SQLiteTaskStore

NINE = 1_796_000_400.0


def test_the_table_lists_every_schedule_with_its_next_fire_in_the_zone(tmp_path):
    path = str(tmp_path / "tasks.db")
    SQLiteTaskStore(path).close()
    table = ScheduleTable(path)
    table.add(Schedule(id="ab12cd34", user_id="alice", user_name="A", conversation_key="c",
                       route=Route("1", "alice", ""), cron="0 9 * * 1-5", words="工作日 (周一至周五) 09:00",
                       prompt="生成日报 \x1b[31m token=S3CRET", created_at=NINE - 86400, next_fire=NINE))
    table.add(Schedule(id="ef56ab78", user_id="bob", user_name="B", conversation_key="g",
                       route=Route("2", "bob", "cidG"), cron="0 * * * *", words="每小时整点", prompt="x",
                       created_at=NINE, next_fire=NINE, paused=True))
    table.close()
    out = io.StringIO()
    assert print_schedules(path, "Asia/Shanghai", out=out, secrets=("S3CRET",)) == 0
    text = out.getvalue()
    assert text.splitlines()[0].split() == ["ID", "USER", "CHAT", "WHEN", "NEXT", "FIRES", "SKIPPED", "LAST", "PROMPT"]
    assert "ab12cd34" in text and "工作日 (周一至周五) 09:00" in text and "paused" in text and "cidG" in text
    assert "\x1b" not in text and "S3CRET" not in text and "***" in text
    assert "2 schedule(s), oldest first, times in Asia/Shanghai" in text


def test_no_db_is_one_line_and_exit_1(tmp_path, capsys):
    assert print_schedules(str(tmp_path / "none.db"), "Asia/Shanghai") == 1
    assert "no task DB at" in capsys.readouterr().err


def test_check_shows_the_count_and_the_next_fire(tmp_path):
    path = str(tmp_path / "tasks.db")
    assert schedules_line(path, "Asia/Shanghai") == "· schedules: none (no task DB yet)"
    SQLiteTaskStore(path).close()
    assert schedules_line(path, "Asia/Shanghai") == "· schedules: none"
    table = ScheduleTable(path)
    for number, (next_at, paused) in enumerate(((NINE + 3600, False), (NINE, True), (NINE + 60, False))):
        table.add(Schedule(id=f"s{number}", user_id="u", user_name="U", conversation_key="c",
                           route=Route("1", "u", ""), cron="* * * * *", words="w", prompt="p", created_at=NINE,
                           next_fire=next_at, paused=paused))
    table.close()
    assert schedules_line(path, "Asia/Shanghai") == (
        f"· schedules: 3 (1 paused); next fire {local_time(NINE + 60, 'Asia/Shanghai')} Asia/Shanghai, schedule s2")
