"""Issue 22, the resource half: real attacks on one run (fork flood, memory, file size, double-forked leftovers),
each bounded by small limits and cleaned up, plus detection on this host and on fake cgroup trees."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from codebuddy.run_cgroup import BOT_LEAF_V2, JAIL_LEAF_V2, RUNS_V2, RunCgroup
from codebuddy.run_limits import (
    MB,
    NONE,
    RUN_OOM_SCORE_ADJ,
    V1,
    V2,
    LimitSupport,
    RunLimits,
    bwrap_tmpfs_args,
    detect,
    memory_exceeded_text,
    procs_exceeded_text,
    run_preexec,
    workspace_full_text,
    workspace_left,
    workspace_usage_bytes,
)

SUPPORT = detect()
IS_ROOT = os.geteuid() == 0
UNIFIED = Path("/sys/fs/cgroup/unified")
BWRAP = shutil.which("bwrap")
# The jail of sandbox.py, less its mounts: the whole host read-only is enough to run sh, sleep and Python.
JAIL = [BWRAP or "bwrap", "--die-with-parent", "--new-session", "--unshare-user", "--cap-drop", "ALL", "--unshare-pid",
        "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--ro-bind", "/", "/", "--dev", "/dev",
        "--proc", "/proc"]
# sh gives up at its first failed fork; the outer one then stays as the run's main process (an exec needs no fork).
FORK_FLOOD = "(for i in $(seq 100); do sleep 30 & done); exec sleep 31"
LEFTOVER = "(setsid sleep 61 &); exec sleep 301"

needs_pids = pytest.mark.skipif("pids" not in SUPPORT.controllers, reason=f"no pids cgroup here ({SUPPORT.why})")
needs_memory = pytest.mark.skipif("memory" not in SUPPORT.controllers, reason=f"no memory cgroup ({SUPPORT.why})")
needs_cgroup = pytest.mark.skipif(SUPPORT.backend == NONE, reason=f"no writable cgroup here ({SUPPORT.why})")
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="bwrap not installed")


def wait_until(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())


def argv_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode() for part in handle.read().split(b"\0") if part]
    except OSError:
        return []


def leftover_settled(run: RunCgroup) -> bool:
    """The LEFTOVER script is done forking: its main process and its daemon, each exec'd to sleep, and nothing else."""
    return sorted(argv_of(pid) for pid in run.procs()) == [["sleep", "301"], ["sleep", "61"]]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def tagged(marker: str) -> list[int]:
    """Live processes, anywhere on the host, whose environment carries this test's marker."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if f"RUN_LIMITS_TEST={marker}".encode() in handle.read().split(b"\0") and alive(int(entry)):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


class Runs:
    """Starts tagged processes and run cgroups for one test, and ends them all afterwards."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex[:12]
        self.cgroups: list[RunCgroup] = []
        self.children: list[subprocess.Popen] = []

    def cgroup(self, limits: RunLimits = RunLimits(), support: LimitSupport = SUPPORT) -> RunCgroup:  # noqa: B008
        run = RunCgroup.create(f"test-{self.marker}-{len(self.cgroups)}", limits, support)
        self.cgroups.append(run)
        return run

    def spawn(self, argv: list[str], preexec: Callable[[], None] | None, **options) -> subprocess.Popen:
        env = {"PATH": os.defpath, "RUN_LIMITS_TEST": self.marker}
        child = subprocess.Popen(argv, preexec_fn=preexec, env=env, start_new_session=True, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, **options)
        self.children.append(child)
        return child

    def close(self) -> None:
        removed = [run.remove(timeout=10) for run in self.cgroups]
        for _ in range(3):  # a backstop for a test that failed before its cgroup held everything
            for pid in tagged(self.marker):
                os.kill(pid, signal.SIGKILL)
        for child in self.children:
            child.kill()
            child.communicate(timeout=10)
        assert all(removed), "a run cgroup could not be removed"
        assert not tagged(self.marker)


@pytest.fixture
def runs() -> Iterator[Runs]:
    made = Runs()
    try:
        yield made
    finally:
        made.close()


# Detection


