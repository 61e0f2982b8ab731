"""The sandbox's parts one by one: directory names, the environment allowlist, reserved CLI flags, the probe."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from codebuddy.sandbox import Bubblewrap, ConversationDirs, Workspaces, conversation_dir_name, run_environment
from config import ConfigError, load_config
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT

BASE = {"DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET}


def test_conversation_directories_are_safe_distinct_and_private(tmp_path):
    hostile = ["../../etc", "cid+/==abc", "cid+/==abd", "", "/", "a\0b"]
    names = [conversation_dir_name(key) for key in hostile]
    assert len(set(names)) == len(names)
    assert all(name.startswith("c-") and name[2:].isalnum() and len(name) == 34 for name in names)
    dirs = Workspaces(str(tmp_path / "ws")).dirs_for("../../etc")
    assert dirs.workspace.startswith(str(tmp_path / "ws" / "conversations"))
    for path in (dirs.workspace, dirs.home):
        assert oct((tmp_path / path).stat().st_mode & 0o777) == "0o700"


def test_a_run_gets_only_allowlisted_variables():
    source = {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "https_proxy": "http://p:3128",
              "CODEBUDDY_API_KEY": "k", "CODEBUDDY_BASE_URL": "http://m", "CODEBUDDY_WORKDIR": "/w",
              "DINGTALK_CLIENT_SECRET": "s", "NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "1",
              "INVOCATION_ID": "x", "TASK_DB": "/d", "AWS_SECRET_ACCESS_KEY": "a", "HOME": "/root"}
    env = run_environment(source, "/home/codebuddy", {"CODEBUDDY_WORKDIR", "TASK_DB", "DINGTALK_CLIENT_SECRET"})
    assert env == {"PATH": "/usr/bin", "LANG": "C.UTF-8", "LC_ALL": "C", "https_proxy": "http://p:3128",
                   "CODEBUDDY_API_KEY": "k", "CODEBUDDY_BASE_URL": "http://m", "HOME": "/home/codebuddy",
                   "DISABLE_AUTOUPDATER": "1", "CODEBUDDY_CODE_DISABLE_BACKGROUND_TASKS": "1",
                   "CODEBUDDY_DISABLE_AUTO_MEMORY": "1"}


@pytest.mark.parametrize("args, flag", [
    ("--permission-mode bypassPermissions", "--permission-mode"), ("--permission-mode=plan", "--permission-mode"),
    ("-y", "-y"), ("--dangerously-skip-permissions", "--dangerously-skip-permissions"), ("--add-dir /", "--add-dir"),
    ("--resume x", "--resume"), ("-r x", "-r"), ("--continue", "--continue"), ("-c", "-c"),
    ("--session-id x", "--session-id"), ("--sandbox container", "--sandbox"), ("--sandbox-image=x", "--sandbox"),
    ("-p", "-p"), ("--output-format json", "--output-format"), ("--input-format text", "--input-format"),
    ("--allowedTools Read -yp", "-y"),
])
def test_extra_args_cannot_undo_the_isolation(args, flag):
    with pytest.raises(ConfigError, match=f"CODEBUDDY_EXTRA_ARGS must not contain {flag} "):
        load_config({**BASE, "CODEBUDDY_EXTRA_ARGS": args}, dotenv_path=None)
    assert load_config({**BASE, "CODEBUDDY_EXTRA_ARGS": "--allowedTools Read --max-turns 5"},
                       dotenv_path=None).codebuddy_extra_args == ("--allowedTools", "Read", "--max-turns", "5")


def test_sandbox_paths_must_be_absolute_and_never_show_the_bots_files(tmp_path):
    with pytest.raises(ConfigError, match="absolute"):
        load_config({**BASE, "CODEBUDDY_SANDBOX_PATHS": "opt/x"}, dotenv_path=None)
    for above in ("/", str(ROOT), str(ROOT.parent)):
        with pytest.raises(ConfigError, match="must not contain"):
            load_config({**BASE, "CODEBUDDY_SANDBOX_PATHS": above}, dotenv_path=None)
    with pytest.raises(ConfigError, match="must not contain"):
        load_config({**BASE, "CODEBUDDY_SANDBOX_PATHS": str(tmp_path), "TASK_DB": str(tmp_path / "t.db")},
                    dotenv_path=None)
    config = load_config({**BASE, "CODEBUDDY_SANDBOX_PATHS": "/opt/tool, /usr/local/x"}, dotenv_path=None)
    assert config.codebuddy_sandbox_paths == ("/opt/tool", "/usr/local/x")
    with pytest.raises(ConfigError, match="CODEBUDDY_SANDBOX must be one of bwrap, none"):
        load_config({**BASE, "CODEBUDDY_SANDBOX": "docker"}, dotenv_path=None)


def test_the_probe_says_how_to_fix_a_missing_bubblewrap():
    problem = Bubblewrap("true", bwrap="/nonexistent/bwrap").probe()
    assert "not found" in problem and "apt install bubblewrap" in problem and "CODEBUDDY_SANDBOX=none" in problem
    assert Bubblewrap("true").probe() == ""


def test_the_bot_exits_2_when_the_sandbox_cannot_start(tmp_path):
    # A bwrap that refuses to run, first on PATH, stands in for a host without user namespaces.
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", **BASE, "LOG_FILE": str(tmp_path / "bot.log"),
           "TASK_DB": str(tmp_path / "t.db"), "CODEBUDDY_WORKDIR": str(tmp_path / "ws"), "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "bot.py"), "console"], cwd=tmp_path, env=env, input="",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "沙箱不可用" in result.stderr and "No permissions to create new namespace" in result.stderr
    assert "apt install bubblewrap" in result.stderr and "沙箱不可用" in (tmp_path / "bot.log").read_text()


def test_a_cli_installed_beside_the_bots_files_is_refused_not_bound_into_every_jail(tmp_path):
    checkout = tmp_path / "bot"
    checkout.mkdir()
    (checkout / ".env").write_text("DINGTALK_CLIENT_SECRET=s3cret\n")
    cli = checkout / "codebuddy"
    cli.write_text("#!/bin/sh\n")
    cli.chmod(0o755)
    sandbox = Bubblewrap(str(cli), hidden=[str(checkout / ".env")])
    assert "holds the bot's own files" in sandbox.probe() and str(checkout / ".env") in sandbox.probe()
    argv, _ = sandbox.command(["true"], ConversationDirs(str(tmp_path), str(tmp_path)))
    assert str(checkout) not in argv  # never bound, whatever the probe said
    wheel_like = checkout / ".venv" / "bin"  # the wheel's CLI inside the checkout's venv: its own directory only
    wheel_like.mkdir(parents=True)
    (wheel_like / "codebuddy").write_text("#!/bin/sh\n")
    assert not Bubblewrap(str(wheel_like / "codebuddy"), hidden=[str(checkout)]).exposed_bot_files(str(wheel_like))


def test_a_run_cannot_make_a_user_namespace_of_its_own(tmp_path):
    """Inside its own user namespace a run would hold every capability again (over namespaces of its own): tried with
    util-linux's unshare, which succeeds on this host outside the jail."""
    assert subprocess.run(["unshare", "-U", "-r", "true"], capture_output=True, timeout=30).returncode == 0
    dirs = ConversationDirs(str(tmp_path / "w"), str(tmp_path / "h"))
    os.makedirs(dirs.workspace)
    os.makedirs(dirs.home)
    argv, cwd = Bubblewrap(str(tmp_path / "no-cli")).command(["sh", "-c", "unshare -U id -u; echo rc=$?"], dirs)
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env={"PATH": os.defpath})
    assert "rc=1" in result.stdout and "unshare failed: No space left on device" in result.stderr, result
