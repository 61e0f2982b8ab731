"""End to end: warm CLI processes per conversation, and CodeBuddy asking the sender before it uses a tool.

The bot runs as a subprocess against the stand-in; the fake CLI speaks the stream-json input protocol (a turn per
stdin message, `interrupt`, `can_use_tool`). Every fake CLI process has its own run tag (logged with each turn), so
"the same process" is the same tag: pids repeat across sandboxes, each one's CLI being pid 2 of its namespace.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tasks.request_view import SHOWN_PAGES
from tests.conftest import cli_runs, process_alive, processes_of_this_test, replies, wait_for_process
from tests.fake_codebuddy import write_content
from tests.tasks.test_request_view import joined_pages, shown_value

pytestmark = pytest.mark.e2e

GROUP = "cidWarmGroup=="


def cli_processes(tmp_path) -> dict[int, list[str]]:
    """The fake CLI processes of this test alive now (not the sandbox's wrappers, not tool commands)."""
    return {pid: argv for pid, argv in processes_of_this_test(tmp_path).items()
            if "--replay-user-messages" in argv and "--" not in argv}


def answer(standin, text: str, user: str, count: int = 2, timeout: float = 20.0, **kwargs) -> str:
    sent = standin.send_bot_message(text, sender_staff_id=user, **kwargs)
    return replies(standin, sent, count, timeout=timeout)[count - 1]


def runs_of(tmp_path, marker: str) -> list[dict]:
    return [run for run in cli_runs(tmp_path) if marker in run["prompt"]]


def wait_until(predicate, timeout: float = 10.0, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message or "condition not met")
        time.sleep(0.05)


def test_a_follow_up_is_answered_by_the_same_warm_process_with_the_earlier_turn(standin, make_bot, tmp_path):
    bot = make_bot()
    assert "回答: 第一问" in answer(standin, "第一问", "w1")
    follow_up = answer(standin, "第二问", "w1")
    assert "(turn 2, earlier: 第一问)" in follow_up
    first, second = runs_of(tmp_path, "第一问")[0], runs_of(tmp_path, "第二问")[0]
    assert second["run_tag"] == first["run_tag"] and second["session"] == first["session"]
    assert len(cli_processes(tmp_path)) == 1  # kept alive between the two messages, one for the conversation
    bot.wait_log(r"复用 CodeBuddy 进程 \d+")


def test_the_cap_holds_under_ten_conversations_and_evicted_ones_resume_from_disk(standin, make_bot, tmp_path):
    bot = make_bot(WARM_SESSIONS="2", MAX_TASKS_PER_USER="1")
    users = [f"cap{n}" for n in range(10)]
    sent = [standin.send_bot_message(f"你好 {user}", sender_staff_id=user) for user in users]
    most = 0
    deadline = time.monotonic() + 60
    while not all(len(standin.webhook_posts(s.session)) >= 2 for s in sent):
        most = max(most, len(cli_processes(tmp_path)))
        assert time.monotonic() < deadline, standin.describe_recent()
        time.sleep(0.05)
    assert most <= 4  # MAX_WORKERS processes at most, even while every slot runs a turn
    wait_until(lambda: len(cli_processes(tmp_path)) <= 2, message=f"{cli_processes(tmp_path)}")
    time.sleep(0.5)
    assert len(cli_processes(tmp_path)) <= 2  # only WARM_SESSIONS stay warm once the turns are over
    # The first conversation was evicted long ago: its follow-up starts a new process on the same session.
    follow_up = answer(standin, "还记得吗", users[0])
    assert f"(turn 2, earlier: 你好 {users[0]})" in follow_up
    old, new = runs_of(tmp_path, f"你好 {users[0]}")[0], runs_of(tmp_path, "还记得吗")[0]
    assert new["run_tag"] != old["run_tag"] and new["session"] == old["session"]
    bot.wait_log(r"结束 CodeBuddy 进程 \d+: (为新会话腾出位置|常驻名额已满)")


def test_idle_end_a_killed_process_and_a_restart_all_keep_the_conversation(standin, make_bot, tmp_path):
    bot = make_bot(WARM_IDLE_SECONDS="1")
    answer(standin, "一 记住苹果", "w3")
    bot.wait_log(r"结束 CodeBuddy 进程 \d+: 空闲超过 1 秒", timeout=40)  # logged as the stop begins
    wait_until(lambda: cli_processes(tmp_path) == {}, message="the idle process to exit")
    assert "earlier: 一 记住苹果" in answer(standin, "二 空闲之后", "w3")

    [cli] = wait_until(lambda: list(cli_processes(tmp_path)))
    os.kill(cli, signal.SIGKILL)  # the warm process dies between two messages
    # All of it, the sandbox's bwrap (the bot's own child) too, so the bot sees it dead when the next message comes.
    wait_until(lambda: not process_alive(cli) and not processes_of_this_test(tmp_path, exclude={bot.proc.pid}),
               message="the killed CLI and its sandbox wrappers to exit")
    assert "earlier: 二 空闲之后" in answer(standin, "三 进程被杀之后", "w3")
    bot.wait_log("结束 CodeBuddy 进程 \\d+: 进程已退出")

    assert bot.terminate() == 0
    restarted = make_bot()
    assert "(turn 4, earlier: 三 进程被杀之后)" in answer(standin, "四 重启之后", "w3")
    tags = {run["run_tag"] for run in cli_runs(tmp_path)}
    assert len(tags) == 4  # a new process each time, the same session throughout
    assert len({run["session"] for run in cli_runs(tmp_path)}) == 1
    restarted.terminate()
    assert cli_processes(tmp_path) == {}  # a stopping bot ends its warm processes


def test_cancel_interrupts_the_turn_kills_its_tool_and_keeps_the_process_warm(standin, make_bot, tmp_path):
    make_bot()
    standin.send_bot_message("慢命令 [sleep=60] [spawn-session]", sender_staff_id="w4")
    tool = wait_for_process(tmp_path, ["sleep", "300"])
    cancel = standin.send_bot_message("/cancel", sender_staff_id="w4")
    reply = replies(standin, cancel, 1, timeout=15)[0]
    assert reply.startswith("已取消任务") and "仍在退出" not in reply
    assert not process_alive(tool)  # the fake CLI leaves its tool running on interrupt: the bot killed it
    assert "回答: 下一条" in answer(standin, "下一条", "w4")
    slow, after = runs_of(tmp_path, "慢命令")[0], runs_of(tmp_path, "下一条")[0]
    assert after["run_tag"] == slow["run_tag"]


def test_a_tool_the_mode_does_not_allow_is_asked_of_the_sender_and_only_the_sender_may_approve(
        standin, make_bot, tmp_path):
    bot = make_bot()
    group = {"conversation_type": "2", "conversation_id": GROUP}
    sent = standin.send_bot_message("建个文件 [tool=Bash:touch approved.txt && echo done]", sender_staff_id="owner",
                                    sender_nick="Olga", **group)
    question = replies(standin, sent, 2)[1]
    assert "CodeBuddy 请求使用工具 Bash" in question and "touch approved.txt" in question and "@Olga" in question
    status = answer(standin, "/status", "owner", count=1, **group)
    assert "等待你的确认" in status

    refused = answer(standin, "同意", "mallory", count=1, **group)
    assert "只有发起任务" in refused
    again = standin.send_bot_message("拒绝", sender_staff_id="mallory", **group)  # within the same minute
    time.sleep(1.0)
    assert standin.webhook_posts(again.session) == []  # one refusal line per person per window, no more
    assert len(standin.webhook_posts(sent.session)) == 2  # still waiting: mallory's presses changed nothing

    approved = standin.send_bot_message("同意", sender_staff_id="owner", **group)
    assert "已同意" in replies(standin, approved, 1)[0]
    result = replies(standin, sent, 3)[2]
    assert "工具 Bash 已执行: touch approved.txt && echo done → done" in result
    assert list((tmp_path / "workspace").glob("conversations/*/workspace/approved.txt"))
    bot.wait_log(r"任务 \w+ 的确认请求已被同意 \(user=owner\)")


def test_deny_denies_the_tool_and_no_answer_is_a_denial_after_approval_timeout(standin, make_bot, tmp_path):
    make_bot(APPROVAL_TIMEOUT="2")
    sent = standin.send_bot_message("删掉 [tool=Bash:touch denied.txt]", sender_staff_id="w6")
    replies(standin, sent, 2)  # the acknowledgement and the question
    answer(standin, "拒绝", "w6", count=1)
    assert "工具 Bash 被拒绝: the user denied this tool use" in replies(standin, sent, 3)[2]

    waited = standin.send_bot_message("再试 [tool=Bash:touch late.txt]", sender_staff_id="w6")
    assert "the user did not answer within 2 seconds" in replies(standin, waited, 3, timeout=30)[2]
    assert not list((tmp_path / "workspace").glob("conversations/*/workspace/*.txt"))


def test_a_question_nobody_answers_ends_its_task_as_timed_out_at_task_timeout(standin, make_bot, tmp_path):
    bot = make_bot(APPROVAL_TIMEOUT="300", TASK_TIMEOUT="4")
    sent = standin.send_bot_message("等人确认 [tool=Bash:touch never.txt]", sender_staff_id="w10")
    replies(standin, sent, 2)  # the acknowledgement and the question
    started = time.monotonic()
    result = replies(standin, sent, 3, timeout=30)[2]
    # The wait counts towards TASK_TIMEOUT (4 s), long before APPROVAL_TIMEOUT (300 s): the worker is free again.
    assert "执行超时" in result and time.monotonic() - started < 20
    bot.wait_log(r"任务 \w+ 已结束或被取消，撤回确认请求")
    assert "回答: 下一条" in answer(standin, "下一条", "w10")  # a fresh message, not an answer to the old question
    assert not list((tmp_path / "workspace").glob("conversations/*/workspace/never.txt"))


def test_two_tool_requests_at_once_are_asked_one_after_the_other_each_answered_by_its_own_reply(
        standin, make_bot, tmp_path):
    bot = make_bot()
    sent = standin.send_bot_message("两个命令 [tools-at-once=echo first|echo second]", sender_staff_id="w11")
    first = replies(standin, sent, 2)[1]
    assert "echo first" in first and "echo second" not in first
    time.sleep(0.5)
    assert len(standin.webhook_posts(sent.session)) == 2  # the second request waits its turn, unseen
    approve = standin.send_bot_message("同意", sender_staff_id="w11")
    double_tap = standin.send_bot_message("同意", sender_staff_id="w11")  # the same 同意 again at once
    assert "已同意" in replies(standin, approve, 1)[0]
    not_taken = ("这条回复发出时下一个确认请求还没送到", "这个确认请求刚刚已经回答过了")  # whichever it met first
    assert replies(standin, double_tap, 1)[0].startswith(not_taken)
    second = replies(standin, sent, 3)[2]
    assert "echo second" in second and "echo first" not in second
    time.sleep(1.0)  # read it: a reply within FOLLOW_UP_GRACE of a question that follows another is not taken
    assert "已拒绝" in answer(standin, "拒绝", "w11", count=1)
    result = replies(standin, sent, 4)[3]
    assert "工具 Bash 已执行: echo first → first" in result
    assert "工具 Bash 被拒绝: the user denied this tool use" in result and "→ second" not in result
    bot.wait_log(r"任务 \w+ 的确认请求已被拒绝 \(user=w11\)")
    assert not runs_of(tmp_path, "同意")  # no 同意 became a prompt


def test_a_request_past_approval_max_waits_is_denied_and_ends_the_task_with_the_reason(standin, make_bot, tmp_path):
    bot = make_bot(APPROVAL_MAX_WAITS="1")
    sent = standin.send_bot_message("两步 [tool=Bash:echo one] [tool=Bash:touch two.txt]", sender_staff_id="w12")
    assert "echo one" in replies(standin, sent, 2)[1]
    answer(standin, "同意", "w12", count=1)
    result = replies(standin, sent, 3, timeout=30)[2]
    assert result.startswith("CodeBuddy 执行失败: 确认次数已达上限: 本任务已向你确认 1 次") and "Bash" in result
    assert not any("touch two.txt" in post for post in replies(standin, sent, 3))  # never asked
    assert not list((tmp_path / "workspace").glob("conversations/*/workspace/two.txt"))
    bot.wait_log(r"任务 \w+ 的确认请求超过上限 \(1 次\)，已拒绝并结束任务: Bash")
    assert "回答: 之后" in answer(standin, "之后", "w12")  # the conversation goes on


def test_a_long_write_is_shown_whole_in_several_messages_and_its_further_pages_on_request(standin, make_bot, tmp_path):
    make_bot()
    sent = standin.send_bot_message("写文件 [write=big.txt:700]", sender_staff_id="w13", sender_nick="Wu")
    shown = replies(standin, sent, 1 + SHOWN_PAGES)[1:]
    total = int(re.search(r"共 (\d+) 页", shown[-1]).group(1))
    assert total > SHOWN_PAGES and shown[0].startswith(f"(1/{total})\nCodeBuddy 请求使用工具 Write")
    assert "文件:\n│ big.txt" in shown[0] and "@Wu 回复「同意」允许" in shown[-1]
    pages = [*shown[:-1], shown[-1].split("\n\n⚠️")[0]]
    for number in range(SHOWN_PAGES + 1, total + 1):
        pages.append(answer(standin, f"详情 {number}", "w13", count=1).split(f"\n\n(第 {number} 页")[0])
    assert shown_value(joined_pages(pages), "内容") == write_content("big.txt", 700)  # every character reached the chat
    assert not runs_of(tmp_path, "详情")  # page requests are not prompts
    assert "已同意" in answer(standin, "同意", "w13", count=1)
    assert "工具 Write 已写入: big.txt" in replies(standin, sent, 2 + SHOWN_PAGES)[-1]
    [written] = (tmp_path / "workspace").glob("conversations/*/workspace/big.txt")
    assert written.read_text(encoding="utf-8") == write_content("big.txt", 700)


def test_a_question_from_the_agent_is_answered_by_the_senders_next_message(standin, make_bot, tmp_path):
    make_bot()
    sent = standin.send_bot_message("帮我建库 [ask=用哪个数据库？]", sender_staff_id="w7")
    question = replies(standin, sent, 2)[1]
    assert "CodeBuddy 有问题问你" in question and "用哪个数据库？" in question
    standin.send_bot_message("PostgreSQL 吧", sender_staff_id="w7")
    assert "用户回答: PostgreSQL 吧" in replies(standin, sent, 3)[2]
    assert not runs_of(tmp_path, "PostgreSQL 吧")  # the answer was not run as a prompt of its own


def test_several_questions_at_once_are_answered_one_by_one_by_a_numbered_reply(standin, make_bot, tmp_path):
    make_bot()
    sent = standin.send_bot_message("建表 [ask=用哪个数据库？|主键用什么？]", sender_staff_id="w9")
    question = replies(standin, sent, 2)[1]
    assert "1. 用哪个数据库？" in question and "2. 主键用什么？" in question and "按编号逐行回答" in question
    standin.send_bot_message("1. PostgreSQL\n2. bigserial", sender_staff_id="w9")
    assert "用户回答: PostgreSQL / bigserial" in replies(standin, sent, 3)[2]


def test_approvals_off_denies_at_once(standin, make_bot, tmp_path):
    make_bot(APPROVALS="off")
    result = answer(standin, "跑 [tool=Bash:touch x.txt]", "w8")
    assert "工具 Bash 被拒绝: tool approvals are off" in result


def test_a_task_waiting_for_its_sender_is_not_moved_to_the_background(standin, make_bot, tmp_path):
    make_bot(SYNC_TIMEOUT="2")
    sent = standin.send_bot_message("等我确认 [tool=Bash:echo ok]", sender_staff_id="w9")
    replies(standin, sent, 2)  # the acknowledgement and the question
    time.sleep(3)  # past SYNC_TIMEOUT while the question waits
    answer(standin, "同意", "w9", count=1)
    posts = replies(standin, sent, 3)
    assert "工具 Bash 已执行: echo ok → ok" in posts[2]
    assert not any("后台" in post for post in posts) and not standin.batch_sends()
