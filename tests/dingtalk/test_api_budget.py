"""The monthly DingTalk call budget (dingtalk/api_budget.py) and the stores that keep its count."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from dingtalk.api_budget import (
    LIMIT_NOTICE,
    ORG_LIMIT_REFUSAL,
    ApiBudget,
    day_of,
    day_reset,
    describe_month,
    month_elapsed,
    month_of,
    spend_by_group,
)
from dingtalk.route import Route
from dingtalk_sender import Delivery, DingTalkSender, SpendRefused
from store.journal import open_store
from store.memory import MemoryTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.delivery import Outbox
from tests.standin_files import DOWNLOAD_PATH


def at(text: str) -> float:
    """Epoch seconds of a UTC time written "2026-11-16 04:00"."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_month_is_dingtalks_beijing_month():
    assert month_of(at("2026-11-30 15:59")) == "2026-11"
    assert month_of(at("2026-11-30 16:00")) == "2026-12"  # midnight in Beijing
    assert month_elapsed(at("2026-11-15 16:00")) == pytest.approx(0.5)


@pytest.mark.parametrize("make_store", [MemoryTaskStore, lambda: SQLiteTaskStore(":memory:")],
                         ids=["memory", "sqlite"])
def test_stores_count_calls_per_month(make_store):
    store = make_store()
    store.add_api_calls("2026-11", 2)
    store.add_api_calls("2026-11", 3)
    store.add_api_calls("2026-12", 1)
    assert (store.api_calls("2026-11"), store.api_calls("2026-12"), store.api_calls("2027-01")) == (5, 1, 0)


def test_the_count_survives_a_restart_of_the_journaled_store(tmp_path):
    path = str(tmp_path / "tasks.db")
    store = open_store(path)
    budget = ApiBudget(store, 100, clock=Clock(at("2026-11-10 00:00")))
    for _ in range(7):
        budget.record("batchSend")
    assert store.api_calls("2026-11") == 7  # read before the journal was written: DB plus journal
    store.close()
    again = open_store(path)
    assert ApiBudget(again, 100, clock=Clock(at("2026-11-20 00:00"))).spent() == 7
    again.close()


def test_a_new_month_starts_from_zero_and_lifts_the_limit():
    clock = Clock(at("2026-11-29 00:00"))
    budget = ApiBudget(MemoryTaskStore(), 100, clock=clock)
    budget.record("card_stream")
    budget.limit_hit()
    assert budget.limited() and not budget.push_allowed(urgent=True) and not budget.cards_allowed()
    clock.now = at("2026-12-01 00:00")
    assert budget.spent() == 0 and not budget.limited() and budget.push_allowed(urgent=True)


def test_log_lines_at_half_four_fifths_and_the_whole_budget(caplog):
    budget = ApiBudget(MemoryTaskStore(), 10, clock=Clock(at("2026-11-29 00:00")))
    with caplog.at_level(logging.WARNING, logger="api_budget"):
        for _ in range(12):
            budget.record("batchSend")
    shares = [r.getMessage() for r in caplog.records if "月度预算" in r.getMessage()]
    assert len(shares) == 3 and ["50%" in shares[0], "80%" in shares[1], "100%" in shares[2]] == [True] * 3


def test_card_updates_stretch_as_the_spend_runs_ahead_of_the_line_then_cards_stop():
    clock = Clock(at("2026-11-15 16:00"))  # half the month gone: the line allows 500 of 1000
    store = MemoryTaskStore()
    budget = ApiBudget(store, 1000, clock=clock)
    assert budget.card_interval(1.5) == 1.5 and budget.cards_allowed()
    store.add_api_calls("2026-11", 500)
    budget = ApiBudget(store, 1000, clock=clock)
    assert budget.card_interval(1.5) == pytest.approx(1.5)  # on the line
    store.add_api_calls("2026-11", 250)  # 1.5 times ahead
    budget = ApiBudget(store, 1000, clock=clock)
    assert budget.card_interval(1.5) == pytest.approx(1.5 * 1.5 ** 2) and budget.cards_allowed()
    store.add_api_calls("2026-11", 160)  # 910: past CARDS_OFF_AT
    budget = ApiBudget(store, 1000, clock=clock)
    assert not budget.cards_allowed() and budget.push_allowed(urgent=False)
    store.add_api_calls("2026-11", 50)  # 960: notices are no longer pushed, results still are
    budget = ApiBudget(store, 1000, clock=clock)
    assert not budget.push_allowed(urgent=False) and budget.push_allowed(urgent=True)


