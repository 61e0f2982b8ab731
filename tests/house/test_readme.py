"""The README stays true: its two set-up commands (the first one run on a fresh clone, the second one by CI, byte for
byte), every `bot.py` command and flag it and docs/ show, its DingTalk app section, its length, and its links."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from config import EXAMPLE_VALUES
from tests.conftest import CLI_START_TIMEOUT, CLIENT_ID, CLIENT_SECRET, real_cli_path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 300


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", _section("Set up"), re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert "bot.py" in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci_lines


# ---------------------------------------------------------------- every command shown


@functools.cache
def _help(*args: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / "bot.py"), *args, "--help"], capture_output=True, text=True,
                          timeout=30, check=True).stdout


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_bot_command_shown_runs_with_the_venv_python(page):
    for line in page.read_text(encoding="utf-8").splitlines():
        for interpreter in re.findall(r"(\S+) bot\.py\b", line):
            if "activate" in line or "outside the venv" in line:
                continue  # "`. .venv/bin/activate` once, then `python bot.py …`"; "(`python3 bot.py`) stops"
            assert interpreter.strip("`(") in (".venv/bin/python", "…"), f"{page.name}: {line}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_bot_command_and_flag_shown_exists(page):
    commands = set(re.findall(r"^[ ]{4}([\w-]+)(?:[ ]{2,}\S|$)", _help().split("commands:", 1)[1], re.M))
    assert {"run", "check", "tasks", "console"} <= commands
    text = page.read_text(encoding="utf-8")
    used = re.findall(r"bot\.py ((?:run|check|tasks|console|[a-z][a-z-]*))((?: \[?--[\w-]+(?: \w+)?\]?)*)", text)
    if page.name == "README.md":
        assert used
    for command, flags in used:
        assert command in commands, f"{page.name} uses `bot.py {command}`: no such command"
        known = _help(command)
        for flag in re.findall(r"--[\w-]+", flags):
            assert flag in known, f"{page.name} uses `bot.py {command} {flag}`: no such flag"


# ---------------------------------------------------------------- short, and every page it points to there


def test_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= MAX_README_LINES, "move a section to docs/ and link it from the README"


def _anchor(heading: str) -> str:
    """GitHub's id of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # a `# comment` is no heading
    return {_anchor(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_names_a_file_that_exists(page):
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is no link
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]
    if page.name == "README.md":
        assert "docs/architecture.md" in links
    for target in links:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.is_file(), f"{page.name} links to {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name} links to {target}: no such heading there"


def test_the_dingtalk_app_section_goes_from_an_empty_console_to_a_bot_that_answers():
    section = _section("DingTalk app")
    steps = re.findall(r"^\d+\. \*\*(.+?)\*\*", section, re.M)
    assert len(steps) >= 8, steps
    for words in ("Stream 模式", "qyapi_robot_sendmsg", "batchSend", "groupMessages/send", "Card.Instance.Write",
                  "Card.Streaming.Write", "确认发布", "添加机器人", "ALLOWED_USERS", "ADMIN_USERS",
                  ".venv/bin/python bot.py console", ".venv/bin/python bot.py check", "not verified"):
        assert words in section, words
    for setting in EXAMPLE_VALUES:  # every value the first start asks for is explained
        assert setting in section or setting in _section("Set up"), setting
    assert "](#dingtalk-app)" in _section("Set up")


# ---------------------------------------------------------------- the first command, on a fresh clone


def _fresh_clone(target: Path) -> None:
    """The repository's files as `git clone` gives them: tracked files only (the working tree's version)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
    for name in filter(None, listed.decode().split("\0")):
        source, copy = ROOT / name, target / name
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(source.read_bytes())
            copy.chmod(source.stat().st_mode)


def _offline_venv(clone: Path, bin_dir: Path) -> dict[str, str]:
    """What stands in for the internet when the README's first command runs (tests never download):
    - `python3` is the Python these tests run on (its packages are built for it);
    - the clone's `.venv` is made beforehand with a .pth line showing it the test environment's site-packages,
      so `pip install -r requirements.txt` really runs and finds every requirement already satisfied;
    - PIP_NO_INDEX makes sure pip could not download anything even if it tried.
    The README's `python3 -m venv .venv` then runs on that venv, which keeps the .pth."""
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([str(bin_dir / "python3"), "-m", "venv", str(clone / ".venv")], check=True, timeout=120)
    purelib = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    Path(purelib, "tests-reuse-installed-requirements.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"PATH": f"{bin_dir}:{os.environ.get('PATH', os.defpath)}", "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.mark.e2e
@pytest.mark.real_cli
def test_the_first_command_on_a_fresh_clone_asks_for_the_examples_then_connects_and_answers(
        tmp_path, standin, model_server):
    cli = real_cli_path()  # the wheel's CLI answers, found without CODEBUDDY_BIN (against the fake model server)
    clone = tmp_path / "dingtalk-codebuddy-bot"
    _fresh_clone(clone)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DINGTALK_", "CODEBUDDY_", "LOG_FILE", "TASK_DB", "PYTHON", "VIRTUAL_ENV"))}
    env.update(_offline_venv(clone, tmp_path / "bin"))
    env.update({"HOME": str(tmp_path / "home"), "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1",
                # The network to DingTalk is the local stand-in (the SDK and the bot read this variable).
                "DINGTALK_OPENAPI_ENDPOINT": standin.base_url,
                # Keep the real CLI off the network: no updater, telemetry or plugin marketplace.
                "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1"})
    first_command = _readme_commands()[0]

    first = subprocess.run(["bash", "-c", first_command], cwd=clone, env=env, capture_output=True, text=True,
                           timeout=300, stdin=subprocess.DEVNULL)
    assert first.returncode == 2, first.stdout + first.stderr
    assert "Requirement already satisfied: dingtalk-stream" in first.stdout  # pip really ran
    assert (clone / ".env").read_text() == (clone / ".env.example").read_text()
    listed = re.findall(r"^  - (\w+) still holds the example value", first.stderr, re.M)
    assert listed == list(EXAMPLE_VALUES), first.stderr
    assert "Traceback" not in first.stderr and not standin.requests  # nothing was tried with the examples

    settings = (clone / ".env").read_text()
    filled = {"DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET}
    for name, (example, _) in EXAMPLE_VALUES.items():
        settings = settings.replace(f"{name}={example}", f"{name}={filled.get(name, 'fake-key-for-tests')}")
    settings += f"CODEBUDDY_BASE_URL={model_server.base_url}\nCODEBUDDY_SKIP_BUILTIN_MARKETPLACE=1\n"
    (clone / ".env").write_text(settings)

    console = subprocess.run([str(clone / ".venv" / "bin" / "python"), "bot.py", "console"], cwd=clone, env=env,
                             input="你好，控制台\n", capture_output=True, text=True, timeout=CLI_START_TIMEOUT * 2)
    assert console.returncode == 0, console.stdout + console.stderr
    assert "回答: 你好，控制台 (turn 1)" in console.stdout

    bot = subprocess.Popen(["bash", "-c", first_command], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        standin.wait_connected(timeout=120)
        sent = standin.send_bot_message("你好，钉钉", sender_staff_id="first-hour")
        posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= 2
                                 and standin.webhook_posts(sent.session), timeout=CLI_START_TIMEOUT)
        assert posts[0].text.startswith("收到任务，正在处理中")
        assert "回答: 你好，钉钉 (turn 1)" in posts[1].text
    finally:
        os.killpg(bot.pid, signal.SIGTERM)
        output, _ = bot.communicate(timeout=60)
    assert bot.returncode == 0, output
    assert "日志: stderr" in output and f"CodeBuddy CLI: {cli}" in output and "钉钉 Stream 已连接" in output
