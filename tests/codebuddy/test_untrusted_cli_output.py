"""What a CLI process writes is untrusted (a tool in the jail can write into the CLI's stdout): floods of forged tool
requests, endless lines and line storms end the turn with one clear line, and neither threads nor memory grow with
them; tool requests are asked one at a time and only during a turn; an ordinary long answer still arrives.

The CLI here is real pipes written by the test (a `sleep` in a session of its own lends the pid the bot signals), the
bot's side the real WarmProcess with its reader threads; the last tests run the fake CLI through the client.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
import tracemalloc
from collections.abc import Iterable

import pytest

from codebuddy import cli_output, tool_requests
from codebuddy.cli_output import FLOOD_MESSAGE, LineQueue, OutputGauge
from codebuddy.warm_pool import WarmPool
from codebuddy.warm_sessions import Decision, ToolRequest, WarmProcess

MIB = 1 << 20


def forged_request(number: int, tool: str = "Bash") -> dict:
    return {"type": "control_request", "request_id": f"forged-{number}", "request": {
        "subtype": "can_use_tool", "tool_name": tool, "input": {"command": f"echo {number}"},
        "tool_use_id": f"toolu_{number}"}}


def result_line(text: str) -> dict:
    return {"type": "result", "subtype": "success", "is_error": False, "result": text, "session_id": "s"}


class PipedCli:
    """Stands in for the CLI's Popen: the test writes its stdout and stderr, and reads what the bot sent it."""

    def __init__(self) -> None:
        self.sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.pid = self.sleeper.pid
        out_r, self.out_w = os.pipe()
        err_r, self.err_w = os.pipe()
        in_r, in_w = os.pipe()
        self.stdout, self.stderr, self.stdin = os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"), os.fdopen(in_w, "wb")
        self._sent = os.fdopen(in_r, "rb")
        self.received: queue.Queue[dict] = queue.Queue()  # the control responses the bot wrote
        self.prompted = threading.Event()  # a turn's prompt arrived
        self._stop = threading.Event()
        self._writers: list[threading.Thread] = []
        threading.Thread(target=self._listen, daemon=True).start()

    def poll(self) -> int | None:
        return self.sleeper.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.sleeper.wait(timeout)

    def _listen(self) -> None:
        for line in self._sent:
            message = json.loads(line)
            if message.get("request_id") == "initialize":
                self.write([{"type": "control_response", "response": {"subtype": "success",
                                                                      "request_id": "initialize", "response": {}}}])
            elif message.get("type") == "user":
                self.prompted.set()
            elif message.get("type") == "control_response":
                self.received.put(message)

    def write(self, lines: Iterable[dict | bytes], fd: int | None = None) -> None:
        """Write `lines` (dicts as JSON lines, bytes as they are) in batches of ~256 KB, until stopped."""
        batch: list[bytes] = []
        for line in lines:
            batch.append(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode() + b"\n")
            if sum(map(len, batch)) >= 256 << 10 or len(batch) >= 1000:
                if not self._write(b"".join(batch), fd):
                    return
                batch = []
        if batch:
            self._write(b"".join(batch), fd)

    def _write(self, data: bytes, fd: int | None) -> bool:
        if self._stop.is_set():
            return False
        try:
            os.write(self.out_w if fd is None else fd, data)
            return True
        except OSError:  # the bot closed its end
            return False

    def write_in_background(self, lines: Iterable[dict | bytes], fd: int | None = None) -> threading.Thread:
        """Write `lines` once the turn's prompt has arrived (as a tool of the turn would)."""
        writer = threading.Thread(target=lambda: self.prompted.wait(10) and self.write(lines, fd), daemon=True)
        writer.start()
        self._writers.append(writer)
        return writer

    def answers(self, count: int | None = None, timeout: float = 10.0) -> list[dict]:
        """The next `count` messages the bot wrote (each within `timeout` s), or, without `count`, every one until
        none came for 0.3 s."""
        if count is not None:
            return [self.received.get(timeout=timeout) for _ in range(count)]
        found = []
        while True:
            try:
                found.append(self.received.get(timeout=0.3))
            except queue.Empty:
                return found

    def close(self, process: WarmProcess) -> None:
        self._stop.set()
        for reader, handle in zip(process._readers, (self.stdout, self.stderr), strict=True):
            if not reader.is_alive():  # the bot stopped reading: its end goes, so a blocked writer fails
                handle.close()
        for writer in self._writers:
            writer.join(timeout=10)
        for fd in (self.out_w, self.err_w):
            os.close(fd)
        process.stop(grace=0.2)
        for handle in (self.stdout, self.stderr, self._sent):
            handle.close()
        self.sleeper.kill()
        self.sleeper.wait()


