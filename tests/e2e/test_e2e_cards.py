"""AI cards and the API budget, end to end: a real bot subprocess, the real Stream SDK, the stand-in's card APIs."""

from __future__ import annotations

import time

import pytest

from dingtalk.api_budget import LIMIT_NOTICE, month_of
from ops import doctor
from store.sqlite import SQLiteTaskStore
from tests.conftest import CLI_START_TIMEOUT, cli_runs, run_alive
from tests.standin import BATCH_SEND_PATH
from tests.standin_cards import TEMPLATE_ID, CardStandin

pytestmark = pytest.mark.e2e

CARDS = {"DINGTALK_CARD_TEMPLATE_ID": TEMPLATE_ID, "CARD_UPDATE_INTERVAL": "0.3", "SYNC_TIMEOUT": "30"}


def answer_of(prompt: str) -> str:
    """What the fake CLI's [stream=N] answers: five parts, brackets shown as parentheses."""
    shown = prompt.strip().replace("[", "(").replace("]", ")")
    return "\n\n".join(f"第{n}段: {shown}" for n in range(1, 6))


def finished_card(cards: CardStandin, standin, count: int = 1, timeout: float = 30.0):
    """Wait for `count` cards in a final state (3 finished, 5 failed); the newest `count` of them."""
    def ended():
        done = [c for c in cards.card_list() if c.status in ("3", "5")]
        return done if len(done) >= count else None
    return standin.wait_for(ended, timeout=timeout, message=f"{count} finished card(s)")


def result_texts(standin, needle: str) -> list[str]:
    """Messages (webhook replies and pushes) that carry `needle`."""
    return [r.text or "" for r in standin.webhook_posts() + standin.batch_sends() + standin.group_sends()
            if needle in (r.text or "")]


def stored_calls(bot) -> int:
    store = SQLiteTaskStore(bot.env["TASK_DB"], read_only=True)
    try:
        return store.api_calls(month_of(time.time()))
    finally:
        store.close()


def test_answers_stream_into_cards_in_one_to_one_and_group_chats(standin, make_bot):
    cards = CardStandin(standin)
    bot = make_bot(**CARDS)
    single = standin.send_bot_message("[stream=3] 写一份报告", sender_staff_id="alice")
    group = standin.send_bot_message("[stream=3] 群里的报告", sender_staff_id="bob", conversation_type="2")
    done = finished_card(cards, standin, count=2)
    by_space = {c.space.split("//")[1].split(".")[0]: c for c in done}
    assert by_space["IM_ROBOT"].space == "dtv1.card//IM_ROBOT.alice"
    assert by_space["IM_GROUP"].space == f"dtv1.card//IM_GROUP.{group.payload['conversationId']}"
    for card, prompt in ((by_space["IM_ROBOT"], "[stream=3] 写一份报告"),
                         (by_space["IM_GROUP"], "[stream=3] 群里的报告")):
        assert len(card.distinct_updates()) >= 3, card.streams  # the answer was watched being written
        assert card.shown() == answer_of(prompt) and card.status == "3"  # final text = the answer, finished
        assert card.streams[-1].finalize and not card.ignored_updates  # isFinalize first, then the status
        assert any("🔧 工具 Bash" in call.content for call in card.streams)  # the agent's step above the text
        assert not result_texts(standin, "第5段")  # no second copy of the answer as a message
    assert [r.text for r in standin.webhook_posts(single.session)][0].startswith("收到")  # the ack stays
    # Every metered call the stand-in saw was counted in the bot's task DB (the journal writes within ms).
    standin.wait_for(lambda: stored_calls(bot) == cards.metered, timeout=5, message="the counts to agree")
    assert cards.metered >= 2 * (2 + 3 + 1)
    bot.wait_log(r"卡片已完成.*完成", count=2)


def test_stop_button_cancels_for_the_owner_and_is_refused_for_anyone_else(standin, make_bot, tmp_path):
    cards = CardStandin(standin)
    bot = make_bot(**CARDS, ADMIN_USERS="boss")
    standin.send_bot_message("[stream=30] 很长的回答", sender_staff_id="alice")
    card = standin.wait_for(lambda: next((c for c in cards.card_list() if c.distinct_updates()), None), timeout=20)
    run = standin.wait_for(lambda: cli_runs(tmp_path)[-1] if cli_runs(tmp_path) else None)
    cards.send_card_callback(card.track, "mallory")
    bot.wait_log(r"卡片停止按钮被拒绝: 用户 mallory")
    time.sleep(0.5)
    assert run_alive(run) and card.status not in ("3", "5")  # still running, card still streaming
    cards.send_card_callback(card.track, "alice")
    bot.wait_log(r"卡片停止按钮: 用户 alice 取消任务")
    standin.wait_for(lambda: card.status == "5", timeout=15, message="the card to end cancelled")
    assert card.shown() == "已取消"
    bot.wait_log(r"任务 \w+ 失败 \(cancelled\)")  # the turn was interrupted: no part of it goes on
    assert run_alive(run)  # while the CLI process itself stays warm for alice's next message
    assert not result_texts(standin, "第5段")


