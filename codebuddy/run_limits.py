"""What one run (the whole jail) may use and how this host can hold it to that: the limits, which cgroups the bot
may write, the run's rlimits and priority, the workspace budget and the replies when a limit is hit
(docs/run-limits.md)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

MB = 1024 * 1024
V2, V1, NONE = "cgroup v2", "cgroup v1", "none"
V1_CONTROLLERS = ("memory", "pids", "cpuacct")
V2_CONTROLLERS = ("memory", "pids")
RUN_OOM_SCORE_ADJ = 500

MEMORY_EXCEEDED = "内存超出限制 ({memory_mb} MB)：本次运行已被终止。"
PROCS_EXCEEDED = "进程数达到上限 ({max_procs} 个)：多出的进程未能启动。"
WORKSPACE_FULL = "工作区已满 ({workspace_max_mb} MB)：请删除文件或发送 /new 开始新的会话。"


@dataclass(frozen=True)
class RunLimits:
    """What one run (bwrap, the CLI and everything below) may use."""

    max_procs: int = 256
    memory_mb: int = 2048
    tmp_mb: int = 512
    workspace_max_mb: int = 1024
    nice: int = 10


def memory_exceeded_text(limits: RunLimits) -> str:
    """The reply when the kernel OOM-killed inside the run."""
    return MEMORY_EXCEEDED.format(memory_mb=limits.memory_mb)


def procs_exceeded_text(limits: RunLimits) -> str:
    """The reply when the run hit its process cap (forks failed; the run itself may have gone on)."""
    return PROCS_EXCEEDED.format(max_procs=limits.max_procs)


def workspace_full_text(limits: RunLimits) -> str:
    """The reply that refuses a turn because the conversation's directories hold their whole budget."""
    return WORKSPACE_FULL.format(workspace_max_mb=limits.workspace_max_mb)


def bwrap_tmpfs_args(limits: RunLimits, dest: str = "/tmp") -> list[str]:
    """`--size N --tmpfs dest`: the jail's /tmp capped (its pages also count as the run's memory)."""
    return ["--size", str(limits.tmp_mb * MB), "--tmpfs", dest]


@dataclass(frozen=True)
class Enforcement:
    """One limit, for `bot.py check`: whether it holds and how (or why not)."""

    limit: str
    enforced: bool
    how: str

    def line(self) -> str:
        """`✓ limit: how` or `✗ limit: why not`."""
        return f"{'✓' if self.enforced else '✗'} {self.limit}: {self.how}"


@dataclass(frozen=True)
class LimitSupport:
    """How runs can be bounded on this host: which cgroup tree the bot may write, and which controllers."""

    backend: str  # V2, V1 or NONE
    controllers: tuple[str, ...] = ()  # what a run cgroup gets: memory, pids (and v1 cpuacct)
    v2_dir: str = ""  # the bot's own v2 cgroup
    v1_dirs: Mapping[str, str] = field(default_factory=dict)  # controller → the bot's own v1 cgroup
    is_root: bool = False
    why: str = ""  # why no cgroup is used, or why v2 was passed over

    @property
    def label(self) -> str:
        """"cgroup v1 (root)", "cgroup v2 delegated", … or "no cgroup"."""
        if self.backend == NONE:
            return "no cgroup"
        return f"{self.backend} {'(root)' if self.is_root else 'delegated'}"

    def enforcements(self, limits: RunLimits | None = None) -> list[Enforcement]:
        """Every limit of a run, enforced or not, with how."""
        limits = limits or RunLimits()
        cgroup = self.backend != NONE
        memory = Enforcement(f"run memory {limits.memory_mb} MB", "memory" in self.controllers,
                             f"{self.label}, no swap, the kernel OOM-kills inside the run" if "memory" in
                             self.controllers else f"not enforced ({self.why or 'no memory controller'}; "
                             "RLIMIT_AS is no substitute: node reserves far more address space than it uses)")
        if "pids" in self.controllers:
            procs = Enforcement(f"run processes {limits.max_procs}", True, self.label)
        elif not self.is_root:
            procs = Enforcement(f"run processes {limits.max_procs}", True,
                                "RLIMIT_NPROC, per uid: every process and thread of the bot's user counts")
        else:
            procs = Enforcement(f"run processes {limits.max_procs}", False,
                                "not enforced (root is exempt from RLIMIT_NPROC and no pids cgroup is writable)")
        return [
            memory, procs,
            Enforcement("leftover processes", cgroup, "ended through the run's cgroup" if cgroup else
                        "not tracked (without a cgroup a double-forked process leaves the run's process tree)"),
            Enforcement(f"run /tmp {limits.tmp_mb} MB", True, "bwrap --size on the jail's tmpfs"
                        + (", counted as run memory too" if "memory" in self.controllers else "")),
            Enforcement(f"workspace {limits.workspace_max_mb} MB", True, "checked before each turn; RLIMIT_FSIZE caps"
                        " each file at what is left (not the total one turn writes)"),
            Enforcement(f"run priority nice {limits.nice}", True,
                        f"setpriority, oom_score_adj {RUN_OOM_SCORE_ADJ}, no core dumps"),
            Enforcement("run CPU time", cgroup, "measured (cpuacct / cpu.stat)" if cgroup else "not measured"),
        ]

    def check_lines(self, limits: RunLimits | None = None) -> list[str]:
        """One ✓/✗ line per limit, for `python bot.py check`."""
        return [item.line() for item in self.enforcements(limits)]


