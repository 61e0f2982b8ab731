"""`python bot.py tasks`: what a chat wrote never reaches the operator's terminal as control codes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dingtalk.route import Route
from ops import task_table
from tasks.task import Task
from tests.conftest import ROOT

HOSTILE_PROMPT = "看这里\x1b[2J\x1b]0;pwned\x07\rFAKE ROW\x9b31m\u2028end"


def _task(task_id: str, user_id: str, prompt: str) -> Task:
    return Task(task_id, user_id, "", user_id, Route("1", user_id, ""), prompt, created_at=time.time(),
                status="failed", error="stderr\x1b[31m")


def test_tasks_prints_prompts_and_user_ids_with_control_characters_escaped(tmp_path, target):
    db = target.url  # a SQLite file, then a PostgreSQL database: `tasks` reads either
    store = target.backend()
    store.save(_task("cc000001", "evil\x1b[1m", HOSTILE_PROMPT))
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
    result = subprocess.run([sys.executable, str(ROOT / "bot.py"), "tasks", "--db", str(db)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert not any(char in result.stdout for char in "\x1b\x07\r\x9b\u2028")
    header, row, footer = result.stdout.splitlines()
    assert row.split()[:3] == ["cc000001", "failed", "evil\\x1b[1m"]
    assert row.endswith("…") and "看这里\\x1b[2J\\x1b]0;pwned\\x07" in row
    assert footer.startswith("1 task(s)")


def test_every_cell_of_the_table_is_escaped():
    table = task_table.format_task_table([_task("id\x1b", "u\n1", "a\tb\x00c")], time.time())
    assert table.count("\n") == 1 and "\x1b" not in table and "\x00" not in table
    assert "id\\x1b" in table and "u\\n1" in table and table.endswith("a b\\x00c")
