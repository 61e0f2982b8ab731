#!/usr/bin/env python3
"""Benchmark of several bot processes on one app (issue 16): throughput with 1, 2 and 3 processes sharing one
PostgreSQL task DB (instant CLI; ratio to 1 process, measured in the same run), and failover time (SIGKILL of the
process running a task → the task re-started on another).

A throwaway PostgreSQL (tests/pg_fixture.py), the local DingTalk stand-in pushing each message to a random one of
the processes' Stream connections, `python bot.py` subprocesses running bench/instant_cli.sh in their sandbox.
Run from the repository root (not part of the test run):

    .venv/bin/python bench/cluster.py [--tasks 600] [--lease 5]

Prints a Markdown table (pasted into BENCHMARKS.md by hand).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=600, help="prompts per throughput run (600)")
    parser.add_argument("--users", type=int, default=200, help="distinct users, each its own 1:1 chat (200)")
    parser.add_argument("--window", type=int, default=60, help="prompts in flight (60)")
    parser.add_argument("--lease", type=float, default=5.0, help="LEASE_SECONDS of the failover run (5)")
    args = parser.parse_args(argv)
    bindir = pg_binaries()
    if bindir is None:
        print("PostgreSQL not found: apt-get install postgresql", file=sys.stderr)
        return 1
    server = PostgresServer(bindir)
    server.start()
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        sqlite = throughput(str(workdir / "tasks.db"), workdir, 1, args.tasks, args.users, args.window)
        rates = {n: throughput(server.create_database(), workdir, n, args.tasks, args.users, args.window)
                 for n in (1, 2, 3)}
        moved = failover(server, workdir, args.lease)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