@pytest.mark.skipif(not (IS_ROOT and os.path.isdir("/sys/fs/cgroup/memory")), reason="needs root and cgroup v1")
def test_detection_here_enforces_memory_and_processes_through_cgroup_v1_as_root():
    assert SUPPORT.backend == V1 and SUPPORT.label == "cgroup v1 (root)"
    assert {"memory", "pids"} <= set(SUPPORT.controllers)
    lines = SUPPORT.check_lines(RunLimits())
    assert "✓ run memory 2048 MB: cgroup v1 (root), no swap, the kernel OOM-kills inside the run" in lines
    assert "✓ run processes 256: cgroup v1 (root)" in lines
    assert "✓ leftover processes: ended through the run's cgroup" in lines


def fake_tree(tmp_path: Path, proc_lines: str, files: dict[str, str]) -> tuple[str, str]:
    """A cgroup root of plain directories and files, and a /proc/self/cgroup naming this process's place in it."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "self-cgroup").write_text(proc_lines)
    return str(tmp_path / "self-cgroup"), str(root)


def test_detection_prefers_a_delegated_v2_cgroup_and_lays_out_a_run_below_it(tmp_path):
    own = "system.slice/dingtalk-bot.service"
    proc, root = fake_tree(tmp_path, f"0::/{own}\n", {
        "cgroup.controllers": "cpu io memory pids\n", f"{own}/cgroup.controllers": "memory pids\n",
        f"{own}/cgroup.procs": "4242\n"})
    support = detect(proc_cgroup=proc, cgroup_root=root, euid=1000, writable=lambda path: path.endswith(own))
    assert (support.backend, support.controllers, support.label) == (V2, ("memory", "pids"), "cgroup v2 delegated")
    assert "✓ run memory 2048 MB: cgroup v2 delegated, no swap, the kernel OOM-kills inside the run" in \
        support.check_lines()

    run = RunCgroup.create("run-1", RunLimits(memory_mb=64, max_procs=32), support)
    top = Path(root, own, RUNS_V2, "run-1")
    # The bot left <own> for a leaf first, so <own> may enable controllers for its children.
    assert Path(root, own, BOT_LEAF_V2, "cgroup.procs").read_text() == "4242"
    assert Path(root, own, "cgroup.subtree_control").read_text() == "+memory +pids"
    assert Path(root, own, RUNS_V2, "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (top / "memory.max").read_text() == str(64 * MB)
    assert (top / "memory.swap.max").read_text() == "0"
    assert (top / "pids.max").read_text() == "32"
    assert run.procs_files() == [str(top / JAIL_LEAF_V2 / "cgroup.procs")]
    assert not run.memory_exceeded() and not run.pids_exceeded()
    (top / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (top / "pids.events").write_text("max 3\n")
    (top / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    assert run.memory_exceeded() and run.pids_exceeded() and run.cpu_seconds() == 1.5


def test_detection_with_nothing_writable_falls_back_to_rlimits(tmp_path):
    proc, root = fake_tree(tmp_path, "8:pids:/\n4:memory:/bots/a\n2:cpu,cpuacct:/\n0::/\n", {
        "unified/cgroup.controllers": "hugetlb\n", "memory/cgroup.procs": "", "memory/bots/a/cgroup.procs": "",
        "pids/cgroup.procs": "", "cpu,cpuacct/cgroup.procs": ""})
    as_user = detect(proc_cgroup=proc, cgroup_root=root, euid=1000, writable=lambda path: False)
    assert as_user.backend == NONE
    lines = as_user.check_lines(RunLimits())
    assert lines[0].startswith("✗ run memory 2048 MB: not enforced")
    assert "✓ run processes 256: RLIMIT_NPROC, per uid: every process and thread of the bot's user counts" in lines
    assert lines[2].startswith("✗ leftover processes: not tracked")
    as_root = detect(proc_cgroup=proc, cgroup_root=root, euid=0, writable=lambda path: False)
    assert as_root.check_lines()[1].startswith("✗ run processes 256: not enforced (root is exempt from RLIMIT_NPROC")
    # Writable v1 (this host's case: the v2 tree offers only hugetlb), the combined cpu,cpuacct mount found too.
    v1 = detect(proc_cgroup=proc, cgroup_root=root, euid=0, writable=lambda path: True)
    assert (v1.backend, v1.label) == (V1, "cgroup v1 (root)")
    assert dict(v1.v1_dirs) == {"memory": f"{root}/memory/bots/a", "pids": f"{root}/pids",
                                "cpuacct": f"{root}/cpu,cpuacct"}


def test_a_run_name_that_could_leave_the_runs_directory_is_refused(tmp_path):
    support = LimitSupport(V1, ("pids",), v1_dirs={"pids": str(tmp_path)}, is_root=True)
    for name in ("../escape", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            RunCgroup.create(name, RunLimits(), support)
    assert list(tmp_path.iterdir()) == []


def test_replies_name_the_limit():
    limits = RunLimits(memory_mb=2048, max_procs=256, workspace_max_mb=1024)
    assert memory_exceeded_text(limits) == "内存超出限制 (2048 MB)：本次运行已被终止。"
    assert procs_exceeded_text(limits) == "进程数达到上限 (256 个)：多出的进程未能启动。"
    assert workspace_full_text(limits) == "工作区已满 (1024 MB)：请删除文件或发送 /new 开始新的会话。"


# Attacks on a run


@needs_pids
def test_a_fork_flood_stops_at_max_procs_and_kill_all_ends_it(runs):
    run = runs.cgroup(RunLimits(max_procs=32))
    child = runs.spawn(["sh", "-c", FORK_FLOOD], run.preexec())
    assert wait_until(run.pids_exceeded), "the kernel never refused a fork"
    time.sleep(0.3)  # let the shell try the rest of its 100
    assert 0 < len(tagged(runs.marker)) <= 32
    assert len(run.procs()) <= 32
    assert run.kill_all() > 0
    assert run.procs() == set() and not tagged(runs.marker)
    assert child.wait(timeout=10) == -signal.SIGKILL


@needs_memory
def test_a_run_allocating_past_its_memory_is_oom_killed_and_the_bot_is_not(runs):
    run = runs.cgroup(RunLimits(memory_mb=64))
    child = runs.spawn([sys.executable, "-c", "data = bytearray(b'x') * (300 * 1024 * 1024); print(len(data))"],
                       run.preexec())
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and out == b""
    assert run.memory_exceeded()
    assert alive(os.getpid())


def test_a_file_past_fsize_fails_with_efbig_or_sigxfsz(tmp_path, runs):
    preexec = run_preexec(RunLimits(), fsize_bytes=MB)
    python = runs.spawn([sys.executable, "-c", (
        "import errno, sys\n"
        "try:\n"
        f"    with open({str(tmp_path / 'big.py.out')!r}, 'wb', buffering=0) as f:\n"
        "        for _ in range(80): f.write(b'x' * 65536)\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode[exc.errno]); sys.exit(3)\n")], preexec)
    out, _ = python.communicate(timeout=30)
    assert (python.returncode, out.strip()) == (3, b"EFBIG")  # Python ignores SIGXFSZ: the write fails instead
    shell = runs.spawn(["sh", "-c", f"exec head -c {5 * MB} /dev/zero > {tmp_path / 'big.sh.out'}"], preexec)
    shell.communicate(timeout=30)
    assert shell.returncode == -signal.SIGXFSZ
    assert (tmp_path / "big.py.out").stat().st_size <= MB and (tmp_path / "big.sh.out").stat().st_size <= MB


@needs_cgroup
def test_a_double_forked_leftover_is_found_and_ended_while_the_main_process_stays(runs):
    run = runs.cgroup()
    child = runs.spawn(["sh", "-c", LEFTOVER], run.preexec())
    assert wait_until(lambda: leftover_settled(run))
    daemon = (run.procs() - {child.pid}).pop()
    assert argv_of(daemon) == ["sleep", "61"] and os.getsid(daemon) != os.getsid(child.pid)
    assert run.kill_all(except_pids=[child.pid]) == 1
    assert run.procs() == {child.pid} and child.poll() is None and not alive(daemon)


@needs_cgroup
def test_a_run_gets_the_priority_oom_score_and_rlimits_asked_and_the_bot_keeps_its_own(runs):
    own_nice, own_adjust = os.getpriority(os.PRIO_PROCESS, 0), Path("/proc/self/oom_score_adj").read_text()
    run = runs.cgroup(RunLimits(nice=10))
    child = runs.spawn(["sleep", "30"], run.preexec(fsize_bytes=2 * MB))
    assert wait_until(lambda: argv_of(child.pid) == ["sleep", "30"])
    assert os.getpriority(os.PRIO_PROCESS, child.pid) == max(10, own_nice)
    assert Path(f"/proc/{child.pid}/oom_score_adj").read_text().strip() == str(RUN_OOM_SCORE_ADJ)
    limits = Path(f"/proc/{child.pid}/limits").read_text()
    assert "Max core file size        0                    0" in limits
    assert f"Max file size             {2 * MB}              {2 * MB}" in limits
    assert child.pid in run.procs()
    assert (os.getpriority(os.PRIO_PROCESS, 0), Path("/proc/self/oom_score_adj").read_text()) == (own_nice, own_adjust)


@needs_cgroup
def test_cpu_time_of_a_run_is_measured(runs):
    run = runs.cgroup()
    child = runs.spawn([sys.executable, "-c", "import time\nwhile time.process_time() < 0.5: pass"], run.preexec())
    child.communicate(timeout=30)
    assert run.cpu_seconds() is not None and run.cpu_seconds() >= 0.4


def unused_uid() -> int:
    """A uid with no process now: RLIMIT_NPROC counts every process of the uid (nobody has dozens on this host)."""
    busy = set()
    for entry in os.listdir("/proc"):
        try:
            busy.add(os.stat(f"/proc/{entry}").st_uid)
        except (OSError, ValueError):
            continue
    return next(uid for uid in range(47000, 48000) if uid not in busy)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to run a child as another uid")
def test_without_a_pids_cgroup_rlimit_nproc_caps_a_non_root_run(runs):
    child = runs.spawn(["sh", "-c", FORK_FLOOD], run_preexec(RunLimits(max_procs=16), nproc=True), user=unused_uid(),
                       cwd="/")
    assert wait_until(lambda: argv_of(child.pid) == ["sleep", "31"])
    time.sleep(0.3)
    assert 0 < len(tagged(runs.marker)) <= 16
    assert b"Cannot fork" in child.stderr.read1()


# The whole jail


@needs_bwrap
@needs_pids
def test_the_whole_jail_is_in_the_run_cgroup_and_a_fork_flood_inside_stops_at_max_procs(runs):
    run = runs.cgroup(RunLimits(max_procs=32))
    jail = runs.spawn([*JAIL, "--", "sh", "-c", FORK_FLOOD], run.preexec())
    assert wait_until(run.pids_exceeded), "the kernel never refused a fork in the jail"
    time.sleep(0.3)
    assert jail.pid in run.procs()
    assert 0 < len(tagged(runs.marker)) <= 32
    assert run.remove()
    # bwrap killed itself, or (its child killed a moment earlier) exiting with its child's 128 + SIGKILL.
    assert jail.wait(timeout=10) in (-signal.SIGKILL, 128 + signal.SIGKILL) and not tagged(runs.marker)


@needs_bwrap
@needs_memory
def test_memory_in_the_jail_is_capped(runs):
    run = runs.cgroup(RunLimits(memory_mb=64))
    jail = runs.spawn([*JAIL, "--", sys.executable, "-c", "data = bytearray(b'x') * (300 * 1024 * 1024)"],
                      run.preexec())
    jail.communicate(timeout=60)
    assert jail.returncode != 0 and run.memory_exceeded()


@needs_bwrap
@needs_cgroup
def test_a_leftover_in_the_jail_is_ended_while_bwrap_and_the_cli_stay(runs):
    run = runs.cgroup()
    jail = runs.spawn([*JAIL, "--", "sh", "-c", LEFTOVER], run.preexec())
    assert wait_until(lambda: {tuple(argv_of(pid)) for pid in run.procs()} >= {("sleep", "301"), ("sleep", "61")}
                      and not [pid for pid in run.procs() if argv_of(pid)[:1] in (["sh"], ["setsid"])])
    cli = next(pid for pid in run.procs() if argv_of(pid) == ["sleep", "301"])
    assert run.kill_all(except_pids=[cli]) == 1  # bwrap and its pid 1 are the CLI's ancestors: kept
    assert len(run.procs()) == 3 and jail.pid in run.procs() and alive(cli)
    assert [argv_of(pid) for pid in tagged(runs.marker) if argv_of(pid)[:1] == ["sleep"]] == [["sleep", "301"]]


@needs_bwrap
def test_the_jails_tmp_is_capped_by_its_size(tmp_path):
    argv = [*JAIL, *bwrap_tmpfs_args(RunLimits(tmp_mb=1)), "--", "sh", "-c",
            f"head -c {5 * MB} /dev/zero > /tmp/f; echo rc=$?; wc -c < /tmp/f"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "rc=1" in result.stdout and "No space left" in result.stderr
    assert int(result.stdout.split()[-1]) <= MB


# v2 on the kernel's own v2 tree: here it offers no controller to children (the root's subtree_control is empty, and
# enabling one there would change the whole machine), so this checks the layout, joining and killing, not the limits.


@pytest.mark.skipif(not (IS_ROOT and UNIFIED.joinpath("cgroup.procs").exists()), reason="needs root and a v2 tree")
def test_the_v2_layout_on_a_real_v2_tree_moves_the_bot_to_a_leaf_then_runs_and_kills(runs):
    own = UNIFIED / f"run-limits-test-{runs.marker}"
    own.mkdir()
    bot = runs.spawn(["sleep", "30"], None)
    try:
        (own / "cgroup.procs").write_text(str(bot.pid))
        run = runs.cgroup(RunLimits(), LimitSupport(V2, (), v2_dir=str(own), is_root=True))
        assert (own / BOT_LEAF_V2 / "cgroup.procs").read_text().split() == [str(bot.pid)]
        assert (own / "cgroup.procs").read_text() == ""
        child = runs.spawn(["sh", "-c", LEFTOVER], run.preexec())
        assert wait_until(lambda: leftover_settled(run))
        assert str(child.pid) in (own / RUNS_V2 / run.name / JAIL_LEAF_V2 / "cgroup.procs").read_text().split()
        assert run.kill_all(except_pids=[child.pid]) == 1 and run.procs() == {child.pid}
        assert run.cpu_seconds() is not None
        assert run.remove() and run.remove()  # cgroup.kill ends the rest; a second call finds nothing to do
        assert child.wait(timeout=10) == -signal.SIGKILL and not (own / RUNS_V2 / run.name).exists()
    finally:
        bot.kill()
        bot.wait(timeout=10)
        for directory in (own / BOT_LEAF_V2, own / RUNS_V2, own):
            wait_until(lambda d=directory: not d.exists() or _rmdir(d), timeout=5)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False


# The workspace budget


def test_workspace_usage_counts_a_file_and_not_a_symlink_to_a_big_one_outside(tmp_path):
    workspace, outside = tmp_path / "workspace", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    (workspace / "data.bin").write_bytes(os.urandom(3 * MB))
    (outside / "big.bin").write_bytes(os.urandom(20 * MB))
    (workspace / "link").symlink_to(outside / "big.bin")
    (workspace / "hard").hardlink_to(workspace / "data.bin")
    used = workspace_usage_bytes([str(workspace)])
    assert 3 * MB <= used < 3 * MB + 256 * 1024
    assert 0 < workspace_left([str(workspace)], 4) <= MB
    assert workspace_left([str(workspace)], 2) == 0


def test_a_workspace_too_big_to_count_counts_as_full(tmp_path):
    for index in range(50):
        (tmp_path / f"f{index}").write_text("x")
    assert workspace_left([str(tmp_path)], 1024, max_entries=10) == 0
    assert workspace_left([str(tmp_path)], 1024) > 1000 * MB
