"""Questions running tasks wait on, shared by the hosts of a cluster: an answer or a card click that DingTalk
delivered to another host reaches the host whose task asked.

DingTalk pushes each message (and each card click) to one of the app's connections at random, so the sender's
`同意` often arrives at a host that did not ask. The asking host writes its waiting question to the `questions` table
(id, conversation, task, host, the task's owner, whether it is a question or a tool request) and deletes it once
settled, and tells the other hosts at once (`NOTIFY bot_question`); each host keeps the others' waiting questions in
memory (those notifications, and a look at the table every `POLL_SECONDS` for any it missed), so the intake thread
never waits on the DB for them. A host that receives a message in a conversation with no question of its own looks
there: if a live host's task waits in that conversation and the text answers it (`approvals.verdict`), it replies to
the sender at once and passes the answer on with `NOTIFY bot_answer` (sent from the cluster's offload thread); the
asking host checks it again against its own waiting request (who may answer, still waiting) before the task goes on.
An answer to an agent's question is passed on with its first 2,000 characters (a NOTIFY payload holds under 8,000
bytes). When the DB cannot be reached the message is handled as an ordinary one, as on one host.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import psycopg

from store.postgres import DB_NOW
from tasks.approvals import Approvals, Pending, reply_for, verdict

log = logging.getLogger("cluster")

ANSWER_CHANNEL = "bot_answer"
QUESTION_CHANNEL = "bot_question"  # a question asked (its row) or settled (its id), for the other hosts' memory
_LIVE_HOST = f"EXISTS (SELECT 1 FROM hosts h WHERE h.host = q.host AND h.alive_until > {DB_NOW})"
RELAYED_CHARS = 2000  # of an answer's text: a NOTIFY payload holds under 8,000 bytes
POLL_SECONDS = 2.0  # the others' questions are read again this often: a lost NOTIFY costs at most this long


class Question(NamedTuple):
    """A question another host's task waits on, as this host remembers it."""

    id: str
    conversation_key: str
    task_id: str
    owner: str
    is_question: int
    asked_at: float


