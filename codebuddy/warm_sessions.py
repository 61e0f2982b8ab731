"""CodeBuddy processes that speak stream-json: one per conversation, kept warm between its messages, capped and
ended when idle, asking the caller before a tool the permission mode does not allow (docs/warm-sessions.md).

A process runs `codebuddy -p --input-format stream-json --output-format stream-json --verbose
--replay-user-messages --session-id <id>` inside the conversation's sandbox and reads one JSON message per stdin
line: a user turn, or a control request (`initialize`, `interrupt`). It answers the CLI's own control requests
(`can_use_tool`) through the `ask` callable of the turn in progress, one at a time. A turn ends with its `result`
line, or, after an `interrupt`, with the `interrupted` control response (the real CLI writes no result for it). What
the process writes is untrusted (a tool can write into the CLI's stdout): codebuddy/cli_output.py caps it, and a
flood ends the turn and the process.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import select
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from codebuddy import process_tree
from codebuddy.cli_output import FLOOD_MESSAGE, LineQueue, OutputGauge, read_line, read_stderr_line
from codebuddy.tool_requests import ASK_QUESTION_TOOL as ASK_QUESTION_TOOL  # `X as X`: callers import these from here
from codebuddy.tool_requests import Ask as Ask
from codebuddy.tool_requests import Decision as Decision
from codebuddy.tool_requests import ToolDesk
from codebuddy.tool_requests import ToolRequest as ToolRequest
from codebuddy.tool_requests import deny_all as deny_all

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
SEND_TIMEOUT = 10.0  # seconds a line may take to go into the CLI's stdin (it reads at once unless it is stopped)
_STDERR_TAIL_LINES = 20
TURN_EVENTS_KEPT = 100  # the last lines of a turn kept in its outcome (the callback sees them all)
_ID_CHARS = 200  # of an unsupported request's id and subtype, echoed back
CLI_MARKER = "--replay-user-messages"  # in the CLI's argv, not in its tools' (finds the CLI inside the sandbox)


@dataclass
class TurnOutcome:
    """How a turn ended, in stream terms (the client turns it into a RunResult)."""

    # the turn's last output lines, result (or the flood's error) last if there was one
    events: collections.deque[dict] = field(default_factory=lambda: collections.deque(maxlen=TURN_EVENTS_KEPT))
    ended: bool = False  # a result or an interrupted response arrived, or the output was a flood
    interrupted: bool = False
    process_died: bool = False
    waited: float = 0.0  # seconds spent waiting for `ask` answers
    echoed: bool = False  # the CLI took the prompt (its echo came back)
    flooded: bool = False  # the output broke a cap of cli_output.py: the turn and the process end


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
    """The pipes of one CLI process in stream-json mode: lines written, lines read and sorted (lines for the turn,
    tool requests answered one at a time through the turn's `ask`, the `initialize` answer), stderr's tail, and
    the caps on what it writes (a flood ends the process)."""

    def __init__(self, proc: subprocess.Popen, *, conversation: str, session_id: str, tag: str,
                 clock: Callable[[], float] = time.monotonic, cli_session: str = "") -> None:
        self.proc = proc
        self.conversation = conversation  # "" for a spare, until a conversation adopts it (codebuddy/spares.py)
        self.session_id = session_id  # the conversation's session, as the bot knows it
        self.cli_session = cli_session or session_id  # the --session-id it runs on (a spare's own, once adopted)
        self.tag = tag  # the value of the run tag variable in its environment (finds its processes)
        self.clock = clock
        self.started_at = clock()
        self.last_used = self.started_at
        self.turns = 0
        self.cpu_counted = 0.0  # CPU seconds of its tree already counted to a turn (codebuddy/run_usage.py)
        self._lines = LineQueue()
        self._gauge = OutputGauge(clock)
        self.flood = ""  # why the output was a flood, once it was one: the process is then ended, never reused
        self._flood_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._input_stuck = False  # a write to its stdin timed out (see _send)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)  # so a write can give up (_send)
        self._desk = ToolDesk(self._send, self._flooded, clock, name=f"cli-ask-{proc.pid}")
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
        return not self.flood and not self._input_stuck and self.proc.poll() is None

    # -- the pipes

    def _send(self, message: dict) -> bool:
        """Write one line to the CLI's stdin within SEND_TIMEOUT; False when it is gone or stopped reading (a CLI a
        tool has stopped, say: its input is then left alone, and the process is not reused)."""
        data = memoryview((json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8", "replace"))
        deadline = time.monotonic() + SEND_TIMEOUT  # real time, whatever clock the turns are measured with
        if not self._write_lock.acquire(timeout=SEND_TIMEOUT):
            return False
        try:
            while data and not self._input_stuck:
                try:
                    data = data[os.write(self.proc.stdin.fileno(), data):]
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not select.select([], [self.proc.stdin], [], remaining)[1]:
                        self._input_stuck = True
            return not data
        except (OSError, ValueError, AttributeError):
            return False  # the process is gone; its reader reports the end
        finally:
            self._write_lock.release()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            while not self.flood:
                raw, too_long = read_line(self.proc.stdout)
                if not raw:
                    break
                self.last_output_at = self.clock()
                why = f"a line longer than {len(raw) - 1} bytes" if too_long else self._gauge.count(len(raw))
                if why:
                    self._flooded(why)
                    break
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self._dispatch(event, raw)
        except (OSError, ValueError):
            pass
        finally:
            self._initialized.set()
            self._lines.end()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        try:
            while not self.flood:
                raw = read_stderr_line(self.proc.stderr, self._count_stderr)
                if not raw:
                    break
                self.stderr_tail.append(raw.decode("utf-8", "replace").rstrip())
        except (OSError, ValueError):
            pass

    def _count_stderr(self, size: int) -> None:
        why = self._gauge.count(size)
        if why:
            self._flooded(f"stderr: {why}")

    def _flooded(self, why: str) -> None:
        """The output broke a cap: stop reading it, end the process (its turn ends with FLOOD_MESSAGE); logged once."""
        with self._flood_lock:
            if self.flood:
                return
            self.flood = why
        self._desk.close()
        log.warning("CodeBuddy 进程 %d 输出异常，已结束: %s", self.proc.pid, why)
        _signal_group(self.proc, signal.SIGKILL)

    def _dispatch(self, event: dict, raw: bytes) -> None:
        kind = event.get("type")
        if kind == "control_request":
            request = event.get("request") if isinstance(event.get("request"), dict) else {}
            request_id = str(event.get("request_id", ""))
            if request.get("subtype") == "can_use_tool":
                self._desk.request(request_id, request)
            else:  # hooks, MCP: nothing of ours registered them
                self._desk.refuse({"type": "control_response", "response": {
                    "subtype": "error", "request_id": request_id[:_ID_CHARS],
                    "error": f"unsupported control request {str(request.get('subtype'))[:_ID_CHARS]!r}"}})
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
        if not self._lines.put(raw):
            self._flooded(f"more than {self._lines.max_lines} lines or {self._lines.max_bytes >> 20} MiB waiting")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Wait for the CLI to answer `initialize`: "" when it did, else why it did not."""
        if not self._initialized.wait(timeout):
            return f"the CLI did not answer initialize within {timeout:.0f} s"
        if self._init_error:
            return self._init_error
        if self.flood:
            return FLOOD_MESSAGE
        return "" if self.alive() or not self._lines.empty() else "the CLI exited at start"

