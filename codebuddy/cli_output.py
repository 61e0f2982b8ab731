"""What a CLI process writes, read as untrusted input: lines capped in length, a flood gauge, a bounded line queue.

A tool in the jail runs as the CLI's own uid and can write into the CLI's stdout and stderr (`/proc/<pid>/fd/1`), so
nothing read from them may make the bot hold more memory, start more threads or do more work than these caps allow
(docs/warm-sessions.md, "The channel back from the jail is untrusted").
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

# The largest legitimate line measured with the real CLI 2.163.0 is an image a Read tool returns, base64 in its
# tool result (~1.5 MB for a 1500x1500 noise PNG; the CLI scales images down to about that); a result with a long
# answer is below 1 MB even at a model's largest output. 4 MiB leaves more than twice that room.
MAX_LINE_BYTES = 4 << 20
# Without --include-partial-messages the CLI writes a few lines per model step; with it one per streamed chunk (a real
# model streams a few hundred a second). A burst of 5,000 and 1,000 a second after it is a flood, not a model.
LINES_BURST = 5000
LINES_PER_SECOND = 1000.0
# Everything written since the turn started (stdout and stderr): ~85 image reads, far more than a turn's answer.
MAX_TURN_BYTES = 128 << 20
# Lines waiting for the turn to take them; the turn takes them at once, so a full queue is a flood (or lines written
# while no turn runs, which nobody takes).
MAX_QUEUED_LINES = 2000
MAX_QUEUED_BYTES = 4 * MAX_LINE_BYTES
STDERR_CHUNK = 4096  # stderr is only kept for its tail: longer lines are cut there
FLOOD_MESSAGE = "CodeBuddy 输出异常 (过多或过长)：本次运行已终止。"


def read_line(stream: BinaryIO, limit: int = MAX_LINE_BYTES) -> tuple[bytes, bool]:
    """The next line of `stream` (b"" at its end) and whether it was longer than `limit`: then only its first `limit`
    bytes are read and returned, the rest is left unread (the caller stops reading a channel that does this)."""
    line = stream.readline(limit + 1)
    return line, len(line) > limit


def read_stderr_line(stream: BinaryIO, count: Callable[[int], object]) -> bytes:
    """The next stderr line cut to STDERR_CHUNK bytes (the rest read and dropped, in chunks), b"" at the end;
    `count` is told how many bytes each chunk held."""
    line = stream.readline(STDERR_CHUNK)
    count(len(line))
    rest = line
    while rest and not rest.endswith(b"\n") and len(rest) == STDERR_CHUNK:
        rest = stream.readline(STDERR_CHUNK)
        count(len(rest))
    return line


class OutputGauge:
    """Counts the lines and bytes a CLI writes; `count` says why they are a flood once they are one (else "")."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._tokens = float(LINES_BURST)  # lines that may still be written at once (refilled with time)
        self._refilled_at = clock()
        self._turn_bytes = 0

    def count(self, size: int, lines: int = 1) -> str:
        """Count `lines` lines of `size` bytes together; the reason they make a flood, or ""."""
        with self._lock:
            now = self.clock()
            self._tokens = min(float(LINES_BURST), self._tokens + (now - self._refilled_at) * LINES_PER_SECOND)
            self._refilled_at = now
            self._tokens -= lines
            self._turn_bytes += size
            if self._tokens < 0:
                return f"more than {LINES_BURST} lines at once, or {LINES_PER_SECOND:.0f} a second after them"
            if self._turn_bytes > MAX_TURN_BYTES:
                return f"more than {MAX_TURN_BYTES >> 20} MiB written in one turn"
            return ""

    def new_turn(self) -> None:
        """A turn starts: the byte budget is the turn's."""
        with self._lock:
            self._turn_bytes = 0


class LineQueue:
    """Lines read for the turn, at most MAX_QUEUED_LINES and MAX_QUEUED_BYTES of them waiting; once the output has
    ended (`end`) and the lines are taken, `get` returns None."""

    def __init__(self, max_lines: int = MAX_QUEUED_LINES, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._ended = False
        self._changed = threading.Condition()

    def put(self, line: bytes) -> bool:
        """Queue `line`; False (and nothing queued) when the queue is full."""
        with self._changed:
            if len(self._lines) >= self.max_lines or self._bytes + len(line) > self.max_bytes:
                return False
            self._lines.append(line)
            self._bytes += len(line)
            self._changed.notify()
            return True

    def end(self) -> None:
        """The output has ended: `get` returns None after the lines still queued."""
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def get(self, timeout: float) -> bytes | None:
        """The next line, None once the output has ended; raises queue.Empty after `timeout` s without one."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._lines or self._ended, timeout):
                raise queue.Empty
            if not self._lines:
                return None
            line = self._lines.popleft()
            self._bytes -= len(line)
            return line

    def clear(self) -> None:
        """Drop the lines waiting (an earlier turn's leftovers); the end stays."""
        with self._changed:
            self._lines.clear()
            self._bytes = 0

    def empty(self) -> bool:
        with self._changed:
            return not self._lines