class SharedQuestions:
    """This host's side of the shared questions: publish its own, pass on answers to others', take relayed ones."""

    def __init__(self, cluster: Any, approvals: Approvals, *, admins: Iterable[str] = (),  # cluster.Cluster
                 shown: Callable[[str], tuple[str | None, str]] = lambda track: (None, "")) -> None:
        self.cluster = cluster
        self.approvals = approvals
        self.admins = frozenset(admins)  # ADMIN_USERS here: who may answer is decided here, never by a relayed flag
        self.shown = shown  # card id → (its task, the request its buttons show) of this host's cards
        self.relayed = 0  # answers and clicks passed to another host
        self._lock = threading.Lock()
        self._others: dict[str, Question] = {}  # the other live hosts' waiting questions, by id
        self._heard: dict[str, Question | None] = {}  # notified since the last look at the table began (None: settled)

    def join(self) -> None:
        """Forget this host's questions from before a restart, learn the others', listen for questions and answers;
        before `cluster.start()`."""
        try:
            self.cluster.execute("DELETE FROM questions WHERE host = %s", (self.cluster.host,))
            self.look()
        except psycopg.Error as exc:
            log.warning("清理本主机的待确认请求失败 (%s)", " ".join(str(exc).split()))
        self.cluster.listen(QUESTION_CHANNEL, self.heard)
        self.cluster.listen(ANSWER_CHANNEL, self.take)  # last: tests wait for its LISTEN as the listener's last
        self.cluster.every(POLL_SECONDS, self.look, "cluster-questions")
        self.approvals.remote = self

    # -- the others' questions, in memory

    def look(self) -> None:
        """Read the other live hosts' waiting questions (a NOTIFY may have been lost); psycopg.Error if the DB fails."""
        with self._lock:
            self._heard = {}
        rows = self.cluster.execute("SELECT q.id, q.conversation_key, q.task_id, q.owner, q.is_question, q.asked_at "
                                    f"FROM questions q WHERE q.host <> %s AND {_LIVE_HOST}", (self.cluster.host,))
        others = {row[0]: Question(*row) for row in rows}
        with self._lock:
            for question_id, question in self._heard.items():  # newer than the rows read
                if question is None:
                    others.pop(question_id, None)
                else:
                    others[question_id] = question
            self._others = others

    def heard(self, payload: str) -> None:
        """A question another host asked or settled (NOTIFY payload, JSON)."""
        try:
            told = json.loads(payload)
            if told.get("host") == self.cluster.host:
                return
            question = Question(str(told["id"]), str(told["conversation_key"]), str(told["task_id"]),
                                str(told["owner"]), int(told["is_question"]), float(told["asked_at"])
                                ) if "task_id" in told else None
            question_id = str(told["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("忽略无法解析的集群确认请求通知")
            return
        with self._lock:
            self._heard[question_id] = question
            if question is None:
                self._others.pop(question_id, None)
            else:
                self._others[question_id] = question

    # -- the asking host

    def asked(self, pending: Pending) -> None:
        """A task here waits on `pending`: let the other hosts find it (the row, and a NOTIFY once it is there)."""
        question = Question(pending.id, pending.task.conversation_key, pending.task.id, pending.task.user_id,
                            int(pending.request.is_question), time.time())
        told = json.dumps({**question._asdict(), "host": self.cluster.host}, ensure_ascii=False)
        self._try("WITH q AS (INSERT INTO questions VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
                  "SET host = excluded.host, asked_at = excluded.asked_at RETURNING id) "
                  "SELECT pg_notify(%s, %s) FROM q",
                  (question.id, question.conversation_key, question.task_id, self.cluster.host, question.owner,
                   question.is_question, question.asked_at, QUESTION_CHANNEL, told))

    def settled(self, pending: Pending) -> None:
        told = json.dumps({"id": pending.id, "host": self.cluster.host})
        self._try("WITH q AS (DELETE FROM questions WHERE id = %s RETURNING id) SELECT pg_notify(%s, %s) FROM q",
                  (pending.id, QUESTION_CHANNEL, told))

    def take(self, payload: str) -> None:
        """An answer or a click another host received for a question of a task here (NOTIFY payload, JSON). Who may
        answer is decided here, from this host's admins: a flag in the payload is not read."""
        try:
            relayed = json.loads(payload)
            user, approve = str(relayed["user"]), relayed.get("approve")
            target = str(relayed["track"] if approve is not None else relayed["id"])
        except (ValueError, KeyError, TypeError):
            log.warning("忽略无法解析的集群确认通知")
            return
        if approve is None:
            self.approvals.answer_relayed(target, user, user in self.admins, str(relayed.get("text") or ""))
            return
        task_id, question = self.shown(target)  # the request the clicked card shows, never another of its task
        if task_id is None:
            return  # not a card of this host
        outcome = self.approvals.click(question, user, user in self.admins, bool(approve))
        log.info("卡片确认按钮 (另一主机收到): 任务 %s %s user=%s", task_id, outcome, user)

    # -- a host that received the answer

    def answer(self, conversation_key: str, user_id: str, is_admin: bool, text: str) -> str | None:
        """If `text` answers a question another live host's task waits on in this conversation: pass it on and
        return the reply to show ("" for none); None when it is no answer or the DB cannot say."""
        found = self._waiting(lambda q: q.conversation_key == conversation_key)
        if found is None:
            return None
        kind = verdict(found.owner, bool(found.is_question), user_id, is_admin, text)
        if kind is None:
            return None
        task_id = found.task_id
        relayed = {"id": found.id, "user": user_id, "text": text[:RELAYED_CHARS]}  # the asking host decides again
        if kind != "refused" and not self._relay(relayed):
            return None
        if kind == "refused":
            log.warning("拒绝非发起人的确认: 任务 %s user=%s", task_id, user_id)
        return reply_for(kind, task_id)

    def click(self, track: str, task_id: str, user_id: str, approve: bool) -> str:
        """A button of card `track` of task `task_id` that another host runs: "relayed" (that host answers the request
        its card shows, and decides whether this user may, as for a click there) or "ignored" (nothing waits).
        The card's id goes, not a request id: which request its buttons show only the card's host knows."""
        if self._waiting(lambda q: q.task_id == task_id and not q.is_question) is None:
            return "ignored"
        relayed = self._relay({"track": track, "user": user_id, "approve": approve})
        return "relayed" if relayed else "ignored"

    def waits(self, task_id: str) -> bool:
        """Whether a task another live host runs waits for an answer (`/status` asked here)."""
        return self._waiting(lambda q: q.task_id == task_id) is not None

    def _waiting(self, wanted: Any) -> Question | None:
        """The newest of the others' questions `wanted(question)` accepts, from memory; None while the DB is down
        (the message is then an ordinary one, as on one host)."""
        if self.cluster.db_down:
            return None
        with self._lock:
            found = [q for q in self._others.values() if wanted(q)]
        return max(found, key=lambda q: q.asked_at) if found else None

    def _relay(self, answer: dict[str, Any]) -> bool:
        """Pass an answer on to the asking host, from the offload thread (the caller may be the intake)."""
        def send() -> None:
            if self._try("SELECT pg_notify(%s, %s)", (ANSWER_CHANNEL, json.dumps(answer, ensure_ascii=False))):
                self.relayed += 1
                log.info("确认请求 %s 的回答已转给执行任务的主机 (user=%s)", answer.get("id") or answer["track"],
                         answer["user"])

        self.cluster.later(send)
        return True

    def _try(self, sql: str, args: tuple) -> bool:
        try:
            self.cluster.execute(sql, args)
        except psycopg.Error as exc:
            log.warning("集群待确认请求表操作失败 (%s)", " ".join(str(exc).split()))
            return False
        return True