def test_the_limit_notice_is_handed_out_once():
    budget = ApiBudget(MemoryTaskStore(), 100, clock=Clock(at("2026-11-29 00:00")))
    assert budget.take_limit_notice() == ""
    budget.limit_hit()
    budget.limit_hit()
    assert budget.take_limit_notice() == LIMIT_NOTICE
    assert budget.take_limit_notice() == ""


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, route, text, **kwargs):
        self.sent.append(text)
        return Delivery(ok=True, path="webhook" if route.session_webhook else "batchSend")


def test_near_the_budget_a_notice_is_not_pushed_but_still_goes_by_a_live_webhook():
    store = MemoryTaskStore()
    clock = Clock(at("2026-11-29 00:00"))
    store.add_api_calls(month_of(clock.now), 96)
    sender = RecordingSender()
    outbox = Outbox(sender, clock=clock, mark_delivered=lambda t: None, mark_undeliverable=lambda t: None)
    outbox.budget = ApiBudget(store, 100, clock=clock)
    expired = Route("1", "u1", "cid")
    alive = Route("1", "u1", "cid", session_webhook="http://hook", webhook_expires_ms=int(clock.now * 1000) + 600_000)
    assert not outbox.notice(expired, "进度").result().ok
    assert outbox.notice(alive, "进度").result().ok and sender.sent == ["进度"]
    outbox.shutdown()


# ---------------------------------------------------------------- every metered call asks; a user's day


def test_the_bots_day_is_beijings_and_turns_at_its_midnight():
    assert day_of(at("2026-11-29 15:59")) == "2026-11-29"
    assert day_of(at("2026-11-29 16:00")) == "2026-11-30"
    assert day_reset(at("2026-11-29 15:59")) == "北京时间 11-30 00:00"


def test_a_user_past_the_daily_limit_is_refused_with_the_numbers_and_the_reset_and_admins_are_not():
    clock = Clock(at("2026-11-29 03:00"))
    store = MemoryTaskStore()
    budget = ApiBudget(store, 5000, user_daily_limit=3, exempt=("boss",), clock=clock)
    assert [budget.spend("download", "u1") for _ in range(3)] == ["", "", ""]
    why = budget.spend("download", "u1")
    assert why == "你今天的钉钉接口调用已用 3 次，达到每人每天 3 次的上限，北京时间 11-30 00:00 恢复"
    assert store.user_api_calls("2026-11-29", "u1") == 3 and store.api_calls("2026-11") == 3  # refused: not counted
    assert all(budget.spend("batchSend", "boss") == "" for _ in range(5)) and budget.room("boss") is None
    assert budget.spend("batchSend", "u2") == "" and budget.room("u2") == 2 and budget.spend("card_create") == ""
    assert budget.short_of("u2", 2) == "" and budget.short_of("u2", 3).startswith("你今天的钉钉接口调用已用 1 次")
    clock.now = at("2026-11-29 16:00")  # midnight in Beijing: a new day
    assert budget.spend("download", "u1") == "" and budget.used_today("u1") == 1


def test_a_users_day_is_counted_across_hosts_and_restarts(tmp_path):
    path, clock = str(tmp_path / "tasks.db"), Clock(at("2026-11-29 03:00"))
    here, there = open_store(path), open_store(path)  # two bot processes on one task DB
    first = ApiBudget(here, 5000, user_daily_limit=3, clock=clock)
    second = ApiBudget(there, 5000, user_daily_limit=3, clock=clock)
    assert first.spend("download", "u1") == first.spend("download", "u1") == ""
    assert here.wait_written(5)
    assert second.spend("batchSend", "u1") == ""
    assert there.wait_written(5)  # another host sees a call once its journal is written (~20 ms later)
    assert second.spend("batchSend", "u1") != "" and first.spend("download", "u1") != ""
    here.close()
    there.close()
    again = open_store(path)
    restarted = ApiBudget(again, 5000, user_daily_limit=3, clock=clock)
    assert restarted.used_today("u1") == 3 and restarted.spend("card_stream", "u1").startswith("你今天")
    again.close()


