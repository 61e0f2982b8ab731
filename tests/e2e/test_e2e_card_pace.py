"""Card updates stretched by the month's pace, end to end: the same long answer, on the line and twice ahead of it."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request

import pytest

from dingtalk.api_budget import month_of
from store.sqlite import SQLiteTaskStore
from tests.conftest import ROOT
from tests.standin_cards import INSTANCES_PATH, TEMPLATE_ID, Card, CardStandin

pytestmark = pytest.mark.e2e

BUDGET = 1000
SHARE = 0.25  # the share of the month pinned as gone (tests/pinned_month.py): the straight line is at 250 calls
BEHIND = 200  # pace 0.8, not ahead of the line: updates every CARD_UPDATE_INTERVAL
AHEAD = 500  # pace 2.0: updates 2.0 ** 2 = 4 times further apart, and still below CARDS_OFF_AT (900)
BASE = 0.3
STRETCHED = BASE * 4
TOLERANCE = 0.1
PROMPT = "[stream=6] [parts=20] 一份很长的报告"  # twenty parts, 0.3 s apart (the fake CLI)


def _metric(port: int, name: str, **labels: str) -> float:
    """One sample of the bot's /metrics: the one named `name` that carries `labels` (besides its constant ones)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    found = [float(line.rsplit(" ", 1)[1]) for line in lines
             if re.match(rf"{name}[{{ ]", line) and all(label in line.rsplit(" ", 1)[0] for label in wanted)]
    assert len(found) == 1, (name, labels, lines)
    return found[0]


def _stored(db: str) -> int:
    store = SQLiteTaskStore(db, read_only=True)
    try:
        return store.api_calls(month_of(time.time()))
    finally:
        store.close()


def _seed(db: str, total: int) -> None:
    """Bring the month's recorded spend up to `total` (the bot is not running)."""
    store = SQLiteTaskStore(db)
    try:
        store.add_api_calls(month_of(time.time()), total - store.api_calls(month_of(time.time())))
    finally:
        store.close()


def _answer() -> str:
    shown = PROMPT.replace("[", "(").replace("]", ")")
    return "\n\n".join(f"第{n}段: {shown}" for n in range(1, 21))


def _gaps(card: Card) -> list[float]:
    """Seconds between the card's creation and its first streaming update, and between each two updates."""
    times = [card.created, *(call.time for call in card.streams if not call.finalize)]
    return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]


def _run_one_card(standin, make_bot, cards: CardStandin, db: str, spent_before: int) -> tuple[Card, int]:
    """Start a bot at the seeded spend, let it stream the long answer into a card; check the counts agree."""
    bot = make_bot(DINGTALK_CARD_TEMPLATE_ID=TEMPLATE_ID, CARD_UPDATE_INTERVAL=str(BASE), SYNC_TIMEOUT="30",
                   DINGTALK_MONTHLY_CALL_BUDGET=str(BUDGET), STATUS_PORT="0",
                   _WRAP=json.dumps([sys.executable, str(ROOT / "tests" / "pinned_month.py"), str(SHARE)]))
    port = bot.status_port()
    known = {card.track for card in cards.card_list()}
    metered_before = cards.metered
    standin.send_bot_message(PROMPT, sender_staff_id="alice")
    card = standin.wait_for(lambda: next((c for c in cards.card_list() if c.track not in known
                                          and c.status == "3"), None), timeout=30, message="the finished card")
    bot.wait_log(r"卡片已完成.*完成")
    metered = cards.metered - metered_before
    status_updates = [r for r in standin.requests if r.path == INSTANCES_PATH and card.track in json.dumps(r.body)]
    assert metered == 1 + len(card.streams) + len(status_updates)  # create, every streaming call, the status
    assert _metric(port, "dingtalk_bot_api_calls_month", month=month_of(time.time())) == spent_before + metered
    assert _metric(port, "dingtalk_bot_api_calls_total", kind="card_stream") == len(card.streams)
    assert bot.terminate() == 0
    assert _stored(db) == spent_before + metered  # every metered call the stand-in saw is in the store
    return card, metered


def test_ahead_of_the_months_pace_the_same_answer_gets_fewer_card_updates(standin, make_bot, tmp_path):
    cards = CardStandin(standin)
    db = tmp_path / "data" / "tasks.db"
    db.parent.mkdir(parents=True)
    _seed(str(db), BEHIND)
    on_pace, on_pace_metered = _run_one_card(standin, make_bot, cards, str(db), BEHIND)
    _seed(str(db), AHEAD)
    ahead, ahead_metered = _run_one_card(standin, make_bot, cards, str(db), AHEAD)
    for card in (on_pace, ahead):
        assert card.shown() == _answer() and card.streams[-1].finalize and not card.ignored_updates
    sent = [r.text or "" for r in standin.webhook_posts() + standin.batch_sends()]
    assert not [text for text in sent if "第20段" in text]  # the cards carried the answer: no markdown copy
    counts = len(_gaps(on_pace)), len(_gaps(ahead))
    print(f"card streaming updates: on pace {counts[0]}, twice ahead {counts[1]}; "
          f"metered calls: {on_pace_metered}, {ahead_metered}")
    assert counts[0] >= 10, on_pace.streams  # on the line: the answer was watched being written
    assert 1 <= counts[1] <= counts[0] // 2, counts  # ahead of it: at most half as many
    assert min(_gaps(ahead)) >= STRETCHED - TOLERANCE, _gaps(ahead)  # never closer than the stretched interval
    assert min(_gaps(on_pace)) >= BASE - TOLERANCE, _gaps(on_pace)
