"""A run's budget: each jailed CLI process in cgroups of its own (processes, memory), rlimits, a sized /tmp, a
lower priority, its workspace checked before every turn, and nothing of a turn's left running after it.

Built on codebuddy/run_limits.py and run_cgroup.py (docs/run-limits.md); `Bubblewrap` calls it per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from codebuddy.run_cgroup import CgroupError, RunCgroup
from codebuddy.run_limits import (
    NONE,
    LimitSupport,
    RunLimits,
    bwrap_tmpfs_args,
    detect,
    memory_exceeded_text,
    procs_exceeded_text,
    run_preexec,
    workspace_full_text,
    workspace_left,
)

log = logging.getLogger("sandbox")

class JailLimits:
    """The limits of every jailed CLI process: one RunCgroup each (where the bot may make cgroups), else rlimits."""

    def __init__(self, limits: RunLimits, support: LimitSupport | None = None) -> None:
        self.limits = limits
        self.support = detect() if support is None else support
        self._lock = threading.Lock()
        self._runs: dict[str, RunCgroup] = {}
        self._reasons: dict[str, str] = {}  # why a run's process was ended by a limit, until asked

    def tmp_args(self) -> list[str]:
        """The bwrap arguments of the jail's /tmp: a tmpfs of at most RUN_TMP_MB."""
        return bwrap_tmpfs_args(self.limits)

    def refusal(self, paths: Iterable[str]) -> str:
        """The chat's one line when the conversation's workspace (and CLI home) is full, else ""."""
        return workspace_full_text(self.limits) if workspace_left(paths, self.limits.workspace_max_mb) == 0 else ""

    def preexec(self, run_id: str, paths: Iterable[str]) -> Callable[[], None]:
        """The `preexec_fn` of the run's bwrap: it joins the run's new cgroups before exec, and gets the rlimits
        (no file past what is left of WORKSPACE_MAX_MB), nice and oom_score_adj."""
        left = workspace_left(paths, self.limits.workspace_max_mb)
        if self.support.backend != NONE:
            try:
                cgroup = RunCgroup.create(run_id, self.limits, self.support)
            except (CgroupError, OSError) as exc:
                log.error("无法为 CodeBuddy 运行创建 cgroup (%s): 本次运行只受 rlimit 限制", exc)
            else:
                with self._lock:
                    self._runs[run_id] = cgroup
                return cgroup.preexec(fsize_bytes=left)
        return run_preexec(self.limits, fsize_bytes=left)

    def end_turn(self, run_id: str, cli_pid: int) -> bool:
        """After a turn: end every process of the run but the CLI (with its jail). False
        when the process should not be kept warm: a limit was hit, or something could not be ended."""
        with self._lock:
            cgroup = self._runs.get(run_id)
        if cgroup is None:
            return True
        reason = self._limit_reason(cgroup)
        keep = [cli_pid]
        ended = cgroup.kill_all(except_pids=keep, timeout=2.0)
        if ended:
            log.info("本轮结束后清理了 %d 个遗留进程 run=%s", ended, run_id)
        members = cgroup.procs()
        left_over = members - cgroup.kept(keep, members)
        if reason:
            with self._lock:
                self._reasons[run_id] = reason
        return not reason and not left_over

    def limit_reason(self, run_id: str) -> str:
        """Why the run's process met a limit ("" if it did not); read once."""
        with self._lock:
            cgroup = self._runs.get(run_id)
            reason = self._reasons.pop(run_id, "")
        return reason or (self._limit_reason(cgroup) if cgroup is not None else "")

    def cpu_seconds(self, run_id: str) -> float | None:
        """CPU time the run's process and everything it started used so far (its cgroup's), None without one."""
        with self._lock:
            cgroup = self._runs.get(run_id)
        return cgroup.cpu_seconds() if cgroup is not None else None

    def _limit_reason(self, cgroup: RunCgroup) -> str:
        if cgroup.memory_exceeded():
            return memory_exceeded_text(self.limits)
        if cgroup.pids_exceeded():
            return procs_exceeded_text(self.limits)
        return ""

    def close_run(self, run_id: str) -> None:
        """The run's process has ended: remove its cgroups (ending whatever is still in them)."""
        with self._lock:
            cgroup = self._runs.pop(run_id, None)
        if cgroup is not None:
            reason = self._limit_reason(cgroup)
            if reason:
                with self._lock:
                    self._reasons[run_id] = reason
            if not cgroup.remove(timeout=5.0):
                log.error("CodeBuddy 运行的 cgroup 未能删除: %s", run_id)

    def check_lines(self) -> list[str]:
        """One ✓/✗ line per limit, for `bot.py check`."""
        return self.support.check_lines(self.limits)

