"""deploy/: the systemd unit passes `systemd-analyze verify`, and logrotate's rename + create is followed by the log."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys

import pytest

from config import SETTINGS
from tests.conftest import ROOT

UNIT = ROOT / "deploy" / "dingtalk-bot.service"
LOGROTATE = ROOT / "deploy" / "logrotate.conf"
INSTALL_DIR = "/opt/dingtalk-bot"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def _default(env: str) -> str:
    return next(s.default for s in SETTINGS if s.env == env)


def _unit_log_file() -> str:
    """The LOG_FILE the unit sets (the bot's own default is stderr, for trial runs)."""
    found = re.search(r"^Environment=LOG_FILE=(\S+)$", UNIT.read_text(encoding="utf-8"), re.M)
    assert found, "the unit sets no LOG_FILE: under systemd the bot would log to the journal only"
    return found.group(1)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (no wheel has it: .ci/run installs systemd; under CI=true "
                           "this skip fails)")
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart's binary exists: lay out the install directory under tmp_path.
    install = tmp_path / INSTALL_DIR.lstrip("/")
    (install / ".venv" / "bin").mkdir(parents=True)
    (install / ".venv" / "bin" / "python").symlink_to(sys.executable)
    shutil.copy(ROOT / "bot.py", install / "bot.py")
    (install / ".env").write_text("DINGTALK_CLIENT_ID=x\n")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace(INSTALL_DIR, str(install)), encoding="utf-8")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # verify exits 0 even for unknown keys or bad values: it only warns, so any output is a failure.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


def test_unit_runs_the_daemon_as_a_notify_service_with_hardening():
    service = _unit()["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["ExecStart"] == f"{INSTALL_DIR}/.venv/bin/python {INSTALL_DIR}/bot.py run"
    assert service["EnvironmentFile"] == f"{INSTALL_DIR}/.env" and service["WorkingDirectory"] == INSTALL_DIR
    assert service["User"] == "dingtalk-bot"
    assert int(service["WatchdogSec"]) >= 30
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "full"
    assert "MemoryDenyWriteExecute" not in service  # it would break node's JIT in the CLI
    assert service["KillMode"] == "mixed"  # SIGTERM to the bot alone: it stops each CLI process group itself
    assert service["RestartPreventExitStatus"] == "2"  # bot.py's exit code for a configuration error
    # The stop timeout covers SHUTDOWN_GRACE plus the manager's few seconds of cleanup.
    assert int(service["TimeoutStopSec"]) >= float(_default("SHUTDOWN_GRACE")) + 10
    writable = service["ReadWritePaths"].split()
    assert {f"-{INSTALL_DIR}/workspace", f"-{INSTALL_DIR}/data"} <= set(writable)
    assert f"-{os.path.dirname(_unit_log_file())}" in writable  # the directory: a file bind mount would pin it
    assert _default("CODEBUDDY_WORKDIR") == "./workspace" and _default("TASK_DB").startswith("./data/")


def test_logrotate_rotates_the_default_log_file_by_rename_and_create():
    text = LOGROTATE.read_text(encoding="utf-8")
    block = re.search(r"^(\S+)\s*\{(.*?)^\}", text, re.S | re.M)
    assert block is not None and block.group(1) == _unit_log_file() and _default("LOG_FILE") == ""
    directives = [line.split()[0] for line in block.group(2).splitlines() if line.strip()
                  and not line.strip().startswith("#")]
    assert "create" in directives and "copytruncate" not in directives and "delaycompress" in directives
    assert re.search(r"^\s*create 0600 dingtalk-bot dingtalk-bot$", block.group(2), re.M)


def test_log_file_is_reopened_after_logrotate_renames_it(tmp_path):
    log_file = tmp_path / "bot.log"
    script = f"""
import logging, os, sys
sys.path.insert(0, {str(ROOT)!r})
import bot
bot.setup_logging({str(log_file)!r}, "INFO")
log = logging.getLogger("bot")
log.info("before rotation")
os.rename({str(log_file)!r}, {str(log_file) + ".1"!r})
open({str(log_file)!r}, "w").close()  # logrotate's "create"
log.info("after rotation")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30, cwd=tmp_path)
    assert "before rotation" in (tmp_path / "bot.log.1").read_text(encoding="utf-8")
    rotated = log_file.read_text(encoding="utf-8")
    assert "after rotation" in rotated and "before rotation" not in rotated
