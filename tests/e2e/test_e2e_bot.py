"""End to end: the real SDK frames over a real websocket, `python bot.py` as a subprocess, the fake CLI.

Every assertion is on what the local DingTalk stand-in received, or on the bot's log file.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import CLIENT_SECRET, cli_runs, process_alive, replies, run_alive, wait_for_process

pytestmark = pytest.mark.e2e


def _texts(records) -> list[str]:
    return [r.text or "" for r in records]


def test_short_prompt_is_acknowledged_then_answered_through_the_webhook(standin, make_bot):
    bot = make_bot()
    sent = standin.send_bot_message("你好 CodeBuddy", sender_staff_id="u1")
    ack = standin.wait_ack(sent.frame_message_id)
    assert ack["code"] == 200
    posts = replies(standin, sent, 2)
    assert posts[0].startswith("收到任务，正在处理中")
    assert "回答: 你好 CodeBuddy" in posts[1] and standin.webhook_posts(sent.session)[1].msgtype == "markdown"
    assert not standin.batch_sends() and not standin.group_sends()
    bot.wait_log(r"任务 \w+ 完成，耗时: [\d.]+秒")
    bot.wait_log("任务结果已回复")  # logged once the webhook answered, a moment after the post arrived
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d - INFO - 创建任务: \w+, 用户: u1", bot.log_text(), re.M)


def test_long_prompt_runs_in_background_and_is_pushed_with_the_token_header(standin, make_bot):
    bot = make_bot()
    sent = standin.send_bot_message("请生成报告: Q3 销售 [sleep=1.5]", sender_staff_id="u2")
    ack = standin.wait_for(lambda: standin.webhook_posts(sent.session))[0]
    standin.expire_webhook(sent.session)  # a live webhook would carry the result (free); expired: pushed
    assert "后台" in ack.text and "任务ID" in ack.text and "2-5 分钟" in ack.text
    push = standin.wait_for(lambda: standin.batch_sends())[0]
    assert push.user_ids == ["u2"] and push.msg_key == "sampleMarkdown"
    assert "回答: 请生成报告" in push.msg_param["text"]
    assert push.headers["x-acs-dingtalk-access-token"]
    assert push.body["robotCode"] == "test-client-id"
    assert len(standin.webhook_posts(sent.session)) == 1  # the result was pushed, not sent to the webhook
    for phrase in ("检测到长时间任务", "异步任务已启动", "后台任务开始执行", "任务结果已推送"):
        bot.wait_log(phrase)


def test_group_long_prompt_is_pushed_to_the_group_not_the_sender(standin, make_bot):
    make_bot()
    sent = standin.send_bot_message("竞品分析: A vs B [sleep=1.5]", sender_staff_id="u3", conversation_type="2")
    standin.wait_for(lambda: standin.webhook_posts(sent.session))
    standin.expire_webhook(sent.session)
    push = standin.wait_for(lambda: standin.group_sends())[0]
    assert push.open_conversation_id == sent.payload["conversationId"]
    assert "回答:" in push.msg_param["text"] and "竞品分析" in push.msg_param["text"]
    assert not standin.batch_sends()


def test_short_prompt_past_sync_timeout_is_promoted_and_pushed(standin, make_bot):
    bot = make_bot(SYNC_TIMEOUT="1")
    sent = standin.send_bot_message("写个小脚本 [sleep=2.5]", sender_staff_id="u4")
    posts = replies(standin, sent, 2)
    assert "已转入后台继续执行" in posts[1]
    standin.expire_webhook(sent.session)
    push = standin.wait_for(lambda: standin.batch_sends())[0]
    assert "回答: 写个小脚本" in push.msg_param["text"]
    assert len(standin.webhook_posts(sent.session)) == 2
    bot.wait_log("任务结果已推送")


def test_expired_webhook_falls_back_to_push(standin, make_bot):
    make_bot()
    sent = standin.send_bot_message("hello [sleep=1]", sender_staff_id="u5")
    standin.wait_for(lambda: standin.webhook_posts(sent.session))
    standin.expire_webhook(sent.session)
    push = standin.wait_for(lambda: standin.batch_sends())[0]
    assert "回答: hello" in push.msg_param["text"] and push.user_ids == ["u5"]


def test_webhook_expiry_time_is_read_before_replying(standin, make_bot):
    make_bot()
    sent = standin.send_bot_message("hi", sender_staff_id="u6", webhook_ttl_ms=1000)  # expires in 1 s
    push = standin.wait_for(lambda: len(standin.batch_sends()) >= 2 and standin.batch_sends())
    assert push[0].msg_param["content"].startswith("收到任务")
    assert "回答: hi" in push[1].msg_param["text"]
    assert not standin.webhook_posts(sent.session)


def test_failed_run_reaches_the_user_in_plain_words(standin, make_bot):
    bot = make_bot()
    sent = standin.send_bot_message("do it [fail]", sender_staff_id="u7")
    posts = replies(standin, sent, 2)
    assert posts[1].startswith("CodeBuddy 执行失败: 模型调用失败")
    bot.wait_log(r"任务 \w+ 失败")


def test_a_cli_that_cannot_sign_in_is_the_administrators_to_fix_and_logged_once(standin, make_bot):
    bot = make_bot()
    for number in range(2):
        sent = standin.send_bot_message(f"x{number} [error]", sender_staff_id="u8")
        answer = replies(standin, sent, 2)[1]
        assert "机器人的 CodeBuddy 账号尚未设置好，请联系管理员" in answer
        assert "/login" not in answer and "Authentication" not in answer and "FAKESECRET" not in answer
    bot.wait_log(r"任务 \w+ 失败", count=2)
    told = [line for line in bot.log_text().splitlines() if "CodeBuddy CLI 无法登录" in line]
    assert len(told) == 1 and "CODEBUDDY_API_KEY" in told[0] and "Authentication required" in told[0]
    assert "FAKESECRET" not in bot.log_text()


def test_task_timeout_stops_the_turn_and_its_tools_and_tells_the_user(standin, make_bot, tmp_path):
    make_bot(TASK_TIMEOUT="3")
    sent = standin.send_bot_message("loop [sleep=30] [spawn]", sender_staff_id="u9")
    child = wait_for_process(tmp_path, ["sleep", "300"])
    posts = replies(standin, sent, 2, timeout=15)
    assert "执行超时" in posts[1] and "工具 Bash" in posts[1]
    assert not process_alive(child)  # what the turn's tool started is gone
    # The CLI itself was interrupted, not killed: it answers the next message in the same process.
    again = standin.send_bot_message("再来一次", sender_staff_id="u9")
    assert "回答: 再来一次" in replies(standin, again, 2)[1]
    first, second = cli_runs(tmp_path)[:2]
    assert second["run_tag"] == first["run_tag"] and run_alive(first)  # one process (pids repeat across jails)


def test_non_text_messages_get_a_clear_reply_and_audio_uses_recognition(standin, make_bot):
    bot = make_bot()
    picture = standin.send_bot_message(msgtype="picture", content={"downloadCode": "abc"}, sender_staff_id="u10")
    empty = standin.send_bot_message("   ", sender_staff_id="u10")
    rich_content = {"richText": [{"text": "富文本"}, {"downloadCode": "x", "type": "picture"}]}
    rich = standin.send_bot_message(msgtype="richText", sender_staff_id="u10", content=rich_content)
    audio = standin.send_bot_message(msgtype="audio", content={"recognition": "语音问题", "duration": 2},
                                     sender_staff_id="u10")
    assert replies(standin, picture, 1)[0].startswith("附件未能接收:\n- 图片: ")  # an unknown download code
    assert "消息为空" in replies(standin, empty, 1)[0]
    for sent, expected, count in ((rich, "回答: 富文本", 3), (audio, "回答: 语音问题", 2)):  # rich: + the failure
        assert any(expected in text for text in replies(standin, sent, count))
    assert bot.proc.poll() is None


def test_thirty_messages_share_one_token_fetch(standin, make_bot):
    make_bot(MAX_WORKERS="4")
    for number in range(30):
        standin.send_bot_message(f"生成报告 {number}", sender_staff_id=f"user{number % 5}", webhook_ttl_ms=1000)
    standin.wait_for(lambda: len(standin.batch_sends()) >= 30, timeout=60)
    assert standin.token_fetches == 1


def test_burst_is_acknowledged_while_workers_are_busy(standin, make_bot):
    bot = make_bot(MAX_WORKERS="2", MAX_TASKS_PER_USER="2")
    for number in range(2):
        standin.send_bot_message(f"生成报告 [sleep=20] {number}", sender_staff_id=f"busy{number}")
    bot.wait_log("后台任务开始执行", count=2)  # both workers are busy
    burst = [standin.send_bot_message(f"问题 {n}", sender_staff_id=f"user{n % 10}") for n in range(50)]
    start = time.monotonic()
    standin.wait_for(lambda: all(standin.webhook_posts(s.session) for s in burst), timeout=20)
    acked_in = max(standin.webhook_posts(s.session)[0].time for s in burst) - start
    assert all("收到任务" in standin.webhook_posts(s.session)[0].text for s in burst)
    assert acked_in < 5, f"acknowledgements took {acked_in:.1f}s"


def test_log_holds_phrases_but_never_the_secret_or_a_token(standin, make_bot):
    bot = make_bot()
    standin.send_bot_message("生成报告 [error]", sender_staff_id="u11", webhook_ttl_ms=1000)
    standin.wait_for(lambda: standin.batch_sends())
    bot.wait_log("任务结果已推送")
    assert bot.terminate() == 0
    log = bot.log_text()
    tokens = [r.headers.get("x-acs-dingtalk-access-token") for r in standin.requests if r.headers.get(
        "x-acs-dingtalk-access-token")]
    assert tokens
    assert CLIENT_SECRET not in log and not any(token in log for token in tokens)
    assert "FAKESECRET" not in log


def test_missing_credentials_exit_2_with_a_one_line_message(make_bot, standin):
    bot = make_bot(connect=False, DINGTALK_CLIENT_SECRET="")
    assert bot.proc.wait(timeout=15) == 2
    output = bot.output.read_text()
    assert "DINGTALK_CLIENT_SECRET" in output and ".env.example" in output and "Traceback" not in output


def test_invalid_setting_is_a_clear_startup_error(make_bot):
    bot = make_bot(connect=False, SYNC_TIMEOUT="soon")
    assert bot.proc.wait(timeout=15) == 2
    assert "SYNC_TIMEOUT must be a number" in bot.output.read_text()


def test_unwritable_log_file_falls_back_to_stderr(make_bot, standin):
    bot = make_bot(LOG_FILE="/proc/no-such-dir/bot.log")
    sent = standin.send_bot_message("hi there", sender_staff_id="u12")
    standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= 2)
    assert bot.terminate() == 0
    output = bot.output.read_text()
    assert output.count("cannot open LOG_FILE") == 1 and "创建任务" in output




def test_codebuddy_credentials_in_dotenv_reach_the_cli(standin, make_bot, tmp_path):
    (tmp_path / ".env").write_text("CODEBUDDY_API_KEY=from-dotenv-file\n")
    make_bot(CODEBUDDY_FAKE_ECHO="CODEBUDDY_API_KEY")
    sent = standin.send_bot_message("key? [echo-env]", sender_staff_id="u13")
    posts = replies(standin, sent, 2)
    # It reached the CLI: the answer quoted it, and the bot replaced the exact value before sending it.
    assert "CODEBUDDY_API_KEY=***" in posts[1] and "from-dotenv-file" not in posts[1]
