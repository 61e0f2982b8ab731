"""The monthly DingTalk call budget (dingtalk/api_budget.py) and the stores that keep its count."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from dingtalk.api_budget import LIMIT_NOTICE, ApiBudget, month_elapsed, month_of
from dingtalk.route import Route
from dingtalk_sender import Delivery
from store.journal import open_store
from store.memory import MemoryTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.delivery import Outbox


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
