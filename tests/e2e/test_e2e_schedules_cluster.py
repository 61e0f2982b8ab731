"""End to end: three bot processes on one PostgreSQL task DB fire an every-minute schedule exactly once a minute over
three minutes (each process's firing thread claims with `FOR UPDATE SKIP LOCKED`; the stand-in spreads the Stream
messages over them at random, as DingTalk does)."""

from __future__ import annotations

import re

import psycopg
import pytest

from tests.conftest import replies
from tests.e2e.test_e2e_cluster import _cluster

pytestmark = pytest.mark.e2e


def test_three_processes_on_one_postgresql_fire_each_minute_exactly_once(standin, make_bot, tmp_path, pg_url):
    bots, _ = _cluster(make_bot, standin, tmp_path, pg_url, SCHEDULE_MIN_INTERVAL="60",
                       DINGTALK_MONTHLY_CALL_BUDGET="200000")
    sent = standin.send_bot_message('/every "* * * * *" 集群简报', sender_staff_id="alice", sender_nick="Alice")
    created = replies(standin, sent, 1, timeout=30)[0]
    schedule_id = re.search(r"已创建定时任务 (\w+)", created).group(1)

    def fires() -> list[str]:
        return [push.text for push in standin.batch_sends() if f"⏰ 定时任务 {schedule_id}" in (push.text or "")]

    standin.wait_for(lambda: len(fires()) >= 3, timeout=4 * 60)  # three minutes, and the processes' start
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT id, host, created_at FROM tasks WHERE label LIKE %s ORDER BY created_at",
                            (f"⏰ 定时任务 {schedule_id}%",)).fetchall()
    minutes = [int(created_at // 60) for _, _, created_at in rows]
    assert len(minutes) == len(set(minutes)), rows  # one task a minute, whichever host claimed it
    assert len(fires()) == len(rows) and all("回答: 集群简报" in text for text in fires())  # one answer each
    fired = sum(len(bot.wait_log(f"定时任务 {schedule_id} 触发", count=0)) for bot in bots)
    assert fired == len(rows)
