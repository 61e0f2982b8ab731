"""Spare CLI processes (codebuddy/spares.py): their slots in the warm pool, their fresh directories, adoption by a new
conversation (a jail's bind mounts follow the rename), and the keeper that starts, replaces and withholds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codebuddy.sandbox import Bubblewrap, Workspaces
from codebuddy.spares import (
    REFILL_AFTER,
    RETRY_SECONDS,
    SpareKeeper,
    cli_session,
    has_cli_session,
    memory_available,
    record_cli_session,
    startup_files,
)
from codebuddy.warm_pool import WarmPool
from tests.conftest import FAKE_CLI, bwrap_path
from tests.standin import poll_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeProcess:
    """What the pool and the keeper use of a WarmProcess."""

    count = 0

    def __init__(self, clock: Clock, conversation: str = "", *, ready: str = "") -> None:
        FakeProcess.count += 1
        self.pid = 50_000 + FakeProcess.count
        self.tag = f"tag-{self.pid}"
        self.conversation = conversation
        self.session_id = self.cli_session = f"cli-{self.pid}"
        self.started_at = self.last_used = clock()
        self.turns = 0
        self.flood = ""
        self.stderr_tail: list[str] = []
        self.stopped = False
        self._ready = ready

    def alive(self) -> bool:
        return not self.stopped

    def wait_ready(self) -> str:
        return self._ready

    def rss_bytes(self, children=None) -> int:
        return 1


def pool_of(capacity: int, clock: Clock) -> tuple[WarmPool, list[FakeProcess]]:
    ended: list[FakeProcess] = []

    def stop(process):
        process.stopped = True
        ended.append(process)

    return WarmPool(capacity, 600, clock=clock, stop=stop), ended


def keeper_of(tmp_path: Path, clock: Clock, *, count: int = 1, capacity: int = 4, ready: str = "", floor: int = 0,
              meminfo: str = "/proc/meminfo") -> tuple[SpareKeeper, WarmPool, list]:
    pool = WarmPool(capacity, 600, clock=clock, stop=lambda process: end(process))
    workspaces = Workspaces(str(tmp_path / "work"))
    started: list[tuple] = []

    def start(dirs, cli):
        process = FakeProcess(clock, ready=ready)
        process.cli_session = process.session_id = cli
        started.append((process, dirs))
        return process, ""

    def end(process):
        process.stopped = True
        keeper.ended(process)

    keeper = SpareKeeper(count, pool, workspaces, start, end, memory_floor=floor, meminfo=meminfo, max_age=600,
                         clock=clock)
    return keeper, pool, started


# ---------------------------------------------------------------- the warm pool's slots

def test_a_spare_takes_only_a_free_slot_and_is_the_first_evicted():
    clock = Clock()
    pool, ended = pool_of(2, clock)
    assert pool.reserve_spare(1)
    assert not pool.reserve_spare(1)  # one wanted, one starting
    spare = FakeProcess(clock)
    assert pool.spare_ready(spare) and pool.stats()["spares"] == 1
    assert pool.reserve()  # a conversation takes the free slot
    conversation = FakeProcess(clock, "chat-a")
    pool.started(conversation, True)
    pool.give_back(conversation, keep=True)
    assert not pool.reserve_spare(2)  # full: a spare never pushes a conversation's process out
    assert pool.reserve()  # a new conversation: the spare goes, not chat-a's idle process
    assert ended == [spare] and pool.stats()["idle"] == 1
    assert pool.stats()["live"] == 1 and pool.stats()["capacity"] == 2


def test_taking_a_spare_skips_dead_ones_and_marks_it_busy():
    clock = Clock()
    pool, ended = pool_of(4, clock)
    dead, live = FakeProcess(clock), FakeProcess(clock)
    for process in (dead, live):
        assert pool.reserve_spare(2) and pool.spare_ready(process)
    dead.stopped = True
    assert pool.take_spare() is live and ended == [dead]
    assert pool.stats()["busy"] == 1 and pool.stats()["adopted"] == 1 and pool.take_spare() is None


def test_old_spares_end_and_a_stopped_pool_keeps_none():
    clock = Clock()
    pool, ended = pool_of(4, clock)
    old = FakeProcess(clock)
    assert pool.reserve_spare(2) and pool.spare_ready(old)
    clock.now += 100
    young = FakeProcess(clock)
    assert pool.reserve_spare(2) and pool.spare_ready(young)
    assert pool.end_spares("old", started_before=clock.now - 50) == 1 and ended == [old]
    assert pool.reserve_spare(2)
    pool.stop_all()
    assert ended == [old, young]
    assert not pool.spare_ready(FakeProcess(clock))  # started while the bot stopped: the caller ends it
    assert not pool.reserve_spare(2) and pool.processes() == []


def test_a_process_ended_by_a_new_session_frees_its_slot():
    clock = Clock()
    pool, ended = pool_of(1, clock)
    old = FakeProcess(clock, "chat-a")
    old.session_id = "s1"
    assert pool.reserve()
    pool.started(old, True)
    pool.give_back(old, keep=True)
    assert pool.take("chat-a", "s2") is None and ended == [old]  # /new: the old session's process ends
    assert pool.stats()["live"] == 0 and pool.reserve_spare(1)  # and holds no slot (it used to stay "busy")


# ---------------------------------------------------------------- directories

def test_a_spare_gets_fresh_private_directories_and_adoption_moves_the_conversations_files_into_them(tmp_path):
    workspaces = Workspaces(str(tmp_path / "work"))
    spare = workspaces.new_spare()
    assert os.listdir(spare.workspace) == [] and os.listdir(spare.home) == []
    assert all(os.stat(p).st_mode & 0o777 == 0o700 for p in (spare.workspace, spare.home))
    # What the spare's CLI made at its start, and what the conversation holds (an attachment; an earlier session).
    Path(spare.home, ".codebuddy", "sessions").mkdir(parents=True)
    Path(spare.home, ".codebuddy", "sessions", "2.json").write_text("the spare's")
    conversation = workspaces.dirs_for("chat-a")
    Path(conversation.workspace, "attached.txt").write_text("sent with the first message")
    locked = Path(conversation.workspace, "locked")
    locked.mkdir()
    Path(locked, "inside.txt").write_text("kept")
    locked.chmod(0o500)
    os.symlink("/etc/passwd", Path(conversation.workspace, "link"))
    Path(conversation.home, ".codebuddy", "sessions").mkdir(parents=True)
    Path(conversation.home, ".codebuddy", "sessions", "2.json").write_text("an ended process's")
    Path(conversation.home, ".codebuddy", "projects", "workspace").mkdir(parents=True)
    Path(conversation.home, ".codebuddy", "projects", "workspace", "old.jsonl").write_text("old session")
    inode = os.stat(spare.workspace).st_ino

    adopted = workspaces.adopt("chat-a", spare)
    assert adopted == conversation and os.stat(adopted.workspace).st_ino == inode  # the spare's own directory
    assert Path(adopted.workspace, "attached.txt").read_text() == "sent with the first message"
    assert Path(adopted.workspace, "locked", "inside.txt").read_text() == "kept"
    assert os.readlink(Path(adopted.workspace, "link")) == "/etc/passwd"
    assert Path(adopted.home, ".codebuddy", "sessions", "2.json").read_text() == "the spare's"
    assert Path(adopted.home, ".codebuddy", "projects", "workspace", "old.jsonl").read_text() == "old session"
    assert sorted(os.listdir(os.path.dirname(adopted.workspace))) == ["home", "workspace"]
    assert os.listdir(workspaces.spares_root) == []


def test_a_jail_follows_its_directories_when_a_conversation_adopts_them(tmp_path):
    """The jail binds the spare's directories; after `adopt` renames them, what it writes lands in the conversation's
    directories and it sees the conversation's files."""
    if not bwrap_path():
        pytest.skip("bwrap is not available")
    workspaces = Workspaces(str(tmp_path / "work"))
    spare = workspaces.new_spare()
    script = ("touch /home/codebuddy/started; while [ ! -e /workspace/go ]; do sleep 0.02; done; "
              "ls /workspace > /tmp/seen; mv /tmp/seen /workspace; "
              "echo home > /home/codebuddy/written")
    argv, cwd = Bubblewrap("/bin/sh", bwrap=bwrap_path()).command(["/bin/sh", "-c", script], spare)
    jail = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={"PATH": os.defpath})
    try:
        poll_until(lambda: os.path.exists(os.path.join(spare.home, "started")), 30, 0.02,
                   lambda: f"the jail did not start: {jail.poll()}")  # its mounts are made
        conversation = workspaces.dirs_for("chat-b")
        Path(conversation.workspace, "attached.txt").write_text("x")
        workspaces.adopt("chat-b", spare)
        Path(conversation.workspace, "go").write_text("")
        assert jail.wait(timeout=30) == 0, jail.stderr.read()
    finally:
        jail.kill()
        jail.wait()
    assert Path(conversation.workspace, "seen").read_text().split() == ["attached.txt", "go"]
    assert Path(conversation.home, "written").read_text() == "home\n"


