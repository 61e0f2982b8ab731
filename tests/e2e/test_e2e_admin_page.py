"""End to end: the admin page of a running bot, opened in a real headless Chromium (Debian's `chromium`).

A user whose DingTalk name is a script sends a slow prompt; while it runs, Chromium loads the page with the token and
dumps its DOM (the task is there, the name shown as text, no script ran) and takes a screenshot, kept as a CI artifact
(`$CI_ARTIFACTS_DIR`, else `.ci/artifacts/`). Without the token Chromium sees the 401. The browser talks to 127.0.0.1
only: no proxy, no background networking, a fresh profile each time.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

TOKEN = "e2e-Admin-Token_0123456789abcdef"
HOSTILE = "<script>document.title='pwned'</script>"
BROWSER_TIMEOUT = 60  # seconds one Chromium run may take on a loaded machine


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it): the admin "
                    "page is checked in a real browser")
    return found


def browse(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium with `args` in a fresh profile; its stdout. Killed (its whole group) after 60 s."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    profile.mkdir()
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-proxy-server", "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
    browser = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env={**env, "HOME": str(profile)}, start_new_session=True)
    try:
        out, err = browser.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(browser.pid, signal.SIGKILL)  # its own session: the renderer and GPU processes go with it
        browser.communicate()
        raise AssertionError(f"chromium did not finish within {BROWSER_TIMEOUT} s: {command}") from None
    assert browser.returncode == 0, f"chromium exited {browser.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode("utf-8", errors="replace")


def artifact_path() -> Path:
    folder = Path(os.environ.get("CI_ARTIFACTS_DIR") or ROOT / ".ci" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "admin-page.png"


def test_the_admin_page_in_a_real_browser_shows_a_running_task_and_a_hostile_name_as_text(
        standin, make_bot, tmp_path):
    chromium()
    bot = make_bot(STATUS_PORT="0", STATUS_TOKEN=TOKEN, HOST_NAME="admin-e2e", LOG_LEVEL="DEBUG")
    base = f"http://127.0.0.1:{bot.status_port()}/"
    # A finished run first: its usage (as the fake CLI reports it) is in the page's table and chart.
    done = standin.send_bot_message("先算一下 [usage=1234:56]", sender_staff_id="evil1", sender_nick=HOSTILE)
    standin.wait_for(lambda: any("回答: 先算一下" in (p.text or "") for p in standin.webhook_posts(done.session)),
                     timeout=30)
    standin.send_bot_message("[sleep=45] 慢慢地回答这个问题", sender_staff_id="evil1", sender_nick=HOSTILE)
    created = bot.wait_log(r"创建任务: \w+, 用户: evil1", count=2)[1]  # the second: the slow one
    task_id = re.search(r"创建任务: (\w+), 用户: evil1", created).group(1)
    bot.wait_log(rf"任务 {task_id} 状态更新: processing")

    dom = browse(tmp_path, "--dump-dom", f"{base}?token={TOKEN}")
    title = re.search(r"<title>(.*?)</title>", dom, re.S).group(1)
    assert title == "DingTalk CodeBuddy bot: admin-e2e", title  # no script ran
    assert task_id in dom and "evil1" in dom and "慢慢地回答这个问题" in dom and "running" in dom
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in dom  # the name, as text
    assert "<script" not in dom and TOKEN not in dom
    usage = dom.split('id="usage"', 1)[1]  # the usage section: the user's run, its tokens, one bar for today
    assert "evil1" in usage and "1,234" in usage and "&lt;script&gt;" in usage
    assert usage.count('<rect class="bar"') == 1 and "1,290 tokens (in 1,234, out 56)" in usage

    shot = artifact_path()
    shot.unlink(missing_ok=True)
    browse(tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", f"{base}?token={TOKEN}")
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, len(png)

    refused = browse(tmp_path, "--dump-dom", base)
    assert "unauthorized" in refused and task_id not in refused and "evil1" not in refused

    log = bot.log_text()
    assert "status server" in log and "token=***" in log  # request lines logged at DEBUG, the token masked
    assert TOKEN not in log
