"""The console speaks the project commands too: `bot.py console` binds, runs in the checkout and diffs, like a chat."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT, fake_cli_env
from tests.git_remotes import make_remote


def test_the_console_binds_a_project_runs_in_its_checkout_and_answers_diff(tmp_path):
    remote = make_remote(tmp_path, "demo")
    (tmp_path / "projects.toml").write_text(f'[demo]\nurl = "{remote}"\nusers = ["*"]\n', encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
    env.update({"HOME": str(tmp_path), **fake_cli_env(tmp_path), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
                "CODEBUDDY_PERMISSION_MODE": "bypassPermissions", "TASK_DB": str(tmp_path / "tasks.db"),
                "LOG_FILE": str(tmp_path / "bot.log")})
    proc = subprocess.Popen([sys.executable, str(ROOT / "bot.py"), "console"], cwd=tmp_path, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    printed: list[str] = []
    threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True).start()

    def say_and_wait(line: str, expected: str, timeout: float = 60.0) -> None:
        proc.stdin.write(line + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while expected not in "".join(printed):
            assert time.monotonic() < deadline, f"console never printed {expected!r}:\n{''.join(printed)}"
            time.sleep(0.05)

    try:
        say_and_wait("/help", "/project (项目)")
        say_and_wait("/project demo", "已绑定项目 demo: 分支 main")
        say_and_wait("改 [tool=Bash:pwd && echo more >> README.md]", "→ /workspace/demo")
        say_and_wait("/diff", "项目 demo 的改动")
        assert "README.md | 1 +" in "".join(printed)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
