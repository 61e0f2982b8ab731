"""End to end: scheduled prompts through `python bot.py`, the stand-in and the fake CLI, on the real clock (every
minute, SCHEDULE_MIN_INTERVAL=60): a fire's answer is pushed naming its schedule within 70 s; the schedule survives a
restart and fires again; a sender removed from ALLOWED_USERS is not run (the schedule pauses, its owner told);
/unschedule stops it."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.conftest import replies

pytestmark = pytest.mark.e2e

FIRE_WAIT = 75  # a fire each minute, the firing thread looks every 2 s: within 70 s, a little slack for a loaded host


def say(standin, text: str, user: str) -> str:
    sent = standin.send_bot_message(text, sender_staff_id=user, sender_nick=user.title())
    return replies(standin, sent, 1, timeout=30)[0]


def pushed_to(standin, user: str, phrase: str) -> list[str]:
    return [push.text for push in standin.batch_sends() if push.user_ids == [user] and phrase in (push.text or "")]


def metric(bot, name: str, label: str = "") -> int:
    """One sample of the bot's /metrics (its host label aside): the one named `name` carrying `label`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{bot.status_port()}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{name}(?:\{{[^}}]*{re.escape(label)}[^}}]*\}})? (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else -1


def test_a_schedule_fires_each_minute_survives_a_restart_and_stops_when_unscheduled(standin, make_bot):
    settings = {"SCHEDULE_MIN_INTERVAL": "60", "ALLOWED_USERS": "alice,carol,bob", "SHUTDOWN_GRACE": "1",
                "STATUS_PORT": "0", "DINGTALK_MONTHLY_CALL_BUDGET": "200000"}  # every minute: 43200 calls a month
    bot = make_bot(**settings)
    created = say(standin, '/every "* * * * *" 每分钟简报', "alice")
    assert created.startswith("已创建定时任务 ") and "(Asia/Shanghai)" in created and "接下来三次" in created, created
    alice = re.search(r"已创建定时任务 (\w+)", created).group(1)
    carol = re.search(r"已创建定时任务 (\w+)", say(standin, '/every "* * * * *" carol 的简报', "carol")).group(1)
    assert alice in say(standin, "/schedules", "alice") and carol not in say(standin, "/schedules", "alice")

    label = f"⏰ 定时任务 {alice} (cron"
    first = standin.wait_for(lambda: pushed_to(standin, "alice", label), timeout=FIRE_WAIT)
    assert "回答: 每分钟简报" in first[0]
    bot.wait_log(f"定时任务 {alice} 触发")
    standin.wait_for(lambda: metric(bot, "dingtalk_bot_schedule_fires_total", 'outcome="run"') >= 2,
                     timeout=FIRE_WAIT)  # alice's and carol's first fires
    assert metric(bot, "dingtalk_bot_schedules") == 2
    assert metric(bot, "dingtalk_bot_schedule_fires_total", 'outcome="skipped"') == 0

    assert bot.terminate() == 0  # the schedule lives in the task DB; carol is no longer allowed after the restart
    bot = make_bot(**{**settings, "ALLOWED_USERS": "alice,bob"})
    standin.wait_for(lambda: len(pushed_to(standin, "alice", label)) >= 2, timeout=FIRE_WAIT)
    paused = standin.wait_for(lambda: pushed_to(standin, "carol", "已暂停"), timeout=FIRE_WAIT)
    assert f"定时任务 {carol}" in paused[0] and "ALLOWED_USERS" in paused[0]
    carol_answers = len(pushed_to(standin, "carol", "回答"))  # the fire before the restart, when she was allowed

    assert say(standin, f"/unschedule {alice}", "alice").startswith(f"已取消定时任务 {alice}")
    bob = re.search(r"已创建定时任务 (\w+)", say(standin, '/every "* * * * *" bob 的简报', "bob")).group(1)
    standin.wait_for(lambda: pushed_to(standin, "bob", f"⏰ 定时任务 {bob}"), timeout=FIRE_WAIT)
    assert len(pushed_to(standin, "alice", label)) == 2  # bob's minute came and alice's schedule did not fire
    assert len(pushed_to(standin, "carol", "回答")) == carol_answers  # paused: no run for a removed sender
    assert len(pushed_to(standin, "carol", "已暂停")) == 1  # told once
    assert f"定时任务 {carol} 跳过" in bot.log_text()
