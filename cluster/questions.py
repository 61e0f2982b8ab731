"""Questions running tasks wait on, shared by the hosts of a cluster: an answer or a card click that DingTalk
delivered to another host reaches the host whose task asked.

DingTalk pushes each message (and each card click) to one of the app's connections at random, so the sender's
`同意` often arrives at a host that did not ask. The asking host writes its waiting question to the `questions` table
(id, conversation, task, host, the task's owner, whether it is a question or a tool request) and deletes it once
settled. A host that receives a message in a conversation with no question of its own looks there: if a live host's
task waits in that conversation and the text answers it (`approvals.verdict`), it replies to the sender at once and
passes the answer on with `NOTIFY bot_answer`; the asking host checks it again against its own waiting request
(who may answer, still waiting) before the task goes on. An answer to an agent's question is passed on with its
first 2,000 characters (a NOTIFY payload holds under 8,000 bytes). When the DB cannot be reached the message is
handled as an ordinary one, as on one host.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import psycopg

from store.postgres import DB_NOW
from tasks.approvals import Approvals, Pending, reply_for, verdict

log = logging.getLogger("cluster")

ANSWER_CHANNEL = "bot_answer"
_LIVE_HOST = f"EXISTS (SELECT 1 FROM hosts h WHERE h.host = q.host AND h.alive_until > {DB_NOW})"
RELAYED_CHARS = 2000  # of an answer's text: a NOTIFY payload holds under 8,000 bytes


class SharedQuestions:
    """This host's side of the shared questions: publish its own, pass on answers to others', take relayed ones."""

    def __init__(self, cluster: Any, approvals: Approvals) -> None:  # cluster.Cluster
        self.cluster = cluster
        self.approvals = approvals
        self.relayed = 0  # answers and clicks passed to another host

    def join(self) -> None:
        """Forget this host's questions from before a restart and listen for answers; before `cluster.start()`."""
        try:
            self.cluster.execute("DELETE FROM questions WHERE host = %s", (self.cluster.host,))
        except psycopg.Error as exc:
            log.warning("清理本主机的待确认请求失败 (%s)", " ".join(str(exc).split()))
        self.cluster.listen(ANSWER_CHANNEL, self.take)
        self.approvals.remote = self

    # -- the asking host

    def asked(self, pending: Pending) -> None:
        """A task here waits on `pending`: let the other hosts find it."""
        self._try("INSERT INTO questions VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                  "host = excluded.host, asked_at = excluded.asked_at",
                  (pending.id, pending.task.conversation_key, pending.task.id, self.cluster.host,
                   pending.task.user_id, int(pending.request.is_question), time.time()))

    def settled(self, pending: Pending) -> None:
        self._try("DELETE FROM questions WHERE id = %s", (pending.id,))

    def take(self, payload: str) -> None:
        """An answer or a click another host received for a question of a task here (NOTIFY payload, JSON)."""
        try:
            relayed = json.loads(payload)
            question, user, admin = str(relayed["id"]), str(relayed["user"]), bool(relayed["admin"])
        except (ValueError, KeyError, TypeError):
            log.warning("忽略无法解析的集群确认通知")
            return
        if "approve" in relayed:
            self.approvals.click(question, user, admin, bool(relayed["approve"]))
        else:
            self.approvals.answer_relayed(question, user, admin, str(relayed.get("text") or ""))

    # -- a host that received the answer

    def answer(self, conversation_key: str, user_id: str, is_admin: bool, text: str) -> str | None:
        """If `text` answers a question another live host's task waits on in this conversation: pass it on and
        return the reply to show ("" for none); None when it is no answer or the DB cannot say."""
        row = self._waiting("q.conversation_key = %s AND q.host <> %s", (conversation_key, self.cluster.host))
        if row is None:
            return None
        question, task_id, owner, is_question = row
        kind = verdict(owner, bool(is_question), user_id, is_admin, text)
        if kind is None:
            return None
        relayed = {"id": question, "user": user_id, "admin": is_admin, "text": text[:RELAYED_CHARS]}
        if kind != "refused" and not self._relay(relayed):
            return None
        if kind == "refused":
            log.warning("拒绝非发起人的确认: 任务 %s user=%s", task_id, user_id)
        return reply_for(kind, task_id)

    def click(self, task_id: str, user_id: str, is_admin: bool, approve: bool) -> str:
        """A card's approve/deny button for a task another host runs: "relayed" (that host decides whether this
        user may answer, as for a click there) or "ignored" (nothing waits)."""
        row = self._waiting("q.task_id = %s AND q.is_question = 0 AND q.host <> %s", (task_id, self.cluster.host))
        if row is None:
            return "ignored"
        relayed = self._relay({"id": row[0], "user": user_id, "admin": is_admin, "approve": approve})
        return "relayed" if relayed else "ignored"

    def waits(self, task_id: str) -> bool:
        """Whether a task another live host runs waits for an answer (`/status` asked here)."""
        return self._waiting("q.task_id = %s AND q.host <> %s", (task_id, self.cluster.host)) is not None

    def _waiting(self, where: str, args: tuple) -> tuple[Any, ...] | None:
        try:
            rows = self.cluster.execute(f"SELECT q.id, q.task_id, q.owner, q.is_question FROM questions q WHERE "
                                        f"{where} AND {_LIVE_HOST} ORDER BY q.asked_at DESC LIMIT 1", args)
        except psycopg.Error as exc:
            log.warning("查询其他主机的待确认请求失败 (%s)", " ".join(str(exc).split()))
            return None
        return rows[0] if rows else None

    def _relay(self, answer: dict[str, Any]) -> bool:
        if not self._try("SELECT pg_notify(%s, %s)", (ANSWER_CHANNEL, json.dumps(answer, ensure_ascii=False))):
            return False
        self.relayed += 1
        log.info("确认请求 %s 的回答已转给执行任务的主机 (user=%s)", answer["id"], answer["user"])
        return True

    def _try(self, sql: str, args: tuple) -> bool:
        try:
            self.cluster.execute(sql, args)
        except psycopg.Error as exc:
            log.warning("集群待确认请求表操作失败 (%s)", " ".join(str(exc).split()))
            return False
        return True
