"""CodeBuddy processes that speak stream-json: one per conversation, kept warm between its messages, capped and
ended when idle, asking the caller before a tool the permission mode does not allow (docs/warm-sessions.md).

A process runs `codebuddy -p --input-format stream-json --output-format stream-json --verbose
--replay-user-messages --session-id <id>` inside the conversation's sandbox and reads one JSON message per stdin
line: a user turn, or a control request (`initialize`, `interrupt`). It answers the CLI's own control requests
(`can_use_tool`) through the `ask` callable of the turn in progress. A turn ends with its `result` line, or,
after an `interrupt`, with the `interrupted` control response (the real CLI writes no result for it).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from codebuddy import process_tree

log = logging.getLogger("codebuddy_client")

PROTOCOL_FLAGS = ("--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
                  "--replay-user-messages")
INTERRUPT_GRACE = 2.0  # seconds an interrupted turn may take to end before the process is killed
# The CLI (2.163.0) mishandles a message that arrives while it is still winding a turn down: right after a result it
# may run the previous message twice, right after an interrupt it may answer its own abort note and drop the message
# (both reproduced, docs/warm-sessions.md). A new turn waits until the process has been quiet this long.
QUIET_BEFORE_TURN = 0.25
QUIET_AFTER_INTERRUPT = 1.0
START_TIMEOUT = 60.0  # seconds for the CLI to answer `initialize`
_STDERR_TAIL_LINES = 20
CLI_MARKER = "--replay-user-messages"  # in the CLI's argv, not in its tools' (finds the CLI inside the sandbox)
ASK_QUESTION_TOOL = "AskUserQuestion"


@dataclass(frozen=True)
class ToolRequest:
    """The CLI asks whether it may use a tool (`can_use_tool`), or asks the user a question (AskUserQuestion)."""

    tool_name: str
    input: dict
    tool_use_id: str = ""
    reason: str = ""  # the CLI's decision_reason or blocked_path, when it gives one

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


@dataclass
class TurnOutcome:
    """How a turn ended, in stream terms (the client turns it into a RunResult)."""

    events: list[dict] = field(default_factory=list)  # the turn's output lines, result last if there was one
    ended: bool = False  # a result or an interrupted response arrived
    interrupted: bool = False
    process_died: bool = False
    waited: float = 0.0  # seconds spent waiting for `ask` answers
    echoed: bool = False  # the CLI took the prompt (its echo came back)


def user_message(text: str, session_id: str) -> dict:
    return {"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": None,
            "session_id": session_id}


def _echoed_text(event: dict) -> str | None:
    """The text of a replayed user message (our prompt coming back), None for anything else (tool results too)."""
    if event.get("type") != "user":
        return None
    content = (event.get("message") or {}).get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(b, dict) and b.get("type") == "text"
                                                     for b in content):
        return "".join(str(b.get("text", "")) for b in content)
    return None


class CliPipes:
    """The pipes of one CLI process in stream-json mode: lines written, lines read and sorted (events for the turn,
    tool requests answered through the turn's `ask`, the `initialize` answer), stderr's tail."""

    def __init__(self, proc: subprocess.Popen, *, conversation: str, session_id: str, tag: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc = proc
        self.conversation = conversation
        self.session_id = session_id
        self.tag = tag  # the value of the run tag variable in its environment (finds its processes)
        self.clock = clock
        self.started_at = clock()
        self.last_used = self.started_at
        self.turns = 0
        self._events: queue.Queue[dict | None] = queue.Queue()
        self._write_lock = threading.Lock()
        self._ask: Ask = deny_all
        self._ask_lock = threading.Lock()
        self._waited = 0.0
        self._waiting_since: float | None = None
        self._initialized = threading.Event()
        self._init_error = ""
        self.echoes_seen = 0
        self.last_output_at = self.started_at
        self._quiet_needed = 0.0  # the first turn may follow `initialize` at once; later ones wait (see above)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True, name=f"cli-out-{proc.pid}"),
                         threading.Thread(target=self._read_stderr, daemon=True, name=f"cli-err-{proc.pid}")]
        for reader in self._readers:
            reader.start()
        self._send({"type": "control_request", "request_id": "initialize",
                    "request": {"subtype": "initialize", "hooks": None, "capabilities": {"askUserQuestion": True}}})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- the pipes

    def _send(self, message: dict) -> bool:
        line = (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "replace")
        with self._write_lock:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
                return True
            except (BrokenPipeError, OSError, ValueError):
                return False  # the process is gone; its reader reports the end

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                try:
                    event = json.loads(raw.decode("utf-8", "replace"))
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._dispatch(event)
        except (OSError, ValueError):
            pass
        finally:
            self._initialized.set()
            self._events.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            for raw in self.proc.stderr:
                self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def _dispatch(self, event: dict) -> None:
        self.last_output_at = self.clock()
        kind = event.get("type")
        if kind == "control_request":
            request = event.get("request") or {}
            if request.get("subtype") == "can_use_tool":
                threading.Thread(target=self._answer_tool, args=(str(event.get("request_id", "")), request),
                                 daemon=True, name=f"cli-ask-{self.proc.pid}").start()
            else:  # hooks, MCP: nothing of ours registered them
                self._send({"type": "control_response", "response": {
                    "subtype": "error", "request_id": event.get("request_id", ""),
                    "error": f"unsupported control request {request.get('subtype')!r}"}})
            return
        if kind == "control_response":
            response = event.get("response") or {}
            if response.get("request_id") == "initialize":
                if response.get("subtype") == "error":
                    self._init_error = str(response.get("error") or "initialize failed")
                self._initialized.set()
                return
        if kind == "error" and not self._initialized.is_set():
            self._init_error = str(event.get("error") or event.get("message") or "unknown error")
        self._events.put(event)

    def _answer_tool(self, request_id: str, raw: dict) -> None:
        request = ToolRequest(tool_name=str(raw.get("tool_name") or "?"),
                              input=raw.get("input") if isinstance(raw.get("input"), dict) else {},
                              tool_use_id=str(raw.get("tool_use_id") or ""),
                              reason=str(raw.get("decision_reason") or raw.get("blocked_path") or ""))
        with self._ask_lock:
            ask = self._ask
            self._waiting_since = self.clock()
        try:
            decision = ask(request)
        except Exception as exc:  # an answer must always go back, or the CLI waits forever
            log.exception("tool approval failed")
            decision = Decision(False, f"approval failed: {exc}")
        finally:
            with self._ask_lock:
                if self._waiting_since is not None:
                    self._waited += self.clock() - self._waiting_since
                self._waiting_since = None
        self._send({"type": "control_response", "response": {"subtype": "success", "request_id": request_id,
                                                             "response": decision.wire(request)}})

    def waited(self) -> float:
        """Seconds this turn has spent waiting for answers to tool requests (including one waiting now)."""
        with self._ask_lock:
            return self._waited + (self.clock() - self._waiting_since if self._waiting_since is not None else 0.0)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for the CLI to answer `initialize`: "" when it did, else why it did not."""
        if not self._initialized.wait(timeout):
            return f"the CLI did not answer initialize within {timeout:.0f} s"
        if self._init_error:
            return self._init_error
        return "" if self.alive() or not self._events.empty() else "the CLI exited at start"

class WarmProcess(CliPipes):
    """One CLI process in stream-json mode, for one conversation and session: its turns (one at a time), interrupt,
    its tools' processes, its end."""

    # -- turns

    def turn(self, prompt: str, *, limit: float, cancel_event: threading.Event | None, ask: Ask,
             on_event: Callable[[dict], None], poll: float = 0.1) -> tuple[TurnOutcome, bool, bool]:
        """Send `prompt` and follow its turn to the end, a cancel or `limit` seconds (time waiting for `ask`
        answers not counted). Returns (outcome, cancelled, timed_out); `on_event` sees each line of the turn."""
        self._wait_quiet()
        self._drain()  # leftovers of an earlier turn (a late line after its result) are not this turn's
        with self._ask_lock:
            self._ask = ask
            self._waited = 0.0
        self.turns += 1
        outcome = TurnOutcome()
        started = self.clock()
        if not self._send(user_message(prompt, self.session_id)):
            outcome.process_died = True
            return outcome, False, False
        echoed = False
        cancelled = timed_out = False
        while True:
            try:
                event = self._events.get(timeout=poll)
            except queue.Empty:
                event = {}
            if event is None:
                outcome.process_died = True
                break
            if event:
                text = _echoed_text(event)
                if text is not None and not echoed and text.strip() == prompt.strip():
                    echoed = outcome.echoed = True
                    self.echoes_seen += 1
                    continue
                # Until our prompt comes back, lines belong to an earlier turn (the CLI can replay a queued
                # message twice): skip them, unless this CLI never echoes at all.
                if echoed or self.echoes_seen == 0:
                    outcome.events.append(event)
                    on_event(event)
                    if event.get("type") == "result" or event.get("type") == "error":
                        outcome.ended = True
                        break
            if cancel_event is not None and cancel_event.is_set():
                cancelled = True
            elif self.clock() - started - self.waited() >= limit:
                timed_out = True
            if cancelled or timed_out:
                outcome.interrupted = self.interrupt()
                break
        with self._ask_lock:
            outcome.waited = self._waited
            self._ask = deny_all
        self.last_used = self.clock()
        return outcome, cancelled, timed_out

    def _wait_quiet(self, limit: float = 5.0) -> None:
        """Wait until the process has written nothing for the quiet period its last turn needs (at most `limit`)."""
        deadline = self.clock() + limit
        while self.alive():
            silent = self.clock() - self.last_output_at
            if silent >= self._quiet_needed or self.clock() >= deadline:
                break
            time.sleep(min(0.05, self._quiet_needed - silent))
        self._quiet_needed = QUIET_BEFORE_TURN

    def interrupt(self, grace: float = INTERRUPT_GRACE) -> bool:
        """Stop the turn in progress and wait up to `grace` s for it to end; True when it did (process still warm)."""
        request_id = f"interrupt-{uuid.uuid4().hex[:8]}"
        self._quiet_needed = QUIET_AFTER_INTERRUPT
        if not self._send({"type": "control_request", "request_id": request_id,
                           "request": {"subtype": "interrupt"}}):
            return False
        deadline = self.clock() + grace
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            try:
                event = self._events.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if event is None:
                return False
            response = event.get("response") or {} if event.get("type") == "control_response" else {}
            if response.get("request_id") == request_id or event.get("type") == "result":
                return True

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event is None:  # keep the end-of-output marker for the turn to see
                self._events.put(None)
                return

    # -- processes

    def descendants(self) -> list[int]:
        """Pids of every process below the CLI (its tools' commands)."""
        return process_tree.descendants(process_tree.cli_pid(self.proc.pid, CLI_MARKER))

    def kill_tools(self) -> int:
        """SIGKILL what the CLI's tools left running (an interrupted Bash command); the CLI itself stays."""
        return process_tree.kill(self.descendants())

    def stop(self, grace: float = 3.0) -> None:
        """End the process: close its stdin, TERM the process group, KILL it after `grace` s."""
        with self._write_lock:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass
        _signal_group(self.proc, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(self.proc, signal.SIGKILL)  # whatever the CLI started in its group goes with it
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("CodeBuddy 进程 %d 无法结束", self.proc.pid)
        for reader in self._readers:
            reader.join(timeout=2)

    def rss_bytes(self, children: dict[int, list[int]] | None = None) -> int:
        """Resident memory of the process and everything below it (`children`: /proc's tree, if already read)."""
        below = process_tree.descendants(self.proc.pid, children=children)
        return process_tree.rss_bytes([self.proc.pid, *below])


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
