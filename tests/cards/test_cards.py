"""The card layer without a network: update pacing, finalize order, fallback, backoff, and clicks (cards/task_cards.py,
cards/actions.py)."""

from __future__ import annotations

import json
import threading
import time

from cards.actions import action_ids, handle_card_callback
from cards.api import NOT_SPENT, CardVariables
from cards.task_cards import Cards
from codebuddy.warm_sessions import ToolRequest
from dingtalk.route import Route
from tasks.approvals import Approvals
from tasks.task import CANCELLED, RUNNING, SUCCEEDED, Task


class FakeApi:
    """Records card calls; `fail` makes every call answer an error."""

    variables = CardVariables()

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail = ""
        self.lock = threading.Lock()

    def _record(self, *call) -> str:
        with self.lock:
            self.calls.append(call)
        return self.fail

    def create_and_deliver(self, track, route, title):
        return self._record("create", track)

    def stream(self, track, content, *, finalize=False, error=False, user_id=""):
        return self._record("stream", track, content, finalize, error)

    def update(self, track, values, *, user_id=""):
        return self._record("update", track, values)

    def end(self, track, content, status, *, hide_buttons=False, user_id=""):
        return self._record("end", track, content, status, *(("hide_buttons",) if hide_buttons else ()))

    def streams(self) -> list:
        with self.lock:
            return [c for c in self.calls if c[0] == "stream"]


class Budget:
    def __init__(self, stretch: float = 1.0, allowed: bool = True, room: int | None = None) -> None:
        self.stretch, self.allowed, self.left = stretch, allowed, room
        self.asked: list[str] = []

    def cards_allowed(self, user_id: str = "") -> bool:
        self.asked.append(user_id)
        return self.allowed

    def room(self, user_id: str) -> int | None:
        return self.left

    def card_interval(self, base: float) -> float:
        return base * self.stretch