@pytest.fixture
def cli():
    made: list[tuple[PipedCli, WarmProcess]] = []

    def start() -> tuple[PipedCli, WarmProcess]:
        piped = PipedCli()
        process = WarmProcess(piped, conversation="c", session_id="s", tag="t")  # type: ignore[arg-type]
        assert process.wait_ready(10) == ""
        made.append((piped, process))
        return piped, process

    yield start
    for piped, process in made:
        piped.close(process)


class Asked:
    """An `ask` that records how many questions it is holding at once (each held until `release` is set)."""

    def __init__(self, hold: float = 0.0) -> None:
        self.decision = Decision(True)
        self.hold = hold
        self.release = threading.Event()
        self.requests: list[ToolRequest] = []
        self.holding = self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, request: ToolRequest) -> Decision:
        with self._lock:
            self.requests.append(request)
            self.holding += 1
            self.most_at_once = max(self.most_at_once, self.holding)
        self.release.wait(self.hold)
        with self._lock:
            self.holding -= 1
        return self.decision


def run_turn(process: WarmProcess, ask=tool_requests.deny_all, limit: float = 30.0):
    seen: list[dict] = []
    outcome, cancelled, timed_out = process.turn("问题", limit=limit, cancel_event=None, ask=ask,
                                                 on_event=seen.append, poll=0.05)
    assert not cancelled and not timed_out
    return outcome, seen


def threads_sampled(stop: threading.Event, found: dict[str, int]) -> None:
    while not stop.wait(0.01):
        found["most"] = max(found["most"], threading.active_count())
        found["askers"] = max(found["askers"], sum(t.name.startswith("cli-ask-") for t in threading.enumerate()))


# ---------------------------------------------------------------- floods

def test_a_hundred_thousand_forged_tool_requests_ask_one_question_and_end_the_turn(cli):
    piped, process = cli()
    before = threading.active_count()
    sampled, stop = {"most": before, "askers": 0}, threading.Event()
    sampler = threading.Thread(target=threads_sampled, args=(stop, sampled), daemon=True)
    sampler.start()
    asked = Asked(hold=30.0)  # the user never answers the first question during the flood
    tracemalloc.start()
    try:
        piped.write_in_background(forged_request(n) for n in range(100_000))
        outcome, seen = run_turn(process, asked)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        asked.release.set()
        stop.set()
        sampler.join()
    assert outcome.flooded and outcome.ended and not outcome.process_died
    assert seen[-1] == {"type": "error", "error": FLOOD_MESSAGE}
    assert len(asked.requests) <= 1 and asked.most_at_once <= 1  # at most one question reached the user
    # the test's sampler and writer, and the desk's two threads at most (one asks, one writes answers)
    assert sampled["askers"] <= 2 and sampled["most"] <= before + 4
    assert peak < 16 * MIB, f"{peak / MIB:.1f} MiB held during the flood"
    assert not process.alive() and "refused" in process.flood
    answers = piped.answers()  # the question's own (allowed), the waiting ones' and the refusals
    assert len(answers) <= 1 + tool_requests.MAX_WAITING + tool_requests.MAX_REFUSALS
    assert sum(a["response"]["response"]["allowed"] for a in answers) == len(asked.requests)


