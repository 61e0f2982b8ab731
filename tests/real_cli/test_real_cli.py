"""End to end with the REAL CodeBuddy CLI (from the `codebuddy-agent-sdk` wheel) against a fake model server.

`python bot.py` runs as a subprocess, talks to the local DingTalk stand-in, and runs the real CLI, which
talks to `tests/fake_model_server.py` through `CODEBUDDY_BASE_URL`. Nothing leaves 127.0.0.1: with
`DISABLE_TELEMETRY=1` and `CODEBUDDY_SKIP_BUILTIN_MARKETPLACE=1` the CLI does not even look up a DNS name
(checked with strace). Deselect with `-m "not real_cli"`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import CLI_START_TIMEOUT, process_alive, processes_of_this_test, wait_for_process

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

def wait_for_sleeper(tmp_path: Path, bot_pid: int) -> int:
    """The pid (as the host sees it) of the `sleep 300` the CLI's Bash tool started for this test."""
    return wait_for_process(tmp_path, ["sleep", "300"], timeout=CLI_START_TIMEOUT, exclude={bot_pid})


def wait_until_gone(tmp_path: Path, bot_pid: int, timeout: float = 10.0) -> dict[int, list[str]]:
    """What is left of this test's processes, once only the warm CLI (and its sandbox's wrappers) remains."""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid: argv for pid, argv in processes_of_this_test(tmp_path, {bot_pid}).items()
                if "--replay-user-messages" not in argv}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _posts(standin, session: str, count: int, timeout: float = CLI_START_TIMEOUT):
    return standin.wait_for(lambda: len(standin.webhook_posts(session)) >= count and standin.webhook_posts(session),
                            timeout=timeout, message=f"{count} webhook posts")


def test_short_answer_comes_back_through_the_webhook_and_a_follow_up_sees_the_first_turn(
        standin, real_bot, model_server):
    real_bot()
    first = standin.send_bot_message("你好，请介绍一下你自己", sender_staff_id="rc-short")
    posts = _posts(standin, first.session, 2)
    assert posts[0].text.startswith("收到任务，正在处理中")
    assert posts[1].msgtype == "markdown" and "回答: 你好，请介绍一下你自己 (turn 1)" in posts[1].text
    assert not standin.batch_sends()

    follow_up = standin.send_bot_message("那我刚才问了什么？", sender_staff_id="rc-short")
    posts = _posts(standin, follow_up.session, 2)
    assert "回答: 那我刚才问了什么？ (turn 2)" in posts[1].text
    last = model_server.chat_requests()[-1]
    assert last.user_queries == ["你好，请介绍一下你自己", "那我刚才问了什么？"]
    assert last.assistant_texts == ["回答: 你好，请介绍一下你自己 (turn 1)"]
    # What the CLI asks of a model server: streamed chat completions and nothing the fake did not know.
    assert all(r.body.get("stream") is True for r in model_server.chat_requests())
    assert not model_server.unanswered


def test_long_task_answer_is_pushed_through_batch_send(standin, real_bot, model_server):
    bot = real_bot()
    sent = standin.send_bot_message("生成报告: 本周项目进展", sender_staff_id="rc-long")
    ack = standin.wait_for(lambda: standin.webhook_posts(sent.session))[0]
    assert "后台" in ack.text and "任务ID" in ack.text
    standin.expire_webhook(sent.session)  # while it lives the result goes by the webhook (free); expired: pushed
    push = standin.wait_for(lambda: standin.batch_sends(), timeout=CLI_START_TIMEOUT)[0]
    assert push.user_ids == ["rc-long"] and push.msg_key == "sampleMarkdown"
    assert "回答: 生成报告: 本周项目进展 (turn 1)" in push.msg_param["text"]
    assert len(standin.webhook_posts(sent.session)) == 1
    bot.wait_log("任务结果已推送")


def test_cancel_during_a_bash_tool_call_leaves_no_process_behind(standin, real_bot, model_server, tmp_path):
    bot = real_bot()
    standin.send_bot_message("跑一个很慢的命令 [bash:sleep 300]", sender_staff_id="rc-cancel")
    sleeper = wait_for_sleeper(tmp_path, bot.proc.pid)
    cancel = standin.send_bot_message("/cancel", sender_staff_id="rc-cancel")
    reply = _posts(standin, cancel.session, 1, timeout=20)[0]
    assert reply.text.startswith("已取消任务") and "进程仍在退出中" not in reply.text
    assert not process_alive(sleeper)
    assert wait_until_gone(tmp_path, bot.proc.pid) == {}
    bot.wait_log(r"任务 \w+ 失败 \(cancelled\)")


def test_task_timeout_during_a_bash_tool_call_leaves_no_process_behind(standin, real_bot, model_server, tmp_path):
    # Long enough for a real CLI to reach its Bash call on a loaded 2-core machine (12 s was not, in CI).
    bot = real_bot(TASK_TIMEOUT="30")
    sent = standin.send_bot_message("另一个很慢的命令 [bash:sleep 300]", sender_staff_id="rc-timeout")
    sleeper = wait_for_sleeper(tmp_path, bot.proc.pid)
    posts = _posts(standin, sent.session, 2, timeout=60)
    assert "执行超时" in posts[1].text and "工具 Bash" in posts[1].text
    assert not process_alive(sleeper)
    assert wait_until_gone(tmp_path, bot.proc.pid) == {}
    bot.wait_log(r"任务 \w+ 失败 \(timed_out\)")
