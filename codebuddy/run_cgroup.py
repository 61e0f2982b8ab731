"""One run's cgroups: created with the run's limits, joined by its first process (bwrap), watched for the memory and
process caps, emptied of leftovers after a turn and removed at the end (docs/run-limits.md)."""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping

from codebuddy.run_limits import MB, V1, V2, LimitSupport, RunLimits, detect, run_preexec

# v1: run cgroups sit in this directory under the bot's own cgroup of each controller.
RUNS_V1 = "codebuddy-runs"
# v2: the bot moves itself into <own>/bot so that <own> may enable controllers for <own>/runs/<name> (the
# "no internal processes" rule); a run's processes live in <own>/runs/<name>/jail, below the limits it could
# otherwise rewrite (its uid owns the delegated files, and a cgroup namespace shows it only its own subtree).
BOT_LEAF_V2, RUNS_V2, JAIL_LEAF_V2 = "bot", "runs", "jail"
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except OSError:
        return ""


def _counter(path: str, key: str) -> int | None:
    """The value of `key` in a flat-keyed cgroup file (memory.events, pids.events, cpu.stat)."""
    for line in _read_text(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _write(path: str, value: str | int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)  # O_CREAT only matters for a test's plain-directory tree
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return int(handle.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


class CgroupError(OSError):
    """A run cgroup could not be set up."""


class RunCgroup:
    """One run's cgroups: created with its limits, joined by its first process, watched, emptied and removed."""

    def __init__(self, name: str, limits: RunLimits, support: LimitSupport, tops: Mapping[str, str],
                 leaves: tuple[str, ...]) -> None:
        self.name, self.limits, self.support = name, limits, support
        self.tops = dict(tops)  # controller (v2: "v2") → the run's cgroup, which carries the limits
        self.leaves = leaves  # where its processes go (v1: the tops themselves; v2: <top>/jail)

    @classmethod
    def create(cls, name: str, limits: RunLimits | None = None, support: LimitSupport | None = None) -> RunCgroup:
        """The run's cgroups, made and limited (`name`: one per run, letters, digits, `._-`); nothing is left
        behind when a limit cannot be set."""
        if not RUN_NAME.fullmatch(name):
            raise ValueError(f"bad run cgroup name {name!r}")
        limits = limits or RunLimits()
        support = detect() if support is None else support
        made = cls(name, limits, support, {}, ())
        try:
            made._make()
        except BaseException:
            made.remove(timeout=2.0)
            raise
        return made

    def _make(self) -> None:
        limits, support, name = self.limits, self.support, self.name
        if support.backend == V2:
            top = self.tops["v2"] = _make_v2_run(support, name)
            self.leaves = (os.path.join(top, JAIL_LEAF_V2),)
            if "memory" in support.controllers:
                _write(os.path.join(top, "memory.max"), limits.memory_mb * MB)
                _optional_write(os.path.join(top, "memory.swap.max"), 0)
            if "pids" in support.controllers:
                _write(os.path.join(top, "pids.max"), limits.max_procs)
            os.makedirs(self.leaves[0], exist_ok=True)
        elif support.backend == V1:
            for controller, own in support.v1_dirs.items():
                self.tops[controller] = _make_dir(os.path.join(own, RUNS_V1), name)
            self.leaves = tuple(self.tops.values())
            tops = self.tops
            if "memory" in tops:
                memory = tops["memory"]
                _write(os.path.join(memory, "memory.limit_in_bytes"), limits.memory_mb * MB)
                # memsw (memory + swap) equal to the memory limit: not a byte of swap; swappiness 0 the same.
                _optional_write(os.path.join(memory, "memory.memsw.limit_in_bytes"), limits.memory_mb * MB)
                _optional_write(os.path.join(memory, "memory.swappiness"), 0)
                _optional_write(os.path.join(memory, "memory.oom_control"), 0)  # the kernel OOM-kills inside
            if "pids" in tops:
                _write(os.path.join(tops["pids"], "pids.max"), limits.max_procs)
        else:
            raise CgroupError(errno.ENOTSUP, f"no cgroup for runs: {support.why}")

    def _top(self, controller: str) -> str:
        return self.tops.get("v2") or self.tops.get(controller, "")

    def procs_files(self) -> list[str]:
        """The cgroup.procs files a process writes its pid into to join the run."""
        return [os.path.join(leaf, "cgroup.procs") for leaf in self.leaves]

    def preexec(self, *, fsize_bytes: int | None = None) -> Callable[[], None]:
        """`preexec_fn` for the Popen of bwrap: joins the run before exec (recommended over `add`, which leaves
        what bwrap forks before it runs outside), plus the rlimits, nice and oom_score_adj of `run_preexec`."""
        return run_preexec(self.limits, procs_files=self.procs_files(), fsize_bytes=fsize_bytes,
                           nproc=not self.support.is_root and "pids" not in self.support.controllers)

    def add(self, pid: int) -> None:
        """Move `pid` into the run (its children already forked stay where they are)."""
        for path in self.procs_files():
            _write(path, pid)

    def memory_exceeded(self) -> bool:
        """Whether the kernel OOM-killed a process of the run (v1: oom_control's oom_kill, else failcnt; v2:
        memory.events oom_kill)."""
        top = self._top("memory")
        if not top or "memory" not in self.support.controllers:
            return False
        if "v2" in self.tops:
            kills = _counter(os.path.join(top, "memory.events"), "oom_kill")
            return bool(kills if kills is not None else _counter(os.path.join(top, "memory.events"), "oom"))
        kills = _counter(os.path.join(top, "memory.oom_control"), "oom_kill")
        if kills is not None:
            return kills > 0
        return int(_read_text(os.path.join(top, "memory.failcnt")).strip() or 0) > 0

    def pids_exceeded(self) -> bool:
        """Whether a fork in the run failed at its process cap (pids.events `max`)."""
        top = self._top("pids")
        return bool(top and "pids" in self.support.controllers and _counter(os.path.join(top, "pids.events"), "max"))

    def cpu_seconds(self) -> float | None:
        """CPU time the run used so far (v1 cpuacct.usage, v2 cpu.stat usage_usec); None where not measured."""
        if "v2" in self.tops:
            usec = _counter(os.path.join(self.tops["v2"], "cpu.stat"), "usage_usec")
            return None if usec is None else usec / 1e6
        nanoseconds = _read_text(os.path.join(self.tops.get("cpuacct", "/nonexistent"), "cpuacct.usage")).strip()
        return int(nanoseconds) / 1e9 if nanoseconds.isdigit() else None

    def procs(self) -> set[int]:
        """Pids of every process in the run (in any cgroup it made below its own)."""
        found: set[int] = set()
        for leaf in self.leaves:
            for directory, _, _ in os.walk(leaf):
                found |= {int(word) for word in _read_text(os.path.join(directory, "cgroup.procs")).split()}
        return found

    def kept(self, pids: Iterable[int], members: set[int]) -> set[int]:
        """`pids` and their ancestors among `members` (bwrap and its init, whose death would take them down)."""
        keep: set[int] = set()
        for pid in pids:
            while pid in members and pid not in keep:
                keep.add(pid)
                pid = parent_pid(pid)
        return keep

    def kill_all(self, except_pids: Iterable[int] = (), timeout: float = 5.0) -> int:
        """SIGKILL every process of the run except `except_pids` and their ancestors in the run (bwrap and its
        init, whose death would take the kept CLI down), until none is left; how many were signalled."""
        keep = self.kept(except_pids, self.procs())
        if not keep and "v2" in self.tops:
            _optional_write(os.path.join(self.tops["v2"], "cgroup.kill"), 1)  # all at once, forks included
        deadline = time.monotonic() + timeout
        signalled: set[int] = set()
        while True:
            targets = self.procs() - keep
            if not targets or time.monotonic() > deadline:
                return len(signalled)
            for pid in targets:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
            signalled |= targets
            time.sleep(0.01)

    def remove(self, timeout: float = 10.0) -> bool:
        """Kill everything in the run, wait until it is empty and remove its cgroups; True once they are gone.
        Safe to call again."""
        deadline = time.monotonic() + timeout
        self.kill_all(timeout=timeout)
        left = list(self.tops.values())
        while left:
            left = [top for top in left if not _remove_tree(top)]
            if not left or time.monotonic() > deadline:
                break
            self.kill_all(timeout=max(0.0, deadline - time.monotonic()))
            time.sleep(0.02)
        if "v2" not in self.tops:
            for top in self.tops.values():
                try:
                    os.rmdir(os.path.dirname(top))  # the shared codebuddy-runs directory, once no run uses it
                except OSError:
                    pass
        return not left


def _optional_write(path: str, value: str | int) -> None:
    """Write a setting this kernel may lack (swap accounting, say); the limits that matter are written strictly."""
    try:
        _write(path, value)
    except OSError:
        pass


def _make_dir(parent: str, name: str) -> str:
    """parent/name, created (an existing one, left by a bot that died, is taken over)."""
    path = os.path.join(parent, name)
    for _ in range(3):  # another run's remove() may take the shared parent away between the two mkdirs
        try:
            os.makedirs(parent, exist_ok=True)
            os.mkdir(path)
            return path
        except FileExistsError:
            return path
        except FileNotFoundError:
            continue
    raise CgroupError(errno.ENOENT, f"cannot create {path}")


def _enable(directory: str, controllers: Iterable[str]) -> None:
    control = os.path.join(directory, "cgroup.subtree_control")
    missing = [name for name in controllers if name not in _read_text(control).split()]
    if missing:
        _write(control, " ".join(f"+{name}" for name in missing))


def _make_v2_run(support: LimitSupport, name: str) -> str:
    """<own>/runs/<name> with the controllers enabled on the way, after moving the bot's processes into <own>/bot."""
    own = support.v2_dir
    leaf = _make_dir(own, BOT_LEAF_V2)
    for _ in range(5):
        for pid in _read_text(os.path.join(own, "cgroup.procs")).split():
            try:
                _write(os.path.join(leaf, "cgroup.procs"), pid)
            except ProcessLookupError:
                continue
        try:
            _enable(own, support.controllers)
            break
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # EBUSY: a process forked into <own> meanwhile; move it too
                raise
    else:
        raise CgroupError(errno.EBUSY, f"{own} keeps processes; cannot enable {' '.join(support.controllers)}")
    runs = _make_dir(own, RUNS_V2)
    _enable(runs, support.controllers)
    return _make_dir(runs, name)


def _remove_tree(top: str) -> bool:
    """rmdir `top` and any cgroup below it, deepest first; True when it is gone."""
    if not os.path.isdir(top):
        return True
    for directory, _, _ in os.walk(top, topdown=False):
        try:
            os.rmdir(directory)
        except OSError:
            return False
    return True
