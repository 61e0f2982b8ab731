#!/usr/bin/env python3
"""Benchmark of several bot processes on one app (issue 16): throughput with 1, 2 and 3 processes sharing one
PostgreSQL task DB (instant CLI; ratio to 1 process, measured in the same run), failover time (SIGKILL of the
process running a task → the task re-started on another), and the latency of a cross-host cancel (`/cancel` sent to
the process not running the task; ratio to the same cancel sent to the process running it, in the same run).

A throwaway PostgreSQL (tests/pg_fixture.py), the local DingTalk stand-in pushing each message to a random one of
the processes' Stream connections, `python bot.py` subprocesses running bench/instant_cli.sh in their sandbox.
Run from the repository root (not part of the test run):

    .venv/bin/python bench/cluster.py [--tasks 600] [--lease 5] [--cancels 10]

Prints a Markdown table (pasted into BENCHMARKS.md by hand).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from run import SUBJECT_VARIABLE, busy_runs  # noqa: E402  (bench/run.py: finding a [busy] run's processes)

from tests.conftest import process_alive  # noqa: E402
from tests.pg_fixture import PostgresServer, pg_binaries  # noqa: E402
from tests.standin import DingTalkStandin  # noqa: E402

CLIENT_ID, CLIENT_SECRET = "bench-client-id", "bench-client-secret"
INSTANT_CLI = ROOT / "bench" / "instant_cli.sh"


def start_bots(standin: DingTalkStandin, workdir: Path, url: str, count: int, **settings: str) -> list:
    bots = []
    for number in range(count):
        home = workdir / f"host{number}"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
        env.update({"NO_PROXY": "127.0.0.1,localhost", "HOME": str(home), "PYTHONUNBUFFERED": "1",
                    "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
                    "DINGTALK_OPENAPI_ENDPOINT": standin.base_url, "CODEBUDDY_BIN": str(INSTANT_CLI),
                    "CODEBUDDY_WORKDIR": str(home / "workspace"), "LOG_FILE": str(home / "bot.log"),
                    "TASK_DB": url, "HOST_NAME": f"host{number}", "SHUTDOWN_GRACE": "1",
                    "USER_RATE_LIMIT": "1000000", **settings})
        before = standin.stream_connects
        with open(home / "bot.out", "ab") as out:
            bots.append(subprocess.Popen([sys.executable, str(ROOT / "bot.py")], cwd=home, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        standin.wait_connected(timeout=60, connects_at_least=before + 1)
    return bots


def stop(bots: list) -> None:
    for bot in bots:
        if bot.poll() is None:
            bot.send_signal(signal.SIGTERM)
    for bot in bots:
        try:
            bot.wait(timeout=20)
        except subprocess.TimeoutExpired:
            bot.kill()
            bot.wait()


def answered(standin: DingTalkStandin, session: str) -> bool:
    return any((p.text or "").startswith("done: ") for p in standin.webhook_posts(session))


def throughput(task_db: str, workdir: Path, processes: int, tasks: int, users: int, window: int) -> float:
    """Tasks answered per second with `processes` bots on `task_db`, `window` prompts in flight from `users` users."""
    standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    standin.start()
    standin.several_connections = True
    bots = start_bots(standin, workdir / f"tp{processes}-{uuid.uuid4().hex[:6]}", task_db, processes)
    try:
        pending: dict[int, str] = {}
        done, sent, started = 0, 0, time.monotonic()
        while done < tasks:
            while sent < tasks and len(pending) < window:
                pending[sent] = standin.send_bot_message(f"bench-{sent}", sender_staff_id=f"u{sent % users}").session
                sent += 1
            for number, session in list(pending.items()):
                if answered(standin, session):
                    del pending[number]
                    done += 1
            time.sleep(0.01)
        return tasks / (time.monotonic() - started)
    finally:
        stop(bots)
        standin.stop()


def failover(server: PostgresServer, workdir: Path, lease: float) -> float:
    """Seconds from SIGKILL of the process running a task to the task running on the other process."""
    standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    standin.start()
    standin.several_connections = True
    url = server.create_database()
    bots = start_bots(standin, workdir / "failover", url, 2, LEASE_SECONDS=str(lease))
    try:
        first = standin.live_connections()[0]
        standin.send_bot_message("failover [busy]", sender_staff_id="victim", connection_id=first)
        with psycopg.connect(url, autocommit=True) as conn:
            query = "SELECT host, attempts FROM tasks WHERE status = 'running'"
            while not conn.execute(query).fetchall():
                time.sleep(0.01)
            killed = time.monotonic()
            bots[0].kill()
            while conn.execute(query + " AND host = 'host1'").fetchall() == []:
                time.sleep(0.01)
            return time.monotonic() - killed
    finally:
        stop(bots)  # host1 stops its [busy] run; host0's died with it (bwrap --die-with-parent)
        standin.stop()


def cancel_latency(server: PostgresServer, workdir: Path, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Two processes; a `[busy]` task runs on the first; `/cancel <id>` goes to the first (in-host) or to the second
    (cross-host: a DB update and NOTIFY bot_cancel reach the first). Per kind, seconds from the /cancel frame sent
    to the run's tool gone ("stopped") and to "已取消任务 <id>" arriving at the stand-in ("confirmed"; in-host it is
    the reply to the /cancel; cross-host, since cluster3, the host that stopped it answers through the /cancel
    message's own session webhook too). Rounds alternate the two kinds after one unmeasured round of each."""
    standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    standin.start()
    standin.several_connections = True
    url = server.create_database()
    marker = f"cancel-{uuid.uuid4().hex[:8]}"
    bots = start_bots(standin, workdir / "cancel", url, 2, **{SUBJECT_VARIABLE: marker})
    latencies: dict[str, dict[str, list[float]]] = {kind: {"stopped": [], "confirmed": []}
                                                   for kind in ("in-host", "cross-host")}
    try:
        for number in range(2):  # a NOTIFY reaches only a host already listening
            log = workdir / "cancel" / f"host{number}" / "bot.log"
            wait_until(lambda log=log: log.exists() and "集群通知已监听" in log.read_text(encoding="utf-8"),
                       f"host{number} to listen")
        holder, other = standin.live_connections()[:2]
        with psycopg.connect(url, autocommit=True) as conn:
            for number in range(-2, 2 * rounds):
                kind = "in-host" if number % 2 == 0 else "cross-host"
                user = f"canceller{number + 2}"  # a new conversation each round: it stays on the holder
                before = len(busy_runs(marker))
                standin.send_bot_message(f"bench cancel [busy] {number}", sender_staff_id=user,
                                         connection_id=holder)
                wait_until(lambda b=before: len(busy_runs(marker)) > b, "a busy run")
                sleeper = busy_runs(marker)[-1][1]
                task_id = conn.execute("SELECT id FROM tasks WHERE user_id = %s AND status = 'running'",
                                       (user,)).fetchone()[0]
                sent = standin.send_bot_message(f"/cancel {task_id}", sender_staff_id=user,
                                                connection_id=holder if kind == "in-host" else other)
                while process_alive(sleeper):
                    time.sleep(0.002)
                stopped = time.monotonic() - sent.sent_at
                confirmation = wait_until(lambda t=task_id: confirmations(standin, t), "the cancel confirmation")
                if number >= 0:
                    latencies[kind]["stopped"].append(stopped)
                    latencies[kind]["confirmed"].append(confirmation[0].time - sent.sent_at)
        return latencies
    finally:
        stop(bots)
        standin.stop()


