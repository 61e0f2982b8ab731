"""End to end with the REAL CodeBuddy CLI: warm processes, eviction and resumption, cancel by interrupt, and tool
approvals asked of the sender.

The bot logs `启动 CodeBuddy 进程 <pid>` when it starts a CLI and `复用 CodeBuddy 进程 <pid>` when a turn goes to a
warm one; the model server records every request, so "the earlier turn is in the model's request" is checked on
what the CLI actually sent.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.conftest import CLI_START_TIMEOUT, process_alive, processes_of_this_test, wait_for_process
from tests.standin import poll_until

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

GROUP = "cidRealWarmGroup=="


def ask(standin, text: str, user: str, count: int = 2, timeout: float = CLI_START_TIMEOUT, **kwargs) -> list:
    sent = standin.send_bot_message(text, sender_staff_id=user, **kwargs)
    return standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                            and standin.webhook_posts(sent.session), timeout=timeout,
                            message=f"{count} posts for {text!r}")


def started_pids(bot) -> list[int]:
    return [int(m) for m in re.findall(r"启动 CodeBuddy 进程 (\d+)", bot.log_text())]


def reused_pids(bot) -> list[int]:
    return [int(m) for m in re.findall(r"复用 CodeBuddy 进程 (\d+)", bot.log_text())]


def last_queries(model_server, marker: str) -> list[str]:
    requests = [r for r in model_server.chat_requests() if any(marker in query for query in r.user_queries)]
    assert requests, f"no model request for {marker!r}"
    return requests[-1].user_queries


def cli_processes(tmp_path) -> list[int]:
    return [pid for pid, argv in processes_of_this_test(tmp_path).items()
            if "--replay-user-messages" in argv and "--" not in argv]


def test_warm_follow_ups_and_every_way_a_process_ends_keep_the_conversation(standin, real_bot, model_server,
                                                                           tmp_path):
    bot = real_bot(WARM_IDLE_SECONDS="4")
    ask(standin, "第一轮 记住 42", "rw1")
    ask(standin, "第二轮 我说了什么", "rw1")
    assert last_queries(model_server, "第二轮") == ["第一轮 记住 42", "第二轮 我说了什么"]
    assert reused_pids(bot) == started_pids(bot)[:1]  # the follow-up went to the process of the first turn

    bot.wait_log(r"结束 CodeBuddy 进程 \d+: 空闲超过 4 秒", timeout=30)  # idle end
    ask(standin, "第三轮 空闲之后", "rw1")
    assert last_queries(model_server, "第三轮")[:2] == ["第一轮 记住 42", "第二轮 我说了什么"]

    [cli] = cli_processes(tmp_path)
    os.kill(cli, signal.SIGKILL)  # the warm CLI dies between two messages
    standin.wait_for(lambda: not process_alive(cli), timeout=10, message="the killed CLI to be gone")
    ask(standin, "第四轮 进程被杀之后", "rw1")
    assert "第三轮 空闲之后" in last_queries(model_server, "第四轮")

    assert bot.terminate() == 0  # a restart of the bot
    assert cli_processes(tmp_path) == []
    restarted = real_bot()
    ask(standin, "第五轮 重启之后", "rw1")
    assert last_queries(model_server, "第五轮") == ["第一轮 记住 42", "第二轮 我说了什么", "第三轮 空闲之后",
                                                   "第四轮 进程被杀之后", "第五轮 重启之后"]
    assert len(started_pids(restarted)) == 4  # one log file: 3 starts before the restart, 1 after


def test_the_cap_holds_under_ten_conversations_and_an_evicted_one_resumes(standin, real_bot, model_server, tmp_path):
    bot = real_bot(WARM_SESSIONS="2", MAX_WORKERS="2")
    users = [f"rcap{n}" for n in range(10)]
    sent = [standin.send_bot_message(f"会话 {user} 开始", sender_staff_id=user) for user in users]
    most, deadline = 0, time.monotonic() + 240
    while not all(len(standin.webhook_posts(s.session)) >= 2 for s in sent):
        most = max(most, len(cli_processes(tmp_path)))
        assert time.monotonic() < deadline, standin.describe_recent()
        time.sleep(0.1)
    assert most <= 2 + 2  # never more than the warm ones plus one per worker slot
    # Once the turns are over the evicted CLIs exit (a real one takes a moment): WARM_SESSIONS stay.
    poll_until(lambda: len(cli_processes(tmp_path)) <= 2, 30, 0.1,
               lambda: f"more than 2 CLIs alive 30 s after the turns: {cli_processes(tmp_path)}")
    ask(standin, "回到第一个会话", users[0])
    assert last_queries(model_server, "回到第一个会话") == [f"会话 {users[0]} 开始", "回到第一个会话"]
    bot.wait_log(r"结束 CodeBuddy 进程 \d+: (为新会话腾出位置|常驻名额已满)")


def test_cancel_during_a_bash_call_interrupts_and_the_same_process_answers_next(standin, real_bot, model_server,
                                                                              tmp_path):
    bot = real_bot()
    standin.send_bot_message("很慢的命令 [bash:sleep 300]", sender_staff_id="rw3")
    sleeper = wait_for_process(tmp_path, ["sleep", "300"], timeout=CLI_START_TIMEOUT, exclude={bot.proc.pid})
    reply = ask(standin, "/cancel", "rw3", count=1, timeout=20)[0]
    assert reply.text.startswith("已取消任务") and "仍在退出" not in reply.text
    assert not process_alive(sleeper)
    ask(standin, "取消之后的问题", "rw3")
    assert reused_pids(bot) == started_pids(bot)  # interrupted, not killed: the same process answered
    queries = last_queries(model_server, "取消之后的问题")
    assert queries[0] == "很慢的命令 [bash:sleep 300]" and queries[-1] == "取消之后的问题"


def test_a_bash_call_the_mode_does_not_allow_waits_for_the_senders_answer(standin, real_bot, model_server, tmp_path):
    real_bot(CODEBUDDY_PERMISSION_MODE="acceptEdits", APPROVAL_TIMEOUT="8")
    group = {"conversation_type": "2", "conversation_id": GROUP}
    posts = ask(standin, "批准一 [bash:echo approved-by-owner]", "owner", **group)
    assert "CodeBuddy 请求使用工具 Bash" in posts[1].text and "echo approved-by-owner" in posts[1].text
    assert "只有发起任务" in ask(standin, "同意", "mallory", count=1, **group)[0].text
    assert "已同意" in ask(standin, "同意", "owner", count=1, **group)[0].text
    results = standin.wait_for(lambda: [p for p in standin.webhook_posts(posts[0].session) if "回答:" in p.text],
                               timeout=CLI_START_TIMEOUT)
    assert "Stdout: approved-by-owner" in results[0].text

    posts = ask(standin, "批准二 [bash:echo must-not-run]", "owner", **group)
    assert "已拒绝" in ask(standin, "拒绝", "owner", count=1, **group)[0].text
    denied = standin.wait_for(lambda: [p for p in standin.webhook_posts(posts[0].session) if "回答:" in p.text],
                              timeout=CLI_START_TIMEOUT)
    assert "Stdout: must-not-run" not in denied[0].text and "工具结果:" in denied[0].text

    posts = ask(standin, "批准三 [bash:echo nobody-answered]", "owner", **group)
    timed_out = standin.wait_for(lambda: [p for p in standin.webhook_posts(posts[0].session) if "回答:" in p.text],
                                 timeout=CLI_START_TIMEOUT)
    assert "did not answer within 8 seconds" in timed_out[0].text


def test_a_question_nobody_answers_ends_the_real_clis_turn_at_task_timeout(standin, real_bot, model_server, tmp_path):
    bot = real_bot(CODEBUDDY_PERMISSION_MODE="acceptEdits", APPROVAL_TIMEOUT="300", TASK_TIMEOUT="10")
    posts = ask(standin, "没人回答 [bash:echo nobody-answered]", "rw5")
    assert "CodeBuddy 请求使用工具 Bash" in posts[1].text and "echo nobody-answered" in posts[1].text
    timed_out = standin.wait_for(lambda: [p for p in standin.webhook_posts(posts[0].session) if "执行超时" in p.text],
                                 timeout=CLI_START_TIMEOUT)  # long before APPROVAL_TIMEOUT
    assert timed_out[0].text.startswith("任务 ") and "最近步骤: 工具 Bash" in timed_out[0].text
    bot.wait_log(r"任务 \w+ 已结束或被取消，撤回确认请求")
    after = ask(standin, "超时之后的问题", "rw5")  # the interrupted CLI, or a fresh one, answers the next message
    assert "回答:" in after[1].text
