"""A turn's usage (codebuddy/run_usage.py): its share of the session totals the CLI reports, kept across processes and
restarts out of the jail's sight, forged totals never counting less, and the CPU its process tree used."""

from __future__ import annotations

import json
import os
import stat

from codebuddy.run_usage import USAGE_FILE, Usage, reported, session_totals, share, turn_usage
from codebuddy_client import CodeBuddyClient
from tests.conftest import FAKE_CLI


def _result(inp: int, out: int, cost: float = 0.0, **extra) -> dict:
    return {"type": "result", "usage": {"input_tokens": inp, "output_tokens": out, "cache_read_input_tokens": 3,
                                        "cache_creation_input_tokens": 1}, "total_cost_usd": cost, **extra}


def test_a_turn_is_the_change_of_the_session_totals_and_a_lower_total_counts_whole():
    first = reported(_result(1000, 200, modelUsage={"glm-4": {}}))
    assert first == Usage(1000, 200, 3, 1, 0.0, "glm-4") and first.tokens == 1200
    second = reported(_result(2000, 400, 0.5))
    assert share(second, first) == Usage(1000, 200, 0, 0, 0.5, "")
    assert share(first, None) == first
    forged = reported(_result(5, 5))  # below what the session had reported: counted whole, never negative
    assert share(forged, second) == forged


def test_reported_numbers_are_made_safe():
    hostile = {"usage": {"input_tokens": -5, "output_tokens": "9", "cache_read_input_tokens": float("nan"),
                         "cache_creation_input_tokens": 10**30}, "total_cost_usd": True, "modelUsage": "x"}
    assert reported(hostile, "m") == Usage(0, 0, 0, 10**12, 0.0, "m")
    assert reported({"usage": None}) == Usage()


def test_session_totals_survive_in_a_private_file_and_a_turn_without_result_counts_cpu_only(tmp_path):
    base = str(tmp_path)
    assert turn_usage(_result(100, 10), base, "cli-1", 0.5).tokens == 110
    assert turn_usage(_result(300, 30), base, "cli-1", 0.25) == Usage(200, 20, 0, 0, 0.0, "", 0.25)
    assert turn_usage(_result(50, 5), base, "cli-2", None).tokens == 55  # another session: its own totals
    assert stat.S_IMODE(os.stat(tmp_path / USAGE_FILE).st_mode) == 0o600
    assert set(session_totals(base)) == {"cli-1", "cli-2"}
    assert turn_usage(None, base, "cli-1", 1.5, "m") == Usage(model="m", cpu_seconds=1.5)
    (tmp_path / USAGE_FILE).write_text("not json")
    assert session_totals(base) == {} and turn_usage(_result(400, 40), base, "cli-1", 0).tokens == 440


def test_the_client_reports_each_turns_share_across_processes_and_its_cpu(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=20, env=env, warm_sessions=2,
                             permission_mode="bypassPermissions")
    session = "11111111-2222-3333-4444-555555555555"
    try:
        first = client.run("hi [usage=1000:200:0.25]", conversation="c1", session_id=session)
        burn = "[tool=Bash:python3 -c 'import time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass']"
        second = client.run(f"again [usage=1000:200] {burn}", conversation="c1", session_id=session)
    finally:
        client.close()  # the warm process ends: the next run is a new process on the same session
    assert first.ok and first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (1000, 200)
    assert first.usage.cost_usd == 0.25
    assert second.ok and second.usage is not None and second.usage.tokens == 1200 and second.usage.cost_usd == 0
    assert second.usage.cpu_seconds is not None and second.usage.cpu_seconds >= 0.3  # the tool's CPU, reaped by the CLI
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=20, env=env, warm_sessions=2,
                             permission_mode="bypassPermissions")
    try:
        third = client.run("third [usage=10:1]", conversation="c1", session_id=session)
    finally:
        client.close()
    assert third.ok and third.usage is not None and third.usage.tokens == 11  # the session's total was 2411
    stored = json.loads((tmp_path / "ws" / "conversations").joinpath(
        os.listdir(tmp_path / "ws" / "conversations")[0], USAGE_FILE).read_text())
    assert stored[session]["input_tokens"] == 2010