def confirmations(standin: DingTalkStandin, task_id: str) -> list:
    """The requests that told the user "已取消任务 <id>" (a session-webhook reply or a push)."""
    wanted = f"已取消任务 {task_id}"
    return [r for r in [*standin.webhook_posts(), *standin.batch_sends()]
            if (r.text or "").startswith(wanted) or (r.msg_param or {}).get("content", "").startswith(wanted)]


def wait_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=600, help="prompts per throughput run (600)")
    parser.add_argument("--users", type=int, default=200, help="distinct users, each its own 1:1 chat (200)")
    parser.add_argument("--window", type=int, default=60, help="prompts in flight (60)")
    parser.add_argument("--lease", type=float, default=5.0, help="LEASE_SECONDS of the failover run (5)")
    parser.add_argument("--cancels", type=int, default=10, help="measured cancels of each kind (10)")
    args = parser.parse_args(argv)
    bindir = pg_binaries()
    if bindir is None:
        print("PostgreSQL not found: apt-get install postgresql", file=sys.stderr)
        return 1
    load_before = os.getloadavg()[0]
    server = PostgresServer(bindir)
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        sqlite = throughput(str(workdir / "tasks.db"), workdir, 1, args.tasks, args.users, args.window)
        rates = {n: throughput(server.create_database(), workdir, n, args.tasks, args.users, args.window)
                 for n in (1, 2, 3)}
        moved = failover(server, workdir, args.lease)
        cancels = cancel_latency(server, workdir, args.cancels)
    finally:
        server.stop()
    print("| figure | value | ratio to 1 process |\n|---|---|---|")
    print(f"| throughput, 1 process, SQLite task DB ({args.tasks} tasks, instant CLI) | {sqlite:.0f} tasks/s | "
          f"{sqlite / rates[1]:.2f} |")
    for n, rate in rates.items():
        print(f"| throughput, {n} process{'es' if n > 1 else ''} ({args.tasks} tasks, instant CLI) | "
              f"{rate:.0f} tasks/s | {rate / rates[1]:.2f} |")
    print(f"| failover: SIGKILL → the task running on the other process (LEASE_SECONDS={args.lease:g}) | "
          f"{moved:.2f} s | |")
    print(f"\n| cancel, median of {args.cancels} | in-host | cross-host | ratio cross-host / in-host |")
    print("|---|---|---|---|")
    for step, what in (("stopped", "/cancel sent → the run's tool gone"),
                       ("confirmed", "/cancel sent → \"已取消任务\" at the stand-in")):
        here, there = (statistics.median(cancels[kind][step]) for kind in ("in-host", "cross-host"))
        print(f"| {what} | {here * 1000:.0f} ms | {there * 1000:.0f} ms | {there / here:.2f} |")
    print(f"\nload average (1 min): {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
