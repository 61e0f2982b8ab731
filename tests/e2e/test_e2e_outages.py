"""Fault injection, end to end: the task store and delivery fail while users keep writing.

Every fault is real: another process holds the SQLite lock, the store's filesystem fills up (a tiny tmpfs in
a mount namespace of the bot's own), a corrupt or unreadable file is there at start, DingTalk refuses a push
for good. Each test checks that every message sent during the fault is answered exactly once, that the log
says once when the fault starts and once when it ends, what /healthz says meanwhile, and that the bot
recovers without a restart (or, for start-up faults, exits 2 with one line).
"""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops import doctor
from tests.conftest import healthz as _healthz
from tests.conftest import send_pushed
from tests.standin import BATCH_SEND_PATH

pytestmark = pytest.mark.e2e

OUTAGE_START = "任务数据库写入失败"
OUTAGE_END = "任务数据库已恢复"

# Holds SQLite's write lock on the DB from another process for N seconds, like an operator's sqlite3 shell.
LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def _rows(db: Path) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {row["prompt"]: row for row in conn.execute("SELECT * FROM tasks")}
    finally:
        conn.close()


def _lines(bot, phrase: str) -> list[str]:
    return [line for line in bot.log_text().splitlines() if phrase in line]


def _answers(standin, sent) -> list[str]:
    """Texts posted to one message's session webhook, after its acknowledgement."""
    return [p.text or "" for p in standin.webhook_posts(sent.session)][1:]


def _send_during_fault(standin, tag: str) -> list:
    return [standin.send_bot_message(f"你好 {tag} {n}", sender_staff_id=f"{tag}{n}") for n in range(3)]


def _each_answered_once(standin, messages, timeout: float = 30.0) -> None:
    standin.wait_for(lambda: all(len(standin.webhook_posts(m.session)) >= 2 for m in messages), timeout=timeout)
    time.sleep(0.5)  # nothing more comes
    for message in messages:
        posts = [p.text or "" for p in standin.webhook_posts(message.session)]
        assert len(posts) == 2 and "收到任务" in posts[0] and "回答" in posts[1], posts


def test_store_locked_by_another_process_for_15_s_loses_no_message(standin, make_bot, tmp_path):
    bot = make_bot(STATUS_PORT="0")
    port = bot.status_port()
    db = tmp_path / "data" / "tasks.db"
    # A run that is going when the lock is taken: the worker's saves (running, succeeded, delivered) fail.
    during_run = standin.send_bot_message("[sleep=3] 跨越故障的任务", sender_staff_id="w1")
    standin.wait_for(lambda: standin.webhook_posts(during_run.session))
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), "15"], stdout=subprocess.PIPE)
    try:
        assert locker.stdout.readline() == b"locked\n"
        started = time.monotonic()
        messages = _send_during_fault(standin, "lock")
        background = send_pushed(standin, "生成报告 锁住的时候", sender_staff_id="bg")
        _each_answered_once(standin, [*messages, during_run], timeout=14)
        standin.wait_for(lambda: [r for r in standin.batch_sends() if "bg" in r.user_ids], timeout=14)
        assert standin.webhook_posts(background.session)  # its acknowledgement
        bot.wait_log(OUTAGE_START, timeout=5)
        code, body = _healthz(port)
        assert code == 200 and body["status"] == "degraded" and "locked" in body["store_error"], body
        assert body["store_pending"] > 0
        running = doctor.check_running_bot(port)  # what `bot.py check` prints about the running bot
        assert not running.ok and "degraded" in running.detail and "locked" in running.detail, running
        assert time.monotonic() - started < 15, "answers must not wait for the lock"
    finally:
        locker.wait(timeout=30)
    bot.wait_log(OUTAGE_END, timeout=20)
    assert len(_lines(bot, OUTAGE_START)) == 1 and len(_lines(bot, OUTAGE_END)) == 1
    assert _healthz(port)[1]["status"] == "ok"
    rows = _rows(db)
    background_prompt = "生成报告 锁住的时候 [sleep=1]"
    for prompt in ["[sleep=3] 跨越故障的任务", background_prompt, *(f"你好 lock {n}" for n in range(3))]:
        assert rows[prompt]["status"] == "succeeded" and rows[prompt]["delivered"] == 1, dict(rows[prompt])
    assert len([r for r in standin.batch_sends() if "bg" in r.user_ids]) == 1
    # And the bot goes on as before.
    after = standin.send_bot_message("你好 之后", sender_staff_id="z")
    _each_answered_once(standin, [after])


