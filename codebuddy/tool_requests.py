"""The CLI's requests to use a tool (and AskUserQuestion): what one asks, the answer, and the desk that asks them one at
a time through the turn's `ask` and refuses the rest on the spot (docs/warm-sessions.md).

A tool in the jail can forge these requests in the CLI's stdout, so the desk never holds more than a few, never starts
more than one thread, takes none outside a turn, and writes every answer from its own thread: the thread reading the
CLI's output never waits on its input.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("codebuddy_client")

ASK_QUESTION_TOOL = "AskUserQuestion"
MAX_WAITING = 8  # requests queued behind the one being asked (the CLI may ask for a few tools at once)
# Requests refused on the spot per turn: their answers (ids cut to _ID_CHARS) fit in a pipe's 64 KiB, so writing them
# never waits on a CLI that has stopped reading; more is a flood.
MAX_REFUSALS = 64
_ID_CHARS = 200


@dataclass(frozen=True)
class ToolRequest:
    """The CLI asks whether it may use a tool (`can_use_tool`), or asks the user a question (AskUserQuestion)."""

    tool_name: str
    input: dict
    tool_use_id: str = ""
    reason: str = ""  # the CLI's decision_reason or blocked_path, when it gives one

    @classmethod
    def from_wire(cls, raw: dict) -> ToolRequest:
        """The request of a `can_use_tool` control request."""
        return cls(tool_name=str(raw.get("tool_name") or "?"),
                   input=raw.get("input") if isinstance(raw.get("input"), dict) else {},
                   tool_use_id=str(raw.get("tool_use_id") or ""),
                   reason=str(raw.get("decision_reason") or raw.get("blocked_path") or ""))

    @property
    def is_question(self) -> bool:
        return self.tool_name == ASK_QUESTION_TOOL

    @property
    def questions(self) -> list[dict]:
        """The questions of an AskUserQuestion request (each a dict with `question` and maybe `options`)."""
        found = self.input.get("questions") if isinstance(self.input, dict) else None
        return [q for q in found if isinstance(q, dict) and q.get("question")] if isinstance(found, list) else []


@dataclass(frozen=True)
class Decision:
    """The answer to a `ToolRequest`: allowed (maybe with changed input, e.g. a question's answers) or not, why."""

    allowed: bool
    reason: str = ""
    updated_input: dict | None = None

    def wire(self, request: ToolRequest) -> dict:
        """The `response` of the control response the CLI expects."""
        if self.allowed:
            return {"allowed": True, "updatedInput": self.updated_input if self.updated_input is not None
                    else request.input, "tool_use_id": request.tool_use_id}
        return {"allowed": False, "reason": self.reason or "denied", "tool_use_id": request.tool_use_id}


Ask = Callable[[ToolRequest], Decision]


def deny_all(request: ToolRequest) -> Decision:
    """What a run without anyone to ask answers (APPROVALS=off): the permission mode decides alone."""
    return Decision(False, "permission prompts are off for this bot (APPROVALS=off)")


class ToolDesk:
    """One process's control requests: during a turn each tool request goes to the turn's `ask`, one at a time;
    outside a turn, past MAX_WAITING, or of a kind nothing here answers, refused at once. Two threads of the desk's,
    each alive only while it has work: one asks, one writes the answers (a refusal never waits behind a question).

    `send(message)` writes a control response; `flood(why)` is told when refusals pass MAX_REFUSALS in a turn.
    """

    def __init__(self, send: Callable[[dict], object], flood: Callable[[str], None],
                 clock: Callable[[], float], name: str = "cli-ask") -> None:
        self._send = send
        self._flood = flood
        self.clock = clock
        self.name = name
        self._lock = threading.Lock()
        self._ask: Ask | None = None  # the turn's, while a turn runs
        self._turn = 0
        self._waiting: collections.deque[tuple[int, str, dict]] = collections.deque()  # (turn, id, request)
        # Answers to write: at most MAX_REFUSALS + 1 refusals and MAX_WAITING + 1 decisions per turn.
        self._outbox: collections.deque[dict] = collections.deque()
        self._asker: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._refusals = 0
        self._waited = 0.0
        self._waiting_since: float | None = None
        self._closed = False

    def open_turn(self, ask: Ask) -> None:
        """A turn starts: its requests go to `ask`."""
        with self._lock:
            self._turn += 1
            self._ask = ask
            self._waited = 0.0
            self._refusals = 0

    def close_turn(self) -> float:
        """The turn is over: requests still waiting, and new ones, are refused. Returns the seconds spent asking."""
        with self._lock:
            self._ask = None
            return self._waited

    def close(self) -> None:
        """The process is ending: nothing more is asked."""
        with self._lock:
            self._closed = True
            self._ask = None

    def request(self, request_id: str, raw: dict) -> None:
        """A `can_use_tool` request arrived (on the reader's thread: returns at once)."""
        with self._lock:
            if self._ask is None:
                refusal = "no turn is in progress"
            elif len(self._waiting) >= MAX_WAITING:
                refusal = f"more than {MAX_WAITING} tool requests are waiting; ask again later"
            else:
                self._waiting.append((self._turn, request_id, raw))
                if self._asker is None:
                    self._asker = _start(self._ask_waiting, self.name)
                return
        self.refuse(_success(request_id[:_ID_CHARS], {
            "allowed": False, "reason": refusal, "tool_use_id": str(raw.get("tool_use_id") or "")[:_ID_CHARS]}))

    def refuse(self, message: dict) -> None:
        """Send `message`, a control response refusing a request, unless refusals passed MAX_REFUSALS (a flood)."""
        with self._lock:
            self._refusals += 1
            over = self._refusals > MAX_REFUSALS
            if not over:
                self._post(message)
        if over:
            self._flood(f"more than {MAX_REFUSALS} control requests refused")

    def _post(self, message: dict) -> None:
        """(Under the lock.) Queue an answer for the writing thread."""
        self._outbox.append(message)
        if self._writer is None:
            self._writer = _start(self._write_answers, self.name + "-w")

    def _write_answers(self) -> None:
        while True:
            with self._lock:
                if not self._outbox:
                    self._writer = None
                    return
                message = self._outbox.popleft()
            self._send(message)

    def _ask_waiting(self) -> None:
        """The asking thread: the waiting requests in order, each through the `ask` of the turn that received it."""
        while True:
            with self._lock:
                if not self._waiting:
                    self._asker = None
                    return
                turn, request_id, raw = self._waiting.popleft()
                ask = self._ask if turn == self._turn and not self._closed else None
                if ask is not None:
                    self._waiting_since = self.clock()
            request = ToolRequest.from_wire(raw)
            decision = Decision(False, "the turn that asked has ended")
            if ask is not None:
                try:
                    decision = ask(request)
                except Exception as exc:  # an answer must always go back, or the CLI waits forever
                    log.exception("tool approval failed")
                    decision = Decision(False, f"approval failed: {exc}")
                finally:
                    with self._lock:
                        if self._waiting_since is not None:
                            self._waited += self.clock() - self._waiting_since
                        self._waiting_since = None
            with self._lock:
                self._post(_success(request_id, decision.wire(request)))


def _start(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    return thread


def _success(request_id: str, response: dict) -> dict:
    return {"type": "control_response", "response": {"subtype": "success", "request_id": request_id,
                                                     "response": response}}