def test_downloads_and_files_wait_near_the_month_budget_and_after_the_org_limit_nothing_is_spent():
    clock = Clock(at("2026-11-29 00:00"))
    store = MemoryTaskStore()
    store.add_api_calls(month_of(clock.now), 96)
    budget = ApiBudget(store, 100, clock=clock)
    assert budget.spend("download", "u1") == ("本组织本月的钉钉接口调用已用 96 次，接近月度预算 100 次，"
                                              "附件和文件暂停收发，下月恢复")
    assert budget.spend("media_upload", "u1") != "" and budget.spend("batchSend", "u1") == ""  # a result still goes
    budget.limit_hit()
    assert budget.spend("batchSend", "u1") == budget.spend("card_create", "u1") == ORG_LIMIT_REFUSAL
    assert store.api_calls(month_of(clock.now)) == 97


def test_a_refused_push_is_told_once_in_the_users_next_webhook_reply_a_refused_download_is_not():
    budget = ApiBudget(MemoryTaskStore(), 5000, user_daily_limit=1, clock=Clock(at("2026-11-29 03:00")))
    assert budget.spend("batchSend", "u1") == ""
    assert budget.spend("download", "u1") != "" and budget.take_limit_notice("u1") == ""  # the attachment reply says it
    assert budget.spend("batchSend", "u1") != ""
    notice = budget.take_limit_notice("u1")
    assert notice.startswith("（提示：你今天的钉钉接口调用已用 1 次，达到每人每天 1 次的上限")
    assert "后台任务的结果" in notice
    assert budget.take_limit_notice("u1") == "" and budget.take_limit_notice("u2") == ""


def test_a_card_needs_room_in_the_users_day():
    budget = ApiBudget(MemoryTaskStore(), 5000, user_daily_limit=6, exempt=("boss",),
                       clock=Clock(at("2026-11-10 03:00")))
    assert budget.cards_allowed("u1")
    budget.spend("download", "u1")
    budget.spend("download", "u1")
    assert not budget.cards_allowed("u1") and budget.cards_allowed("boss") and budget.cards_allowed("u2")


def test_the_months_spend_is_shown_by_kind():
    budget = ApiBudget(MemoryTaskStore(), 5000, clock=Clock(at("2026-11-10 03:00")))
    for kind in ("download", "download", "media_upload", "file_send", "batchSend", "groupMessages", "card_create",
                 "card_stream", "card_update"):
        budget.spend(kind, "u1")
    assert budget.month_spend() == (9, {"downloads": 2, "uploads": 1, "pushes": 3, "cards": 3})
    assert spend_by_group({"download": 1}, 4) == {"downloads": 1, "uploads": 0, "pushes": 0, "cards": 0, "other": 3}
    store = MemoryTaskStore()
    store.add_api_calls("2026-11", 5, "batchSend")
    line = describe_month(store, 100, at("2026-11-10 03:00"))
    assert line.endswith("; downloads 0, uploads 0, pushes 5, cards 0") and line.startswith("5 of 100 metered calls")


def test_a_push_over_the_users_day_never_reaches_dingtalk(standin):
    sender = DingTalkSender(standin.base_url, standin.client_id, standin.client_secret, standin.robot_code,
                            retry_window=5)
    sender.meter = ApiBudget(MemoryTaskStore(), 5000, user_daily_limit=1)
    route = Route("1", "u1", "cid")
    assert sender.push(route, "一").ok
    refused = sender.push(route, "二")
    assert not refused.ok and not refused.permanent and "每人每天 1 次的上限" in refused.error
    with pytest.raises(SpendRefused):
        sender.call_openapi(DOWNLOAD_PATH, {"downloadCode": "x"}, kind="download", user_id="u1")
    assert [r.text for r in standin.batch_sends()] == ["一"] and len(standin.metered_requests()) == 1
    assert sender.stats["refused_batchSend"] == 1 and sender.stats["metered_batchSend"] == 1