def task(task_id: str = "t1", user: str = "alice") -> Task:
    return Task(id=task_id, user_id=user, user_name="", conversation_key="c", route=Route("1", user, "cid"),
                prompt="p", status=RUNNING, attempts=1, started_at=1.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def updates_sent(stretch: float) -> int:
    """Write 20 texts, 0.25 s apart on the card's clock, with a 1 s interval stretched `stretch` times; how many
    updates went out. The test waits for the updater after each step, so only the clock decides."""
    api, clock = FakeApi(), Clock()
    cards = Cards(api, Budget(stretch), interval=1.0, backoff=60, clock=clock)
    live = task()
    card = cards.open(live)
    for number in range(20):
        cards.text(live.id, f"第{number}段")
        clock.now += 0.25
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (card.in_flight or (card.version != card.sent_version
                                                                   and clock.now - card.last_sent >= stretch)):
            time.sleep(0.02)
        time.sleep(0.12)  # one updater tick
    return len(api.streams())


def test_updates_are_paced_and_a_stretched_interval_sends_fewer():
    normal, slow = updates_sent(1.0), updates_sent(4.0)
    assert 4 <= normal <= 5 and 1 <= slow <= 2  # 5 s of writing: one update a second, or one every 4 s


def test_finish_ends_with_the_answer_and_a_failed_card_falls_back_once():
    api = FakeApi()
    cards = Cards(api, Budget(), interval=0.05, backoff=60)
    live = task()
    cards.open(live)
    cards.text(live.id, "半句")
    time.sleep(0.3)
    live.status, live.result = SUCCEEDED, "完整的回答"
    assert cards.finish(live) and api.calls[-1] == ("end", "cb-t1-1", "完整的回答", "3")
    assert not cards.finish(live)  # forgotten: a second delivery attempt sends the message instead
    api.fail = "HTTP 500 unknownError"
    other = task("t2")
    cards.open(other)
    time.sleep(0.1)
    other.status, other.result = SUCCEEDED, "x"
    assert not cards.finish(other) and cards.stats["fallbacks"] == 1


def test_repeated_failures_pause_cards_and_the_budget_can_refuse_them():
    api = FakeApi()
    api.fail = "HTTP 403 QpsLimit"
    cards = Cards(api, Budget(), interval=0.05, backoff=60)
    for number in range(3):
        cards.open(task(f"t{number}"))
    time.sleep(0.2)
    assert cards.open(task("t9")) is None  # paused after three failed creations
    assert Cards(FakeApi(), Budget(allowed=False), interval=1, backoff=60).open(task()) is None


def test_a_card_keeps_the_users_last_calls_for_its_end_and_budget_refusals_never_pause_cards():
    api, budget = FakeApi(), Budget(room=2)
    cards = Cards(api, budget, interval=0.05, backoff=60)
    live = task()
    assert cards.open(live) is not None and budget.asked == ["alice"]  # the budget asked for this user's task
    cards.text(live.id, "半句")
    time.sleep(0.4)
    assert api.streams() == []  # no update: the two calls left today end the card
    live.status, live.result = SUCCEEDED, "完整的回答"
    assert cards.finish(live) and api.calls[-1] == ("end", "cb-t1-1", "完整的回答", "3")
    api.fail = f"{NOT_SPENT}: 你今天的钉钉接口调用已用 100 次，达到每人每天 100 次的上限"
    for number in range(4):
        cards.open(task(f"r{number}"))
    time.sleep(0.2)
    assert cards.open(task("r9")) is not None  # four refusals by the budget: no failure of the cards, no pause


def callback(track: str, user: object, actions: object = ("stop",)) -> dict:
    return {"outTrackId": track, "userId": user,
            "content": json.dumps({"cardPrivateData": {"actionIds": list(actions) if isinstance(actions, tuple)
                                                       else actions}})}


class Workers:
    def __init__(self, approvals: Approvals) -> None:
        self.approvals = approvals


class Manager:
    def __init__(self, live: Task) -> None:
        self.live, self.cancelled = live, []
        self.workers = Workers(Approvals(lambda task, text: None, timeout=30))

    def get_task(self, task_id):
        return self.live if task_id == self.live.id else None

    def cancel(self, task_id):
        self.cancelled.append(task_id)


def test_only_the_owner_or_an_admin_may_press_stop_and_junk_is_ignored():
    api = FakeApi()
    cards = Cards(api, Budget(), interval=1, backoff=60)
    live = task(user="alice")
    cards.open(live)
    manager = Manager(live)
    assert handle_card_callback(callback("cb-t1-1", "mallory"), cards, manager, ["boss"]) == "refused"
    for junk in (None, "text", {}, callback("cb-t1-1", ["alice"]), callback("cb-t1-1", "alice", actions="stop"),
                 {"outTrackId": "cb-t1-1", "userId": "alice", "content": "{not json"},
                 callback("cb-t1-1", "alice", actions=("approve",)), callback("cb-other-1", "alice")):
        assert handle_card_callback(junk, cards, manager, ["boss"]) == "ignored"
    assert manager.cancelled == []
    assert handle_card_callback(callback("cb-t1-1", "boss"), cards, manager, ["boss"]) == "stopped"
    assert handle_card_callback(callback("cb-t1-1", "alice"), cards, manager, []) == "stopped"
    live.status = CANCELLED
    assert handle_card_callback(callback("cb-t1-1", "alice"), cards, manager, []) == "ignored"
    assert manager.cancelled == ["t1", "t1"]
    assert action_ids({"userId": "u", "content": json.dumps({"cardPrivateData": {"actionIds": ["stop", 3]}})}) \
        == ("u", ["stop"])


def test_a_progress_note_goes_onto_the_live_card_instead_of_a_message():
    api = FakeApi()
    cards = Cards(api, Budget(), interval=1, backoff=60)
    live = task()
    assert not cards.progress(live, "仍在处理中")  # no card: the caller sends the note as a message
    card = cards.open(live)
    assert cards.progress(live, "仍在处理中 (已用时 5 分钟)")
    assert "仍在处理中 (已用时 5 分钟)" in cards.render(card, card.started + 300)


def test_approve_and_deny_buttons_answer_only_the_request_the_card_shows_and_only_for_the_owner_or_an_admin():
    api = FakeApi()
    cards = Cards(api, Budget(), interval=60, backoff=60)
    live = task(user="alice")
    cards.open(live)
    manager = Manager(live)
    approvals = manager.workers.approvals
    request = ToolRequest("Bash", {"command": "rm -rf build"})
    decisions: list = []
    asking = threading.Thread(target=lambda: decisions.append(approvals.ask(
        live, request, shown=lambda pending: cards.ask(live.id, pending.id, "⏸ 等待确认"))))
    assert handle_card_callback(callback("cb-t1-1", "alice", actions=("approve",)), cards, manager, []) == "ignored"
    asking.start()
    deadline = time.monotonic() + 5  # the buttons go out at once, not after the 60 s text interval
    while cards.shown_approval("cb-t1-1")[1] == "" and time.monotonic() < deadline:
        time.sleep(0.02)
    task_id, question = cards.shown_approval("cb-t1-1")
    assert task_id == "t1" and question.startswith("t1-")
    assert ("update", "cb-t1-1", {"pendingApproval": question}) in api.calls
    assert any(c[0] == "stream" and "⏸ 等待确认" in c[2] for c in api.streams())
    assert handle_card_callback(callback("cb-t1-1", "mallory", actions=("approve",)), cards, manager, []) \
        == "refused"
    assert approvals.click("t1-999", "alice", False, True) == "ignored"  # a request that is not waiting
    assert handle_card_callback(callback("cb-t1-1", "boss", actions=("deny",)), cards, manager, ["boss"]) == "denied"
    asking.join(5)
    assert decisions and not decisions[0].allowed and "denied" in decisions[0].reason
    # Answered already: a 同意 right after answers nothing (and is not run as a prompt either).
    assert approvals.answer("c", "alice", False, "同意").startswith("这个确认请求刚刚已经回答过了")
    assert handle_card_callback(callback("cb-t1-1", "alice", actions=("approve",)), cards, manager, []) == "ignored"
    cards.settled(live.id, "工具 Bash: 已拒绝")
    live.status, live.result = SUCCEEDED, "done"
    assert cards.finish(live)
    hidden = [c for c in api.calls
              if c[0] == "update" and c[2] == {"pendingApproval": ""} or c[0] == "end" and len(c) > 4]
    assert hidden and api.calls[-1][:4] == ("end", "cb-t1-1", "done", "3")  # the buttons went before or at the end
    assert manager.cancelled == []
    cards.stop()