def _fill(directory: Path) -> Path:
    """Write zeros into `directory` until its filesystem is full; the file that holds them."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:  # unbuffered: nothing left to fail at close
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_store_on_a_full_filesystem_loses_no_message(standin, make_bot, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    # The bot runs in a mount namespace of its own where `small` is a 4 MB tmpfs; the test reaches that
    # filesystem through /proc/<pid>/root.
    mount = f"mount -t tmpfs -o size=4m tmpfs {small} && exec \"$@\""
    bot = make_bot(TASK_DB=str(small / "tasks.db"), STATUS_PORT="0",
                   _WRAP=json.dumps(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount, "sh"]))
    port = bot.status_port()
    inside = Path(f"/proc/{bot.proc.pid}/root") / str(small).lstrip("/")
    before = standin.send_bot_message("你好 满之前", sender_staff_id="a")
    _each_answered_once(standin, [before])
    filler = _fill(inside)
    messages = _send_during_fault(standin, "full")
    _each_answered_once(standin, messages)
    line = bot.wait_log(OUTAGE_START, timeout=10)[0]
    assert "full" in line, line
    code, body = _healthz(port)
    assert code == 200 and body["status"] == "degraded", body
    filler.unlink()
    bot.wait_log(OUTAGE_END, timeout=20)
    assert len(_lines(bot, OUTAGE_START)) == 1 and len(_lines(bot, OUTAGE_END)) == 1
    copy = tmp_path / "copy"  # SQLite does not open a path through /proc/<pid>/root: read a copy
    copy.mkdir()
    for name in ("tasks.db", "tasks.db-wal"):
        shutil.copy(inside / name, copy / name)
    rows = _rows(copy / "tasks.db")
    for n in range(3):
        assert rows[f"你好 full {n}"]["status"] == "succeeded" and rows[f"你好 full {n}"]["delivered"] == 1
    assert _healthz(port)[1]["status"] == "ok"


@pytest.mark.parametrize("fault", ["corrupt", "not_a_directory", "unreadable_env"])
def test_start_up_fault_is_one_line_and_exit_2(make_bot, tmp_path, fault):
    overrides = {}
    if fault == "corrupt":
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "tasks.db").write_bytes(b"this is not a SQLite database\n" * 200)
        expected = "tasks.db"
    elif fault == "not_a_directory":
        (tmp_path / "afile").write_text("a file where a directory should be")
        overrides["TASK_DB"] = str(tmp_path / "afile" / "tasks.db")
        expected = "afile"
    else:
        (tmp_path / ".env").write_bytes(b"SYNC_TIMEOUT=\xff\xfe\n")  # not UTF-8: root can read any mode
        expected = ".env"
    bot = make_bot(connect=False, **overrides)
    assert bot.proc.wait(timeout=30) == 2
    output = bot.output.read_text(encoding="utf-8")
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output
    assert expected in output
    assert output.strip() in bot.log_text(), bot.log_text()[-2000:]


def test_permanently_refused_push_is_given_up_shown_and_never_pushed_again(standin, make_bot):
    standin.mark_invalid_staff("gone")
    bot = make_bot()
    sent = send_pushed(standin, "生成报告 送不到", sender_staff_id="gone")
    line = bot.wait_log("已放弃", timeout=20)[0]
    task_id = line.split("task=")[1].split()[0]
    status = standin.send_bot_message(f"/status {task_id}", sender_staff_id="gone")
    text = standin.wait_for(lambda: standin.webhook_posts(status.session))[0].text
    assert "无法送达" in text, text
    attempts = len([r for r in standin.requests if r.path == BATCH_SEND_PATH])
    assert bot.terminate() == 0
    again = make_bot()
    again.wait_log("启动 DingTalk CodeBuddy 机器人")
    time.sleep(2)
    assert len([r for r in standin.requests if r.path == BATCH_SEND_PATH]) == attempts
    assert "重新推送" not in again.log_text().split("启动 DingTalk CodeBuddy 机器人")[-1]
    assert standin.webhook_posts(sent.session)  # the acknowledgement did reach the user


def test_failing_push_is_retried_while_running_then_given_up(standin, make_bot):
    bot = make_bot(DELIVERY_RETRY_WINDOW="1", DELIVERY_GIVE_UP_HOURS="0.003", STATUS_PORT="0")  # 10.8 s
    port = bot.status_port()
    # First: DingTalk is down for a few seconds, past one retry window; the result arrives without a restart.
    standin.fail_next(BATCH_SEND_PATH, status=503, body={"code": "ServiceUnavailable"}, times=4)
    send_pushed(standin, "生成报告 稍后送达", sender_staff_id="late")
    standin.wait_for(lambda: [r for r in standin.batch_sends() if "late" in r.user_ids], timeout=30)
    assert bot.wait_log("秒后重试")
    # Then: it never comes back; the result is given up after DELIVERY_GIVE_UP_HOURS.
    standin.fail_next(BATCH_SEND_PATH, status=503, body={"code": "ServiceUnavailable"}, times=10_000)
    send_pushed(standin, "生成报告 永远送不到", sender_staff_id="never")
    bot.wait_log("秒后重试.*task=", count=2, timeout=15)
    code, body = _healthz(port)
    assert code == 200 and body["status"] == "degraded" and "waiting for another delivery" in body["reasons"][-1]
    bot.wait_log("已放弃", timeout=30)
    assert _healthz(port)[1]["status"] == "ok"
    assert len(_lines(bot, "已放弃")) == 1
