"""Processes below a CLI process, found through the parent links in /proc: listed, killed and measured."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def children_by_parent(proc_root: str = "/proc") -> dict[int, list[int]]:
    """Every live process's children, by parent pid (zombies left out: they run nothing, and are gone once their
    parent reaps them)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir(proc_root) if e.isdigit()]
    except OSError:
        return children
    for entry in entries:
        try:
            with open(os.path.join(proc_root, entry, "stat"), "rb") as handle:
                stat = handle.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] == b"Z":
                continue
            parent = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    return children


def descendants(pid: int, proc_root: str = "/proc", children: dict[int, list[int]] | None = None) -> list[int]:
    """Pids of every process below `pid` (`children`: a `children_by_parent` already read, for several lookups)."""
    children = children_by_parent(proc_root) if children is None else children
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def cli_pid(root: int, marker: str, proc_root: str = "/proc") -> int:
    """The first process at or below `root` whose argv holds `marker` and no `--` (in a sandbox, the jail's
    wrapper processes carry the CLI's argv after a `--`); `root` when none does."""
    children = children_by_parent(proc_root)
    todo = [root]
    while todo:
        pid = todo.pop(0)
        try:
            with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            argv = []
        if marker.encode() in argv and b"--" not in argv:
            return pid
        todo.extend(children.get(pid, []))
    return root


def cpu_seconds(root: int, proc_root: str = "/proc") -> float:
    """CPU time (user and system) used by `root` and every live process below it, with what each has reaped of its
    children (a tool that ended is counted in whoever waited for it)."""
    total = 0
    for pid in [root, *descendants(root, proc_root)]:
        try:
            with open(os.path.join(proc_root, str(pid), "stat"), "rb") as handle:
                stat = handle.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            total += sum(int(value) for value in fields[11:15])  # utime, stime, cutime, cstime
        except (OSError, ValueError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def kill(pids: Iterable[int]) -> int:
    """SIGKILL each of `pids` still alive; return how many were signalled."""
    killed = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def rss_bytes(pids: Iterable[int], proc_root: str = "/proc") -> int:
    """Resident memory of `pids` together."""
    total = 0
    for pid in pids:
        try:
            with open(os.path.join(proc_root, str(pid), "statm"), "rb") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def kill_tagged(variable: str, tag: str, proc_root: str = "/proc", *, prefix: bool = False,
                keep: Iterable[str] = ()) -> int:
    """SIGKILL every process whose environment has `variable=tag` (with `prefix`: a value starting with `tag`, but
    not one in `keep`); return how many. The tag survives into every child, in whatever session or group."""
    if not tag:
        return 0
    marker = f"{variable}={tag}".encode()
    kept = {f"{variable}={value}".encode() for value in keep}
    killed = 0
    try:
        entries = [e for e in os.listdir(proc_root) if e.isdigit()]
    except OSError:
        return 0
    for entry in entries:
        try:
            with open(os.path.join(proc_root, entry, "environ"), "rb") as handle:
                variables = handle.read().split(b"\0")
            if prefix:
                if not any(v.startswith(marker) and v not in kept for v in variables):
                    continue
            elif marker not in variables:
                continue
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError):
            continue
    return killed
