"""End to end with the REAL CodeBuddy CLI in its jail: the usage the loopback model reports (1,000 input and 200 output
tokens per request) is what /usage shows per run — the CLI reports its session's totals, the bot counts each turn's
share — across a restart (a new CLI process resuming the session goes on from the session's totals), and
USER_DAILY_TOKENS refuses the prompt after the run that crossed it, before any model request; `bot.py usage --csv`
sums to the same numbers and the run's CPU time is measured.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys

import pytest

from tests.conftest import CLI_START_TIMEOUT, ROOT

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]


def _ask(standin, text: str, count: int) -> str:
    sent = standin.send_bot_message(text, sender_staff_id="usage-user", sender_nick="用量")
    posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                             and standin.webhook_posts(sent.session), timeout=CLI_START_TIMEOUT,
                             message=f"{count} posts for {text!r}")
    return posts[count - 1].text or ""


def _queries(model_server, marker: str) -> int:
    return sum(1 for r in model_server.chat_requests() if any(marker in q for q in r.user_queries))


def test_usage_of_real_cli_turns_quota_and_restart(standin, real_bot, model_server, tmp_path):
    model_server.usage = {"prompt_tokens": 1000, "completion_tokens": 200}
    settings = {"USER_DAILY_TOKENS": "5000", "WARM_SESSIONS": "2"}
    bot = real_bot(**settings)
    for number in range(3):
        assert f"问题{number}" in _ask(standin, f"问题{number}", 2)
    usage = _ask(standin, "/usage", 1)
    today = re.search(r"今天 \(\d\d-\d\d\): 3 次运行，输入 3,000 / 输出 600 tokens，费用 \$0\.00，CPU ([\d.]+) 秒",
                      usage)
    assert today, usage
    assert float(today.group(1)) > 0  # the jailed CLI's CPU time (its run cgroup, else its process tree)
    assert "今日 token 剩 1,400/5,000" in usage

    assert bot.terminate() == 0  # after a restart: the same numbers, and a new process goes on from the session total
    real_bot(**settings)
    assert _ask(standin, "/usage", 1).split("\n")[1] == usage.split("\n")[1]
    for number in (3, 4):  # 3,600 then 4,800 before these: both may start; the fifth run crosses 5,000
        assert f"问题{number}" in _ask(standin, f"问题{number}", 2)
    refused = _ask(standin, "问题5", 1)
    assert refused.startswith("你今天的 token 用量已达上限: 6,000/5,000 (输入 5,000，输出 1,000)"), refused
    assert _queries(model_server, "问题5") == 0  # refused before any run
    assert _queries(model_server, "问题4") == 1

    report = subprocess.run([sys.executable, str(ROOT / "bot.py"), "usage", "--csv", "--db",
                             str(tmp_path / "data" / "tasks.db")], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=bot.env)
    assert report.returncode == 0, report.stderr
    rows = list(csv.reader(io.StringIO(report.stdout)))
    assert rows[-1][:5] == ["TOTAL", "", "5", "5000", "1000"], rows
    assert float(rows[-1][8]) > 0  # CPU seconds