def test_a_storm_of_ordinary_lines_ends_the_turn_without_queueing_them_all(cli):
    piped, process = cli()
    tracemalloc.start()
    try:
        piped.write_in_background({"type": "system", "subtype": "status", "n": n} for n in range(100_000))
        outcome, seen = run_turn(process)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.flooded and seen[-1]["error"] == FLOOD_MESSAGE
    assert len(seen) < 100_000 and len(outcome.events) <= 100
    assert "lines at once" in process.flood or "waiting" in process.flood
    assert peak < 32 * MIB, f"{peak / MIB:.1f} MiB held during the storm"


def test_a_fifty_megabyte_line_without_a_newline_is_never_held_and_ends_the_turn(cli):
    piped, process = cli()
    tracemalloc.start()
    try:
        piped.write_in_background(b"x" * MIB for _ in range(50))
        outcome, seen = run_turn(process)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.flooded and seen[-1]["error"] == FLOOD_MESSAGE
    assert f"longer than {cli_output.MAX_LINE_BYTES} bytes" in process.flood
    assert peak < 3 * cli_output.MAX_LINE_BYTES + 2 * MIB, f"{peak / MIB:.1f} MiB held for one line"


def test_an_endless_stderr_line_is_cut_and_ends_the_turn(cli):
    piped, process = cli()
    piped.write_in_background((b"e" * MIB for _ in range(cli_output.MAX_TURN_BYTES // MIB + 8)), fd=piped.err_w)
    outcome, seen = run_turn(process)
    assert outcome.flooded and process.flood.startswith("stderr:")
    assert all(len(line) <= cli_output.STDERR_CHUNK for line in process.stderr_tail)


def test_lines_written_while_no_turn_runs_fill_the_queue_and_the_process_is_not_reused(cli):
    piped, process = cli()
    pool = WarmPool(2, 600, stop=lambda process: None)
    assert pool.reserve()
    pool.started(process, reserved=True)
    pool.give_back(process, keep=True)  # idle, warm
    piped.write({"type": "assistant", "message": {"content": [{"type": "text", "text": "x" * 100}]}}
                for _ in range(cli_output.MAX_QUEUED_LINES + 10))
    deadline = time.monotonic() + 10
    while process.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process.alive() and "waiting" in process.flood
    assert pool.take("c", "s") is None and pool.ended["输出异常"] == 1
    outcome, seen = run_turn(process)  # even a turn given it anyway ends at once, in one line
    assert outcome.flooded and seen == [{"type": "error", "error": FLOOD_MESSAGE}]


# ---------------------------------------------------------------- what still works

def test_an_ordinary_long_answer_and_a_large_image_result_still_arrive(cli):
    piped, process = cli()
    answer = ("第一行：很长的回答。Line of plain text.\n" * 8000)[:200_000]
    image = {"type": "user", "message": {"role": "user", "content": [{"type": "tool_result", "content": [
        {"type": "image", "source": {"type": "base64", "data": "A" * (3 * MIB // 2)}}]}]}}
    piped.write_in_background([image, {"type": "assistant", "message": {"content": [{"type": "text",
                                                                                      "text": answer}]}},
                               result_line(answer)])
    outcome, seen = run_turn(process)
    assert outcome.ended and not outcome.flooded and process.alive()
    assert seen[-1]["result"] == answer and len(seen) == 3


def test_tool_requests_wait_their_turn_one_question_at_a_time(cli):
    piped, process = cli()
    asked = Asked(hold=0.2)
    piped.write_in_background([forged_request(n) for n in range(3)])
    done = threading.Thread(target=lambda: (piped.answers(3), piped.write([result_line("好")])))
    done.start()
    outcome, seen = run_turn(process, asked)
    done.join()
    assert outcome.ended and not outcome.flooded and seen[-1]["result"] == "好"
    assert [r.tool_use_id for r in asked.requests] == ["toolu_0", "toolu_1", "toolu_2"]
    assert asked.most_at_once == 1
    assert outcome.waited >= 0.5  # three questions of 0.2 s each, one after the other


def test_a_request_past_the_waiting_ones_is_refused_at_once(cli):
    piped, process = cli()
    asked = Asked(hold=30.0)
    turn = threading.Thread(target=run_turn, args=(process, asked), daemon=True)
    turn.start()
    assert piped.prompted.wait(10)
    piped.write([forged_request(0)])
    deadline = time.monotonic() + 10
    while not asked.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    piped.write(forged_request(n) for n in range(1, tool_requests.MAX_WAITING + 3))
    refused = piped.answers(2)
    assert [r["response"]["request_id"] for r in refused] == ["forged-9", "forged-10"]  # 1 asked, 8 waiting
    assert all("waiting" in r["response"]["response"]["reason"] for r in refused)
    assert len(asked.requests) == 1
    piped.write([result_line("完")])
    turn.join(10)
    asked.release.set()
    answered = piped.answers(1 + tool_requests.MAX_WAITING)  # the one asked, then the waiting ones
    assert answered[0]["response"]["response"]["allowed"] is True
    assert [a["response"]["response"]["reason"] for a in answered[1:]] == ["the turn that asked has ended"] * 8


def test_a_tool_request_outside_a_turn_is_refused_at_once(cli):
    piped, process = cli()
    piped.write([forged_request(1, tool="AskUserQuestion")])
    [refusal] = piped.answers(1)
    assert refusal["response"] == {"subtype": "success", "request_id": "forged-1", "response": {
        "allowed": False, "reason": "no turn is in progress", "tool_use_id": "toolu_1"}}
    assert process.alive()


# ---------------------------------------------------------------- the parts

def test_the_gauge_allows_a_burst_then_a_rate_and_a_byte_budget_per_turn():
    now = [0.0]
    gauge = OutputGauge(lambda: now[0])
    assert gauge.count(100, lines=cli_output.LINES_BURST) == ""
    assert "lines at once" in gauge.count(100)
    now[0] += 1.0
    assert gauge.count(100, lines=int(cli_output.LINES_PER_SECOND) - 1) == ""
    assert "MiB" in gauge.count(cli_output.MAX_TURN_BYTES, lines=0)
    gauge.new_turn()
    assert gauge.count(10 * MIB, lines=0) == ""


def test_the_line_queue_refuses_lines_past_its_caps_and_ends_once():
    lines = LineQueue(max_lines=2, max_bytes=10)
    assert lines.put(b"1234") and lines.put(b"5678") and not lines.put(b"9")
    assert lines.get(0.1) == b"1234" and not lines.put(b"1234567")
    lines.end()
    assert lines.get(0.1) == b"5678" and lines.get(0.1) is None and lines.get(0.1) is None
    with pytest.raises(queue.Empty):
        LineQueue().get(0.01)


# ---------------------------------------------------------------- through the client, with the fake CLI

def test_the_fake_clis_flood_reaches_the_user_in_one_line_and_the_next_message_gets_a_new_process(tmp_path):
    from codebuddy_client import CodeBuddyClient
    from tests.conftest import FAKE_CLI

    env = {**os.environ, "HOME": str(tmp_path)}
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=60, kill_grace=1, env=env,
                             warm_sessions=2)
    try:
        asked = Asked(hold=30.0)  # the sender does not answer the first question
        flooded = client.run("[flood=100000] 你好", conversation="c1", ask=asked)
        asked.release.set()
        assert not flooded.ok and flooded.error == FLOOD_MESSAGE and len(asked.requests) <= 1
        assert client.warm_stats()["live"] == 0  # not kept warm
        long = client.run("[longline=50000000]", conversation="c1")
        assert long.error == FLOOD_MESSAGE
        answer = client.run("[big=200000]", conversation="c1")
        assert answer.ok and len(answer.text) == 200_000
        assert client.warm_stats()["live"] == 1
    finally:
        client.close()
