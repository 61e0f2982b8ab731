"""Git that changes a checkout's files runs in the conversation's own jail, with the agent's rights and never the
bot's: /pull's fast-forward, from a bundle the bot wrote into the workspace."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import uuid
from typing import Any

log = logging.getLogger("projects")

JAIL_GIT_TIMEOUT = 120.0
# Hooks and the file-system monitor off even in the jail: /pull runs nothing the agent planted, there either.
FAST_FORWARD = ('git -c core.hooksPath=/dev/null -c core.fsmonitor=false fetch -q --no-tags "$1" refs/pull/new && '
                'git -c core.hooksPath=/dev/null -c core.fsmonitor=false merge -q --ff-only "$2"')


def run_in_jail(client: Any, conversation_key: str, subdir: str, argv: list[str],
                timeout: float = JAIL_GIT_TIMEOUT) -> tuple[int, str]:
    """Run `argv` in the conversation's jail (its sandbox, limits and network, like a CLI process), starting in
    the workspace's `subdir`; (exit code, the end of its output). `client` is the CodeBuddyClient."""
    sandbox = client.sandbox
    dirs = client.workspaces.dirs_for(conversation_key)
    tag = f"{client.tag_prefix}git-{uuid.uuid4().hex[:10]}"
    command, cwd = sandbox.command(argv, dirs, run_id=tag, subdir=subdir)
    try:
        proc = subprocess.Popen(command, cwd=cwd, env={**client.run_env(sandbox.home(dirs), tag),
                                                       **sandbox.environment()},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=sandbox.preexec(tag, dirs))
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return -1, f"超过 {timeout:.0f} 秒未完成"
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("项目 git 无法在沙箱中启动: %s", exc)
        return -1, f"无法在沙箱中启动 git: {exc}"
    finally:
        sandbox.release(tag)
    return proc.returncode, " ".join(output.decode("utf-8", "replace").split())[-300:]
