"""End to end: every metered DingTalk call asks the budget, and one user's day has a limit (USER_DAILY_API_CALLS).

`python bot.py` against the local stand-in (tests/standin.py counts every request to a metered path: pushes, card
calls, file downloads and uploads) with the fake CLI: a message of ten pictures from a user allowed three calls a day
makes three calls, and the user is told which pictures were not fetched and why, by the free session webhook.
"""

from __future__ import annotations

import re
import time

import pytest

from dingtalk.api_budget import day_reset
from tests.conftest import cli_runs, replies, send_pushed
from tests.standin_files import DOWNLOAD_PATH, send_picture, send_rich_text

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


def test_ten_pictures_from_a_user_allowed_three_calls_make_three_and_the_user_is_told_why(standin, make_bot,
                                                                                          tmp_path):
    bot = make_bot(USER_DAILY_API_CALLS="3", DINGTALK_OAPI_ENDPOINT=standin.base_url, USER_RATE_LIMIT="100")
    sent = send_rich_text(standin, ["看看这些图", *[PNG] * 10], sender_staff_id="pic-user")
    told, ack, answer = replies(standin, sent, 3, timeout=30)
    # One line per reason: which pictures were not fetched, and why (the numbers, when the day turns).
    day = f"你今天的钉钉接口调用已用 3 次，达到每人每天 3 次的上限，{day_reset(time.time())} 恢复"
    assert told.splitlines() == [
        f"未下载第 4–5 个附件 (图片 2 张): {day}。",
        "未下载第 6–10 个附件 (图片 5 张): 每条消息最多接收 5 个附件，请分开发送。"]
    assert ack.startswith("收到任务") and "回答:" in answer
    run = standin.wait_for(lambda: [r for r in cli_runs(tmp_path) if "看看这些图" in r["prompt"]])[0]
    assert len(re.findall(r"- attachments/[\w.-]+\.png \(图片", run["prompt"])) == 3  # the three it could fetch
    metered = standin.metered_requests()
    assert [r.path for r in metered] == [DOWNLOAD_PATH] * 3  # counted at DingTalk's side: three calls in all

    # The answer of a background task whose webhook expired cannot be pushed today: nothing metered is tried, and
    # the user's next webhook reply says why once.
    pushed = send_pushed(standin, "生成报告: 本周", sender_staff_id="pic-user")
    bot.wait_log(r"任务 \w+ 结果发送失败 \(\d+ 秒后重试\): 你今天的钉钉接口调用已用 3 次")
    assert len(standin.metered_requests()) == 3 and replies(standin, pushed, 1)[0].startswith("收到任务")
    status = replies(standin, standin.send_bot_message("/status", sender_staff_id="pic-user"), 1)[0]
    assert "钉钉接口调用: 本月 3/5000 次 (下载 3、上传 0、推送 0、卡片 0)；你今天 3/3 次" in status
    assert "（提示：你今天的钉钉接口调用已用 3 次，达到每人每天 3 次的上限" in status

    # The day's count is in the task DB: a restarted bot still refuses, and tells the user at once.
    assert bot.terminate() == 0
    make_bot(USER_DAILY_API_CALLS="3", DINGTALK_OAPI_ENDPOINT=standin.base_url)
    again = send_picture(standin, PNG, sender_staff_id="pic-user")
    assert replies(standin, again, 1)[0].startswith("未下载第 1 个附件 (图片 1 张): 你今天的钉钉接口调用已用 3 次")
    other = send_picture(standin, PNG, sender_staff_id="someone-else")  # another user's day is their own
    assert replies(standin, other, 1)[0] == "已收到 图片.png，请告诉我要做什么。"
    assert len(standin.metered_requests()) == 4