def test_a_tool_request_puts_approve_and_deny_buttons_on_the_card_and_only_the_owner_may_press_them(
        standin, make_bot, tmp_path):
    cards = CardStandin(standin)
    bot = make_bot(**CARDS)
    group = {"conversation_type": "2", "conversation_id": "cidCardApprovals"}
    standin.send_bot_message("建个文件 [tool=Bash:touch carded.txt && echo done]", sender_staff_id="owner",
                             sender_nick="Olga", **group)
    card = standin.wait_for(lambda: next((c for c in cards.card_list() if c.params.get("pendingApproval")), None),
                            timeout=20, message="the card to show its approve/deny buttons")
    question = card.params["pendingApproval"]
    standin.wait_for(lambda: "等待确认: 工具 Bash" in card.shown(), message="the question on the card")
    assert "touch carded.txt" in card.shown()

    cards.send_card_callback(card.track, "mallory", action="approve")  # someone else in the group
    bot.wait_log(r"拒绝非发起人的卡片确认: 任务 \w+ user=mallory")
    standin.wait_for(lambda: result_texts(standin, "只有发起任务"), message="the refusal line in the chat")
    cards.send_card_callback(card.track, "mallory", action="deny")  # again, within the same minute
    time.sleep(0.5)
    assert len(result_texts(standin, "只有发起任务")) == 1  # one refusal line per person per window
    assert card.params["pendingApproval"] == question and card.status not in ("3", "5")  # still waiting
    assert not list((tmp_path / "workspace").glob("conversations/*/workspace/carded.txt"))

    cards.send_card_callback(card.track, "owner", action="approve")
    bot.wait_log(r"任务 \w+ 的确认请求已被同意 \(user=owner\)")
    finished_card(cards, standin)
    assert "工具 Bash 已执行: touch carded.txt && echo done → done" in card.shown()
    assert card.params["pendingApproval"] == "" and card.status == "3"  # the buttons went with the answer
    assert list((tmp_path / "workspace").glob("conversations/*/workspace/carded.txt"))
    cards.send_card_callback(card.track, "owner", action="deny")  # a late click on a finished card
    bot.wait_log(r"卡片确认按钮: 没有等待确认的请求 user=owner")

    standin.send_bot_message("再来 [tool=Bash:touch refused.txt]", sender_staff_id="owner", **group)
    second = standin.wait_for(lambda: next((c for c in cards.card_list() if c.params.get("pendingApproval")
                                            and c.track != card.track), None), timeout=20)
    assert second.params["pendingApproval"] != question  # each request has its own id
    cards.send_card_callback(second.track, "owner", action="deny")
    finished_card(cards, standin, count=2)
    assert "工具 Bash 被拒绝: the user denied this tool use" in second.shown()
    assert "工具 Bash: 已拒绝" not in second.shown()  # the final card is the answer alone
    assert not list((tmp_path / "workspace").glob("conversations/*/workspace/refused.txt"))
    assert not result_texts(standin, "已执行")  # the answers were the cards, no extra messages


def test_a_card_that_cannot_be_delivered_falls_back_to_one_markdown_answer(standin, make_bot):
    cards = CardStandin(standin)
    make_bot(**CARDS)
    cards.fail_delivery_next()  # HTTP 200, deliverResults[0].success false
    sent = standin.send_bot_message("[stream=1] 卡片失败", sender_staff_id="alice")
    answer = answer_of("[stream=1] 卡片失败")
    standin.wait_for(lambda: result_texts(standin, answer), timeout=20, message="the markdown answer")
    time.sleep(1.0)
    assert result_texts(standin, answer) == [answer]  # exactly one message, by the session webhook
    assert [r.msgtype for r in standin.webhook_posts(sent.session)] == ["text", "markdown"]
    assert not cards.card_list()
    # The streaming API failing mid-answer: the card is dropped and the answer still comes once.
    standin.fail_next("/v1.0/card/streaming", status=500, body={"code": "unknownError"}, times=50)
    standin.send_bot_message("[stream=2] 更新失败", sender_staff_id="alice")
    answer = answer_of("[stream=2] 更新失败")
    standin.wait_for(lambda: result_texts(standin, answer), timeout=30, message="the fallback answer")
    time.sleep(0.5)
    assert result_texts(standin, answer) == [answer]


