"""Three processes on one PostgreSQL task DB claim due fires at the same moments: each fire goes to exactly one
(`FOR UPDATE SKIP LOCKED` in one transaction), over a controlled clock of three minutes of every-minute schedules."""

from __future__ import annotations

import threading

from dingtalk.route import Route
from schedules.forms import next_fire
from schedules.table import Schedule, ScheduleTable
from store.postgres import PostgresTaskStore

TZ = "Asia/Shanghai"
START = 1_796_000_000.0 - 1_796_000_000.0 % 60  # a whole minute


def test_three_hosts_claim_each_minute_of_each_schedule_exactly_once(pg_url):
    PostgresTaskStore(pg_url).close()  # the task store migrates the DB (schema version 6)
    hosts = [ScheduleTable(pg_url) for _ in range(3)]
    for number in range(4):
        hosts[0].add(Schedule(id=f"s{number}", user_id="u1", user_name="U", conversation_key="c",
                              route=Route("1", "u1", ""), cron="* * * * *", words="every minute", prompt="p",
                              created_at=START, next_fire=next_fire("* * * * *", START, TZ)))
    claimed: list[tuple[str, float, int]] = []
    lock = threading.Lock()
    for minute in range(1, 4):
        now = START + minute * 60 + 1
        barrier = threading.Barrier(3)

        def claim(table: ScheduleTable, index: int, now: float = now, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            for _ in range(3):  # each host looks a few times, as its ticks would
                for got in table.claim_due(now, TZ):
                    with lock:
                        claimed.append((got.schedule.id, got.due, index))

        threads = [threading.Thread(target=claim, args=(table, index)) for index, table in enumerate(hosts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    fires = sorted((schedule_id, due) for schedule_id, due, _ in claimed)
    assert fires == sorted((f"s{n}", START + m * 60) for n in range(4) for m in range(1, 4))  # each once
    assert all(table.get("s0").fires == 3 for table in hosts)
    for table in hosts:
        table.close()