def test_sessions_and_what_a_cli_reads_at_start(tmp_path):
    workspaces = Workspaces(str(tmp_path / "work"))
    dirs = workspaces.dirs_for("chat-c")
    assert not has_cli_session(workspaces, "chat-c", "s1", dirs)
    record_cli_session(workspaces, "chat-c", "s1", "spare-cli")
    assert has_cli_session(workspaces, "chat-c", "s1", dirs) and cli_session(workspaces, "chat-c", "s1") == "spare-cli"
    assert cli_session(workspaces, "chat-c", "s2") == "s2" and has_cli_session(workspaces, "chat-c", "s2", dirs)
    Path(dirs.home, ".codebuddy", "projects", "workspace").mkdir(parents=True)
    Path(dirs.home, ".codebuddy", "projects", "workspace", "s3.jsonl").write_text("{}")  # from before spares
    assert has_cli_session(workspaces, "chat-c", "s3", dirs)

    for name in ("projects", "sessions", "file-history", "plugins"):
        Path(dirs.home, ".codebuddy", name).mkdir(parents=True, exist_ok=True)
    Path(dirs.workspace, "notes.md").write_text("")
    assert startup_files(dirs) == []
    Path(dirs.home, ".codebuddy", "plugins", "p").mkdir()
    Path(dirs.home, ".codebuddy", "settings.json").write_text("{}")
    Path(dirs.workspace, "CODEBUDDY.md").write_text("")
    assert sorted(startup_files(dirs)) == ["CODEBUDDY.md", "~/.codebuddy/plugins", "~/.codebuddy/settings.json"]


