"""End to end: who used how much (usage/). `python bot.py` against the stand-in with the fake CLI, whose results
report the session's usage totals as the real CLI does ([usage=IN:OUT]): /usage shows the runs and tokens, a prompt
over USER_DAILY_TOKENS is refused without a run and says when the quota resets, the numbers survive a restart,
`bot.py usage --csv` sums to them, /metrics counts them; two processes on one PostgreSQL hold one quota.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import urllib.request

import psycopg
import pytest

from tests.conftest import ROOT, cli_runs, replies

pytestmark = pytest.mark.e2e


def _ask(standin, text: str, user: str = "u1", count: int = 1, **fields) -> str:
    """Send `text` and return its `count`th reply (a command's answer or a refusal: the first)."""
    return replies(standin, standin.send_bot_message(text, sender_staff_id=user, **fields), count, timeout=30)[-1]


def _answer(standin, text: str, **fields) -> str:
    """Send a prompt and return its answer (after the acknowledgement)."""
    return _ask(standin, text, count=2, **fields)


def _metric(port: int, name: str, label: str = "") -> float:
    """One sample of /metrics: the family `name`, its labels holding `label` (every sample has host="…")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf"^{name}{{[^}}]*{re.escape(label)}[^}}]*}} (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


def test_usage_quota_restart_report_and_metrics(standin, make_bot, tmp_path):
    settings = {"USER_DAILY_TOKENS": "3000", "STATUS_PORT": "0", "ADMIN_USERS": "boss"}
    bot = make_bot(**settings)
    for number in range(3):  # 1,200 tokens each: 2,400 before the third, which crosses 3,000 and finishes
        assert f"回答: 问题{number}" in _answer(standin, f"问题{number} [usage=1000:200]")
    refused = _ask(standin, "问题3 [usage=1000:200]")
    assert refused.startswith("你今天的 token 用量已达上限: 3,600/3,000 (输入 3,000，输出 600)")
    assert re.search(r"\d\d-\d\d 00:00 \(Asia/Shanghai\) 重置", refused)
    assert not [run for run in cli_runs(tmp_path) if "问题3" in run["prompt"]]  # refused before any run
    mine = _ask(standin, "/usage")
    assert re.search(r"今天 \(\d\d-\d\d\): 3 次运行，输入 3,000 / 输出 600 tokens，费用 \$0\.00，CPU [\d.]+ 秒", mine)
    assert "今日 token 剩 0/3,000" in mine
    assert _ask(standin, "用量", user="u2").count("0 次运行") == 2  # someone else's day is their own
    port = bot.status_port()
    assert _metric(port, "dingtalk_bot_usage_tokens_total", 'kind="input"') == 3000
    assert _metric(port, "dingtalk_bot_usage_runs_total") == 3

    assert bot.terminate() == 0  # the numbers are in the task DB: a restarted bot reads the same
    make_bot(**settings)
    assert mine.split("\n")[1] in _ask(standin, "/usage")
    assert _ask(standin, "问题4 [usage=1000:200]").startswith("你今天的 token 用量已达上限: 3,600/3,000")
    everyone = _ask(standin, "/usage all", user="boss")
    assert "全部用量: 3 次运行，输入 3,000 / 输出 600 tokens" in everyone and "Alice (u1)" in everyone
    assert "只有管理员" in _ask(standin, "/usage all")

    report = subprocess.run([sys.executable, str(ROOT / "bot.py"), "usage", "--csv", "--db",
                             str(tmp_path / "data" / "tasks.db")], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=bot.env)
    assert report.returncode == 0, report.stderr
    rows = list(csv.reader(io.StringIO(report.stdout)))
    assert rows[-1][:5] == ["TOTAL", "", "3", "3000", "600"]
    assert [row[:5] for row in rows[1:-1]] == [["u1", "Alice", "3", "3000", "600"]]


def test_two_processes_on_one_postgresql_hold_one_quota(standin, make_bot, tmp_path, pg_url):
    standin.several_connections = True
    bots, connections = [], []
    for number in range(2):  # one Stream connection each: a message is sent to the process a test picks
        bots.append(make_bot(TASK_DB=pg_url, HOST_NAME=f"host{number}", STREAM_CONNECTIONS="1",
                             USER_DAILY_TOKENS="2000", CODEBUDDY_WORKDIR=str(tmp_path / f"workspace{number}"),
                             LOG_FILE=str(tmp_path / "logs" / f"bot{number}.log")))
        connections.append(standin.wait_for(lambda: [c for c in standin.live_connections() if c not in connections],
                                            timeout=20)[0])
    # The same user in their 1:1 chat through one process, in a group through the other: 1,000 tokens each.
    assert "回答: 私聊" in _answer(standin, "私聊 [usage=1000:0]", connection_id=connections[0])
    assert "回答: 群聊" in _answer(standin, "群聊 [usage=1000:0]", conversation_type="2", connection_id=connections[1])
    with psycopg.connect(pg_url) as conn:  # both rows written to the shared DB (each process's writer thread)
        standin.wait_for(lambda: conn.execute("SELECT count(*) FROM usage WHERE user_id = 'u1'").fetchone()[0] == 2,
                         timeout=15)
    for connection in connections:  # each process now refuses, counting the other's run
        refused = _ask(standin, "再来 [usage=1000:0]", connection_id=connection)
        assert refused.startswith("你今天的 token 用量已达上限: 2,000/2,000"), refused
    assert not [run for run in cli_runs(tmp_path) if "再来" in run["prompt"]]
