"""Questions shared by the hosts on a real PostgreSQL (cluster/questions.py): a card click that reached another host
answers only the request the card shows, and who may answer is decided by the host whose task asked, from its own
settings, never from the relayed message."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from cluster.hosts import Cluster
from cluster.questions import ANSWER_CHANNEL, SharedQuestions
from codebuddy.warm_sessions import ToolRequest
from dingtalk.route import Route
from store.journal import open_store
from tasks.approvals import Approvals
from tasks.task import Task
from tests.standin import poll_until

TASK = Task(id="5" * 16, user_id="olga", user_name="Olga", conversation_key="cidG", route=Route("2", "olga", "cidG"),
            prompt="p", created_at=1.0)
TRACK = f"cb-{TASK.id}-1"  # the card of the task's run, on host a


class _Asking:
    """Host "a": its task waits on a tool request; `shown` is the request id its card shows (cards.shown_approval)."""

    def __init__(self, pg_url: str) -> None:
        self.cluster = Cluster(pg_url, "a", lease_seconds=30, on_takeover=lambda ids: None,
                               on_cancel=lambda *told: None)
        self.approvals = Approvals(lambda task, text: None, timeout=30)
        self.shown = ""
        self.questions = SharedQuestions(self.cluster, self.approvals, admins=("boss",),
                                         shown=lambda track: (TASK.id, self.shown) if track == TRACK else (None, ""))
        self.decisions: list = []
        self.stop = threading.Event()  # the task's cancel: its question is not answered

    def ask(self) -> None:
        request = ToolRequest("Bash", {"command": "rm -rf build"})
        threading.Thread(target=lambda: self.decisions.append(self.approvals.ask(TASK, request, stop=self.stop)),
                         daemon=True).start()

    def waiting_id(self) -> str:
        poll_until(lambda: self.approvals.waiting(TASK.conversation_key), 5.0, 0.01, lambda: "nothing asked")
        with self.approvals._lock:
            return self.approvals._asking(TASK.conversation_key).id


@pytest.fixture
def hosts(pg_url):
    open_store(pg_url, host="a").close()  # the schema
    asking = _Asking(pg_url)
    other = Cluster(pg_url, "b", lease_seconds=30, on_takeover=lambda ids: None, on_cancel=lambda *told: None)
    receiving = SharedQuestions(other, Approvals(lambda task, text: None, timeout=30), admins=("mallory",))
    for cluster, questions in ((asking.cluster, asking.questions), (other, receiving)):
        cluster.renew()  # alive: the others read its questions
        questions.join()
        cluster.start()
    for cluster in (asking.cluster, other):
        assert cluster.listening.wait(10)
    yield asking, other, receiving
    asking.stop.set()
    for cluster in (asking.cluster, other):
        cluster.stop()


def _relayed(caplog, outcome: str) -> None:
    """Wait until host a has acted on a relayed click (its log line says how)."""
    poll_until(lambda: [r for r in caplog.records if r.getMessage().startswith("卡片确认按钮 (另一主机收到)")
                        and outcome in r.getMessage()], 5.0, 0.01, lambda: f"host a did not act ({outcome})")


def test_a_relayed_card_click_answers_only_the_request_the_card_shows_never_the_tasks_newest(hosts, caplog):
    caplog.set_level(logging.INFO, logger="cluster")
    asking, other, receiving = hosts
    asking.ask()
    newest = asking.waiting_id()
    asking.shown = f"{TASK.id}-0"  # the card still shows the buttons of an earlier request (answered in the chat)
    poll_until(lambda: receiving.waits(TASK.id), 5.0, 0.01, lambda: "host b does not know the question")
    assert receiving.click(TRACK, TASK.id, "olga", approve=True) == "relayed"
    _relayed(caplog, "ignored")  # what olga saw and approved is no longer waiting: nothing else is approved for her
    assert not asking.decisions and asking.waiting_id() == newest
    asking.shown = newest  # the card now shows the newest request: a click answers it
    assert receiving.click(TRACK, TASK.id, "olga", approve=True) == "relayed"
    _relayed(caplog, "approved")
    poll_until(lambda: asking.decisions, 5.0, 0.01, lambda: "not approved")
    assert asking.decisions[0].allowed


def test_who_may_answer_a_relayed_click_or_reply_is_decided_by_the_asking_hosts_own_admins(hosts, caplog):
    caplog.set_level(logging.INFO, logger="cluster")
    asking, other, receiving = hosts
    asking.ask()
    asking.shown = question = asking.waiting_id()
    poll_until(lambda: receiving.waits(TASK.id), 5.0, 0.01, lambda: "host b does not know the question")
    # mallory is an admin on host b only; a relayed message saying "admin" is not believed.
    for relayed in ({"id": question, "track": TRACK, "user": "mallory", "admin": True, "approve": True},
                    {"id": question, "user": "mallory", "admin": True, "text": "同意"}):
        other.execute("SELECT pg_notify(%s, %s)", (ANSWER_CHANNEL, json.dumps(relayed)))
    poll_until(lambda: [r for r in caplog.records if "拒绝非发起人的确认: 任务" in r.getMessage()], 5.0, 0.01,
               lambda: "the relayed reply was not refused")
    assert [r for r in caplog.records if "拒绝非发起人的卡片确认" in r.getMessage()]
    assert not asking.decisions
    assert receiving.click(TRACK, TASK.id, "boss", approve=True) == "relayed"  # an admin on host a
    _relayed(caplog, "approved")
    poll_until(lambda: asking.decisions, 5.0, 0.01, lambda: "not approved")
    assert asking.decisions[0].allowed
