"""End to end: a PostgreSQL task DB that stops answering (issue 23 item 4). The bot process reaches the DB through a
proxy (tests/pg_proxy.py) that black-holes it: every byte dropped, nothing closed, as a stateful firewall that lost
its state, so the connections open then stay silent for good and only the bot's own time limits end them.

While the DB is black-holed messages keep coming: each is ACKed and acknowledged, nothing is lost, the bot does not
exit, and every one is answered exactly once, its record written once the DB answers again. A bot started while its
DB does not answer waits for it (logged each try, /healthz unhealthy, `check` ✗) and starts once it answers; exit 2
stays for what a restart cannot fix.
"""

from __future__ import annotations

import re
import time

import psycopg
import pytest

from ops import doctor
from tests.conftest import healthz as _healthz
from tests.pg_proxy import PgProxy

pytestmark = pytest.mark.e2e

HOLE_SECONDS = 20.0  # how long the DB is black-holed while messages arrive (the case is 60 s)
STATEMENT_TIMEOUT = "3"  # DB_STATEMENT_TIMEOUT: the bot gives up on a silent connection 5 s after sending
OUTAGE_START, OUTAGE_END = "任务数据库写入失败", "任务数据库已恢复"


def _status_port(bot, waiting: bool = False) -> int:
    pattern = (r"状态服务已启动 \(等待任务数据库\): http://127\.0\.0\.1:(\d+)/" if waiting
               else r"状态服务已启动: http://127\.0\.0\.1:(\d+)/")
    return int(re.search(pattern, bot.wait_log(pattern, timeout=30)[-1]).group(1))


def _answers(standin, sent) -> list[str]:
    """What the bot posted to one message's session webhook after its acknowledgement."""
    return [p.text or "" for p in standin.webhook_posts(sent.session)][1:]


def _rows(pg_url: str) -> dict[str, tuple]:
    with psycopg.connect(pg_url) as conn:
        return {prompt: (status, delivered) for prompt, status, delivered
                in conn.execute("SELECT prompt, status, delivered FROM tasks").fetchall()}


@pytest.mark.parametrize("hole", [HOLE_SECONDS])
def test_a_black_holed_task_db_loses_no_message_and_answers_each_once(standin, make_bot, pg_url, hole):
    proxy = PgProxy(pg_url)
    try:
        bot = make_bot(TASK_DB=proxy.url, HOST_NAME="host0", STATUS_PORT="0", DB_STATEMENT_TIMEOUT=STATEMENT_TIMEOUT)
        port = _status_port(bot)
        before = standin.send_bot_message("黑洞之前", sender_staff_id="early")
        standin.wait_for(lambda: _answers(standin, before), timeout=20)

        proxy.black_hole()
        started = time.monotonic()
        sent, number = [], 0
        while time.monotonic() - started < hole:  # a message every second from several users, for `hole` s
            sent.append(standin.send_bot_message(f"黑洞期间 {number}", sender_staff_id=f"user{number % 4}"))
            number += 1
            time.sleep(1.0)
        for message in sent:  # every frame ACKed and every message acknowledged while the DB was still silent
            standin.wait_ack(message.frame_message_id, timeout=5)
            standin.wait_for(lambda m=message: standin.webhook_posts(m.session), timeout=10,
                             message=f"the acknowledgement of {message.payload['text']['content']}")
        assert "收到任务" in (standin.webhook_posts(sent[-1].session)[0].text or "")
        code, body = _healthz(port)
        assert code == 200 and body["status"] == "degraded" and not body["store_writable"], body
        assert bot.proc.poll() is None

        proxy.restore()
        standin.wait_for(lambda: all(_answers(standin, m) for m in sent), timeout=60)
        time.sleep(1.0)  # a second answer would have come by now
        for message in sent:
            answers = _answers(standin, message)
            assert len(answers) == 1 and "回答" in answers[0], (message.payload["text"], answers)
        bot.wait_log(OUTAGE_END, timeout=60)
        prompts = [m.payload["text"]["content"] for m in sent]
        standin.wait_for(lambda: all(_rows(pg_url).get(p) == ("succeeded", 1) for p in prompts), timeout=30,
                         message="every task written as succeeded and delivered")
        assert len(_rows(pg_url)) == len(sent) + 1
        assert bot.proc.poll() is None and bot.terminate() == 0
    finally:
        proxy.close()


def test_the_bot_started_while_its_task_db_does_not_answer_waits_and_starts_once_it_does(standin, make_bot, pg_url):
    proxy = PgProxy(pg_url)
    try:
        proxy.black_hole()
        bot = make_bot(connect=False, TASK_DB=proxy.url, HOST_NAME="host0", STATUS_PORT="0")
        port = _status_port(bot, waiting=True)
        bot.wait_log(r"任务数据库无法连接 \(第 2 次尝试\)", timeout=30)  # each try logged; no exit 2
        code, body = _healthz(port)
        assert code == 503 and body["status"] == "unhealthy" and "task DB unreachable" in body["reasons"][0], body
        running = doctor.check_running_bot(port)  # what `bot.py check` says about it
        assert running is not None and not running.ok and "unhealthy" in running.detail, running
        assert bot.proc.poll() is None
        connects = standin.stream_connects

        proxy.restore()
        standin.wait_connected(timeout=60, connects_at_least=connects + 1)
        bot.wait_log(r"任务数据库已连接 \(第 \d+ 次尝试\)")
        message = standin.send_bot_message("等到数据库之后", sender_staff_id="patient")
        standin.wait_for(lambda: _answers(standin, message), timeout=30)
        assert bot.terminate() == 0
    finally:
        proxy.close()


def test_a_task_db_newer_than_the_bot_still_exits_2_with_one_line(make_bot, pg_url):
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (99)")
    bot = make_bot(connect=False, TASK_DB=pg_url)
    assert bot.proc.wait(timeout=60) == 2  # a restart cannot fix it: systemd's RestartPreventExitStatus=2
    output = bot.output.read_text(encoding="utf-8")
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1 and "99" in output, output