class WarmProcess(CliPipes):
    """One CLI process in stream-json mode, for one conversation and session: its turns (one at a time), interrupt,
    its tools' processes, its end."""

    # -- turns

    def turn(self, prompt: str, *, limit: float, cancel_event: threading.Event | None, ask: Ask,
             on_event: Callable[[dict], None], poll: float = 0.1) -> tuple[TurnOutcome, bool, bool]:
        """Send `prompt` and follow its turn to the end, a cancel or `limit` seconds (time waiting for `ask`
        answers included: a question nobody answers cannot hold the turn past it). Returns (outcome, cancelled,
        timed_out); `on_event` sees each line of the turn."""
        self._wait_quiet()
        self._lines.clear()  # leftovers of an earlier turn (a late line after its result) are not this turn's
        self.turns += 1
        self._desk.open_turn(ask)
        self._gauge.new_turn()
        outcome = TurnOutcome()
        started = self.clock()
        if not self.flood and not self._send(user_message(prompt, self.cli_session)):
            outcome.process_died = True
            return outcome, False, False
        echoed = False
        cancelled = timed_out = False
        while True:
            if self.flood:  # the process is being killed: the user reads why, in one line
                outcome.flooded = outcome.ended = True
                outcome.events.append({"type": "error", "error": FLOOD_MESSAGE})
                on_event(outcome.events[-1])
                break
            try:
                raw = self._lines.get(timeout=poll)
            except queue.Empty:
                raw = b""
            if raw is None:
                if self.flood:
                    continue
                outcome.process_died = True
                break
            event = json.loads(raw) if raw else {}
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
            elif self.clock() - started >= limit:
                timed_out = True
            if cancelled or timed_out:
                outcome.interrupted = self.interrupt()
                break
        outcome.waited = self._desk.close_turn()  # tool requests from now on are refused until the next turn
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
                raw = self._lines.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                continue
            if raw is None or self.flood:
                return False
            event = json.loads(raw)
            response = event.get("response") or {} if event.get("type") == "control_response" else {}
            if response.get("request_id") == request_id or event.get("type") == "result":
                return True

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

    def stop_tools(self, wait: float = 2.0) -> bool:
        """After an interrupt: end what the turn's tools left running; True once nothing is left."""
        deadline = self.clock() + wait
        while True:
            if not self.descendants():
                return True
            self.kill_tools()
            if self.clock() >= deadline:
                return False
            time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