def test_memory_available_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:    1024 kB\n")
    assert memory_available(str(meminfo)) == 1024 * 1024
    assert memory_available(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- the keeper

def test_the_keeper_starts_spares_up_to_its_count_and_replaces_old_ones(tmp_path):
    clock = Clock()
    keeper, pool, started = keeper_of(tmp_path, clock, count=2)
    assert keeper.tend() == 2 and keeper.tend() == 0 and pool.spare_count() == 2
    first_dirs = [dirs for _process, dirs in started]
    assert len({dirs.workspace for dirs in first_dirs}) == 2
    clock.now += 601
    assert keeper.tend() == 2 and [p.stopped for p, _ in started] == [True, True, False, False]
    assert not any(os.path.exists(dirs.workspace) for dirs in first_dirs)  # an ended spare's directories go


def test_no_spare_starts_while_memory_is_short_and_a_failed_start_waits_before_the_next(tmp_path):
    clock = Clock()
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemAvailable:  102400 kB\n")  # 100 MB
    keeper, pool, started = keeper_of(tmp_path, clock, floor=200 << 20, meminfo=str(meminfo))
    assert keeper.tend() == 0 and started == []
    meminfo.write_text("MemAvailable:  409600 kB\n")
    assert keeper.tend() == 1
    meminfo.write_text("MemAvailable:  102400 kB\n")
    assert keeper.tend() == 0 and pool.spare_count() == 0 and started[0][0].stopped  # short again: ended

    failing, pool, started = keeper_of(tmp_path / "failing", clock, ready="the CLI exited at start")
    assert failing.tend() == 0 and len(started) == 1 and started[0][0].stopped
    assert pool.stats()["live"] == 0 and pool.reserve_spare(1)  # its slot was given back
    pool.spare_ready(None)
    clock.now += RETRY_SECONDS - 1
    assert failing.tend() == 0 and len(started) == 1
    clock.now += 2
    assert failing.tend() == 0 and len(started) == 2


def test_a_new_conversation_adopts_a_spare_but_an_existing_session_or_start_time_settings_do_not(tmp_path):
    clock = Clock()
    keeper, pool, started = keeper_of(tmp_path, clock)
    workspaces = keeper.workspaces
    assert keeper.adopt("chat-a", "s-a") is None  # none ready yet
    keeper.tend()
    [(spare, spare_dirs)] = started
    Path(workspaces.dirs_for("chat-a").workspace, "attached.txt").write_text("x")
    process = keeper.adopt("chat-a", "s-a")
    assert process is spare and process.conversation == "chat-a" and process.session_id == "s-a"
    assert cli_session(workspaces, "chat-a", "s-a") == spare.cli_session != "s-a"
    assert not os.path.exists(spare_dirs.workspace)
    assert os.listdir(workspaces.dirs_for("chat-a").workspace) == ["attached.txt"]
    keeper.ended(process)  # an adopted process ends: the conversation's directories stay
    assert os.path.exists(workspaces.dirs_for("chat-a").workspace)

    keeper.tend()
    assert keeper.adopt("chat-a", "s-a") is None  # the session exists: a process resumes it
    Path(workspaces.dirs_for("chat-b").workspace, "AGENTS.md").write_text("")
    assert keeper.adopt("chat-b", "s-b") is None
    assert keeper.adopt("chat-c", "s-c") is started[1][0]  # /new in chat-a would be the same: a new session id
    assert json.loads(Path(workspaces.base_for("chat-c"), "cli-sessions.json").read_text()) == {
        "s-c": started[1][0].cli_session}


def test_after_an_adoption_the_next_spare_starts_once_the_adopted_turn_is_over(tmp_path):
    clock = Clock()
    keeper, pool, started = keeper_of(tmp_path, clock)
    second = threading.Event()
    start = keeper._start
    keeper._start = lambda dirs, cli: (second.set() if started else None, start(dirs, cli))[1]
    keeper.start()
    try:
        poll_until(lambda: pool.spare_count() == 1, 10, 0.01, lambda: "no spare")
        process = keeper.adopt("chat-a", "s-a")
        assert process is not None
        assert not second.wait(0.5)  # its first turn runs: no CLI start beside it
        pool.give_back(process, keep=True)
        assert second.wait(REFILL_AFTER - 1)  # the turn is over: the next spare starts
    finally:
        keeper.stop()


# ---------------------------------------------------------------- through the client, the fake CLI in its jail

def test_the_client_answers_a_first_prompt_in_a_spare_and_resumes_its_session_after_eviction(tmp_path):
    """SPARE_SESSIONS=1 with the fake CLI in bwrap: the first prompt runs in the spare (its run tag), a new spare
    follows, an evicted conversation resumes the spare's session, /new and another chat take spares of their own."""
    if not bwrap_path():
        pytest.skip("bwrap is not available")
    from codebuddy_client import CodeBuddyClient

    wrapper = tmp_path / "bin" / "codebuddy"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {os.path.realpath(sys.executable)} {FAKE_CLI} "$@"\n')
    wrapper.chmod(0o755)
    sandbox = Bubblewrap(str(wrapper), bwrap=bwrap_path(), read_only=[os.path.realpath(sys.base_prefix),
                                                                      str(FAKE_CLI.parent)])
    client = CodeBuddyClient(str(wrapper), str(tmp_path / "work"), env={"PATH": os.defpath}, sandbox=sandbox,
                             warm_sessions=2, spare_sessions=1, timeout=30)
    runs = lambda: [json.loads(line) for path in sorted((tmp_path / "work").rglob("runs.jsonl"))  # noqa: E731
                    for line in path.read_text().splitlines()]
    try:
        client.start()
        poll_until(lambda: client.pool.spare_count() == 1, 30, 0.05, lambda: "no spare")
        [spare] = client.pool.processes()
        first = client.run("第一问 [outbox=a.txt:5]", conversation="chat-a", session_id="s-a")
        assert first.ok and "回答: 第一问" in first.text
        assert [run["run_tag"] for run in runs()] == [spare.tag]
        assert client.warm_stats()["adopted"] == 1
        poll_until(lambda: client.pool.spare_count() == 1, 30, 0.05, lambda: "no new spare after the adoption")
        assert client.pool.reap_idle(now=time.monotonic() + 3600) == 1  # chat-a's process ends; spares stay
        again = client.run("第二问", conversation="chat-a", session_id="s-a")
        assert "(turn 2, earlier: 第一问" in again.text  # a new process, on the spare's CLI session
        assert runs()[-1]["session"] == spare.cli_session and runs()[-1]["run_tag"] != spare.tag

        poll_until(lambda: client.pool.spare_count() == 1, 30, 0.05, lambda: "no spare for /new")
        fresh = client.run("新会话", conversation="chat-a", session_id="s-a2")
        assert "(turn 1" in fresh.text and runs()[-1]["session"] not in ("s-a2", spare.cli_session)
        assert Path(client.workspaces.dirs_for("chat-a").workspace, "outbox", "a.txt").exists()  # kept across /new
        poll_until(lambda: client.pool.spare_count() == 1, 30, 0.05, lambda: "no spare for chat-b")
        other = client.run("别的会话", conversation="chat-b", session_id="s-b")
        assert "(turn 1" in other.text
        assert os.listdir(client.workspaces.dirs_for("chat-b").workspace) == []
        assert len({run["run_tag"] for run in runs()}) == 4 and len({run["session"] for run in runs()}) == 3
    finally:
        client.close()
    assert client.pool.processes() == [] and os.listdir(client.workspaces.spares_root) == []
