"""The CLI client (codebuddy_client.py): stream-json parsing, session ids, stopped runs leave nothing behind."""

from __future__ import annotations

import json
import os
import threading
import time

from codebuddy.stream_events import StreamState, parse_stream_line
from codebuddy.warm_sessions import Decision
from codebuddy_client import CodeBuddyClient, result_from_stream
from tests.conftest import FAKE_CLI


def _run(lines, returncode=0, stderr=""):
    state = StreamState()
    for line in lines:
        parse_stream_line(line if isinstance(line, str) else json.dumps(line), state)
    return result_from_stream(state, returncode, stderr, 1.0)


def test_stream_json_success_needs_a_result_line_without_is_error():
    result = _run([{"type": "system", "subtype": "init", "session_id": "s1"},
                   {"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "Read"}]}},
                   {"type": "result", "subtype": "success", "is_error": False, "result": "done", "session_id": "s1"}])
    assert result.ok and result.text == "done" and result.session_id == "s1" and result.last_step == "工具 Read"


def test_stream_json_failures():
    assert not _run([{"type": "result", "subtype": "error_during_execution", "is_error": True,
                      "errors": ["boom"]}]).ok
    error_line = _run([{"type": "error", "error": "Authentication required"}])
    assert not error_line.ok and "Authentication required" in error_line.error
    missing = _run([{"type": "system", "subtype": "init"}], stderr="network down")
    assert not missing.ok and "network down" in missing.error
    crashed = _run(["not json"], returncode=3, stderr="Traceback")
    assert not crashed.ok and "3" in crashed.error


def test_a_stopped_run_leaves_no_process_even_in_another_session(tmp_path):
    """The real CLI's Bash tool starts commands in their own session; after a KILL they must still go."""
    import os
    from pathlib import Path

    from codebuddy_client import CodeBuddyClient
    from tests.conftest import FAKE_CLI, process_alive

    pids = tmp_path / "pids.txt"
    env = {**os.environ, "HOME": str(tmp_path), "CODEBUDDY_FAKE_PIDS": str(pids)}
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=1.0, kill_grace=0.3, env=env)
    result = client.run("[sleep=30] [spawn-session] [ignore-term]", run_tag="t-leftover")
    assert result.timed_out
    child = int(Path(pids).read_text().split()[0])
    deadline = time.monotonic() + 2
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child)


def test_answer_text_grows_with_partial_and_whole_assistant_messages() -> None:
    state = StreamState()
    deltas = ("先", "看看")
    lines = [{"type": "stream_event", "event": {"type": "content_block_delta",
                                                "delta": {"type": "text_delta", "text": text}}} for text in deltas]
    for line in lines:
        parse_stream_line(json.dumps(line), state)
    assert state.answer_text == "先看看"
    parse_stream_line(json.dumps({"type": "assistant", "message": {"content": [
        {"type": "text", "text": "先看看代码。"}, {"type": "tool_use", "name": "Read", "input": {}}]}}), state)
    assert state.answer_text == "先看看代码。"
    parse_stream_line(json.dumps({"type": "assistant", "message": {"content": [{"type": "text", "text": "结论"}]}}),
                      state)
    assert state.answer_text == "先看看代码。\n\n结论"


def test_time_waiting_for_an_answer_counts_towards_the_run_timeout(tmp_path):
    """A question nobody answers cannot hold a run past its timeout: the run ends as timed out."""
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=1.0, kill_grace=0.3,
                             env={**os.environ, "HOME": str(tmp_path)})
    release, asked = threading.Event(), []

    def ask(request):
        asked.append(request.tool_name)
        release.wait(20)  # nobody answers until the run is over
        return Decision(True)

    started = time.monotonic()
    result = client.run("[tool=Bash:echo hi]", ask=ask, run_tag="t-unanswered")
    release.set()
    assert asked == ["Bash"] and result.timed_out and "执行超时" in result.error
    assert time.monotonic() - started < 10
    client.close()