def _writable(path: str) -> bool:
    return os.access(path, os.W_OK | os.X_OK) and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)


def _words(path: str) -> set[str]:
    try:
        with open(path, encoding="ascii") as handle:
            return set(handle.read().split())
    except OSError:
        return set()


def detect(*, proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup", euid: int | None = None,
           writable: Callable[[str], bool] = _writable) -> LimitSupport:
    """Which cgroups this process may create runs under: its own v2 cgroup when writable (systemd Delegate=yes)
    with memory and pids available, else its own v1 cgroups that it may write (as root), else none."""
    is_root = (os.geteuid() if euid is None else euid) == 0
    try:
        with open(proc_cgroup, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        return LimitSupport(NONE, is_root=is_root, why=f"{proc_cgroup} unreadable ({exc.strerror or exc})")
    own_v2, own_v1 = None, {}
    for line in lines:
        number, names, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and names == "":
            own_v2 = path
        for name in names.split(","):
            own_v1[name] = (names, path)
    why = "no writable cgroup (v2 needs systemd Delegate=yes; v1 needs root)"
    if own_v2 is not None:
        for mount in (cgroup_root, os.path.join(cgroup_root, "unified")):
            if os.path.isfile(os.path.join(mount, "cgroup.controllers")):
                own = os.path.normpath(os.path.join(mount, own_v2.lstrip("/")))
                available = _words(os.path.join(own, "cgroup.controllers"))
                wanted = tuple(name for name in V2_CONTROLLERS if name in available)
                if wanted and writable(own):
                    return LimitSupport(V2, wanted, v2_dir=own, is_root=is_root)
                why = (f"{own} is not writable (systemd: Delegate=yes and no ProtectControlGroups=)" if wanted else
                       f"{own} offers neither memory nor pids")
                break
    v1_dirs = {}
    for name in V1_CONTROLLERS:
        if name not in own_v1:
            continue
        names, path = own_v1[name]
        for mount in dict.fromkeys((os.path.join(cgroup_root, name), os.path.join(cgroup_root, names))):
            if os.path.isfile(os.path.join(mount, "cgroup.procs")):
                own = os.path.normpath(os.path.join(mount, path.lstrip("/")))
                if writable(own):
                    v1_dirs[name] = own
                break
    if "memory" in v1_dirs or "pids" in v1_dirs:
        return LimitSupport(V1, tuple(v1_dirs), v1_dirs=v1_dirs, is_root=is_root, why=why)
    return LimitSupport(NONE, is_root=is_root, why=why)


def _rlimit_pair(which: int, value: int) -> tuple[int, int]:
    """(value, value), never above the current hard limit (setrlimit cannot raise it)."""
    hard = resource.getrlimit(which)[1]
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    return value, value


def run_preexec(limits: RunLimits, *, procs_files: Iterable[str] = (), fsize_bytes: int | None = None,
                nproc: bool | None = None) -> Callable[[], None]:
    """A `preexec_fn` for the run's first process (bwrap): it joins the run's cgroups (`procs_files`) before exec,
    so nothing it starts escapes, then sets RLIMIT_CORE 0, RLIMIT_FSIZE `fsize_bytes` (the workspace budget left),
    nice and oom_score_adj. With `nproc` (default: when not root) RLIMIT_NPROC = max_procs, which the kernel
    counts per uid: every process and thread of the bot's user, the bot's included, takes from the run's share.

    It calls only os/resource functions on values computed here, so it is as safe as a preexec_fn gets in a
    threaded program. A cgroup or rlimit that cannot be set fails the Popen (SubprocessError): the run does not
    start unbounded. Priority and oom_score_adj are best effort.
    """
    files = [os.fsencode(path) for path in procs_files]
    rlimits = [(resource.RLIMIT_CORE, (0, 0))]
    if fsize_bytes is not None:
        rlimits.append((resource.RLIMIT_FSIZE, _rlimit_pair(resource.RLIMIT_FSIZE, max(0, int(fsize_bytes)))))
    if nproc is None:
        nproc = os.geteuid() != 0
    if nproc:
        rlimits.append((resource.RLIMIT_NPROC, _rlimit_pair(resource.RLIMIT_NPROC, limits.max_procs)))
    # setpriority to a lower nice than the bot's own would need privilege; never lower it.
    niceness = max(limits.nice, os.getpriority(os.PRIO_PROCESS, 0))
    adjust = str(RUN_OOM_SCORE_ADJ).encode()

    def preexec() -> None:
        pid = str(os.getpid()).encode()
        for path in files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        for which, pair in rlimits:
            resource.setrlimit(which, pair)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, adjust)
            finally:
                os.close(fd)
        except OSError:
            pass  # the kernel's choices in a pinch, not a wall: the run still starts

    return preexec