def test_quota_used_up_means_webhook_only_and_the_user_is_told_once(standin, make_bot):
    cards = CardStandin(standin, quota=1)  # the org has one metered call left this month
    bot = make_bot(**CARDS)
    first = standin.send_bot_message("[stream=1] 第一个", sender_staff_id="alice")
    standin.wait_for(lambda: result_texts(standin, answer_of("[stream=1] 第一个")), timeout=20)
    # The card was made with the last call; its first update was refused: ApiCountLimitForOrg.
    bot.wait_log(r"ApiCountLimitForOrg")
    texts = [r.text or "" for r in standin.webhook_posts(first.session)]
    assert sum(LIMIT_NOTICE in t for t in texts) == 1
    before = cards.metered
    # A background result whose webhook has expired is not pushed (that would be refused too): it waits.
    late = standin.send_bot_message("[sleep=1] 生成报告", sender_staff_id="alice")
    standin.wait_for(lambda: len(standin.webhook_posts(late.session)) >= 1, timeout=10)
    standin.expire_webhook(late.session)
    bot.wait_log(r"结果发送失败.*ApiCountLimitForOrg|结果发送失败.*quota", timeout=20)
    third = standin.send_bot_message("[stream=1] 第三个", sender_staff_id="alice")
    standin.wait_for(lambda: result_texts(standin, answer_of("[stream=1] 第三个")), timeout=20)
    assert cards.metered == before  # no card, no push: not one metered call more
    assert not [r for r in standin.requests if r.path == BATCH_SEND_PATH]
    assert all(LIMIT_NOTICE not in (r.text or "") for r in standin.webhook_posts(third.session))
    standin.wait_for(lambda: stored_calls(bot) == cards.metered, timeout=5, message="the counts to agree")


def test_near_the_budget_no_card_is_started_and_answers_come_by_webhook(standin, make_bot, tmp_path):
    cards = CardStandin(standin)
    db = tmp_path / "data" / "tasks.db"
    db.parent.mkdir(parents=True)
    store = SQLiteTaskStore(str(db))
    store.add_api_calls(month_of(time.time()), 95)  # 95 of 100 spent: past CARDS_OFF_AT (90 %)
    store.close()
    bot = make_bot(**CARDS, DINGTALK_MONTHLY_CALL_BUDGET="100", STATUS_PORT="0")
    sent = standin.send_bot_message("[stream=1] 预算快用完", sender_staff_id="alice")
    answer = answer_of("[stream=1] 预算快用完")
    standin.wait_for(lambda: result_texts(standin, answer), timeout=20)
    assert not cards.card_list() and cards.metered == 0
    assert answer in [r.text for r in standin.webhook_posts(sent.session)]
    bot.wait_log(r"接近预算，任务 \w+ 不使用卡片")
    assert stored_calls(bot) == 95
    month = month_of(time.time())
    assert doctor.api_budget_line(str(db), 100).startswith(f"· API budget: 95 of 100 metered calls in {month} (95%)")


def test_restart_mid_stream_ends_the_orphan_card_and_the_answer_arrives_once(standin, make_bot):
    cards = CardStandin(standin)
    bot = make_bot(**CARDS)
    standin.send_bot_message("[stream=4] 重启中的回答", sender_staff_id="alice")
    orphan = standin.wait_for(lambda: next((c for c in cards.card_list() if c.distinct_updates()), None), timeout=20)
    bot.kill()
    make_bot(**CARDS)
    standin.wait_for(lambda: orphan.status == "5", timeout=20, message="the orphan card to be ended")
    assert orphan.shown() == "上一次回复处理中断" and orphan.streams[-1].finalize
    answer = answer_of("[stream=4] 重启中的回答")
    rerun = standin.wait_for(lambda: next((c for c in cards.card_list() if c.track != orphan.track
                                           and c.status == "3"), None), timeout=40, message="the re-run's card")
    assert rerun.track.endswith("-2") and rerun.shown() == answer
    time.sleep(0.5)
    assert not result_texts(standin, "第5段")  # the card carried the answer: no second copy


@pytest.mark.real_cli
def test_the_real_cli_streams_its_steps_and_answer_into_a_card(standin, real_bot, model_server):
    cards = CardStandin(standin)
    real_bot(**CARDS)
    query = "分三步做 [bash:echo one] [bash:sleep 1] [bash:echo three]"
    sent = standin.send_bot_message(query, sender_staff_id="rc-card")
    card = finished_card(cards, standin, timeout=2 * CLI_START_TIMEOUT)[0]
    answer = model_server.reply_for(model_server.chat_requests()[-1].body)["text"]
    assert "tool done" in answer and card.status == "3" and card.shown() == answer.strip()
    assert len(card.distinct_updates()) >= 3, card.streams  # each step showed while the CLI worked
    assert sum("🔧 工具 Bash" in update for update in card.distinct_updates()) >= 2
    assert not result_texts(standin, "tool done")  # the card carried the answer
    assert standin.webhook_posts(sent.session)[0].text.startswith("收到任务")


@pytest.mark.real_cli
def test_with_partial_messages_the_real_cli_streams_the_answer_word_by_word(standin, real_bot, model_server):
    model_server.chunk_delay = 0.2  # the model writes its answer in deltas, 0.2 s apart
    cards = CardStandin(standin)
    real_bot(**CARDS, CODEBUDDY_EXTRA_ARGS="--include-partial-messages")
    query = "一句比较长的回答请慢慢写出来好让卡片一段一段地显示"
    standin.send_bot_message(query, sender_staff_id="rc-partial")
    card = finished_card(cards, standin, timeout=2 * CLI_START_TIMEOUT)[0]
    answer = f"回答: {query} (turn 1)"
    assert card.shown() == answer and card.status == "3"
    partial = [u for u in card.distinct_updates() if answer not in u]
    assert partial, card.distinct_updates()  # part of the sentence showed before it was whole