def _scan(paths: Iterable[str], max_entries: int, max_seconds: float) -> tuple[int, bool]:
    """Bytes on disk under `paths` (symlinks not followed, hard links and directories once) and whether the walk
    finished within its bounds."""
    deadline = time.monotonic() + max_seconds
    seen: set[tuple[int, int]] = set()
    total, entries, todo = 0, 0, []
    for path in paths:
        try:
            stat = os.lstat(path)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) not in seen:
            seen.add((stat.st_dev, stat.st_ino))
            total += stat.st_blocks * 512
            if os.path.isdir(path) and not os.path.islink(path):
                todo.append(path)
    while todo:
        try:
            with os.scandir(todo.pop()) as listing:
                for entry in listing:
                    entries += 1
                    if entries > max_entries or (entries % 256 == 0 and time.monotonic() > deadline):
                        return total, False
                    stat = entry.stat(follow_symlinks=False)
                    directory = entry.is_dir(follow_symlinks=False)
                    if directory or stat.st_nlink > 1:
                        if (stat.st_dev, stat.st_ino) in seen:
                            continue
                        seen.add((stat.st_dev, stat.st_ino))
                    total += stat.st_blocks * 512
                    if directory:
                        todo.append(entry.path)
        except OSError:
            continue  # a file removed while we walk, or one we may not read: the rest still counts
    return total, True


def workspace_usage_bytes(paths: Iterable[str], *, max_entries: int = 200_000, max_seconds: float = 3.0) -> int:
    """Disk space used under `paths` (st_blocks, symlinks not followed); a lower bound if the walk hit its bounds."""
    return _scan(paths, max_entries, max_seconds)[0]


def workspace_left(paths: Iterable[str], limit_mb: int, *, max_entries: int = 200_000,
                   max_seconds: float = 3.0) -> int:
    """Bytes the conversation may still write (0: refuse the turn with `workspace_full_text`); a tree too large
    to count within the bounds counts as full."""
    used, complete = _scan(paths, max_entries, max_seconds)
    return max(0, limit_mb * MB - used) if complete else 0
