"""Benchmark of spare CLI processes (issue 27): a new conversation's first message through the bot, spares on against
off in the same run, the follow-up in the same conversation, and what a spare costs.

Two `bot.py` processes, each against its own DingTalk stand-in (tests/standin.py), run the REAL CodeBuddy CLI (the
codebuddy-agent-sdk wheel's) in its jail, as in production (bwrap, its own network namespace behind the egress proxy,
the run limits), against the loopback model server of the tests, which answers at once: one with SPARE_SESSIONS=1,
one with SPARE_SESSIONS=0; otherwise the same settings (WARM_SESSIONS large enough that no conversation is evicted).
Each round, in alternating order, sends each bot a first message from a new user, then two follow-ups from the same
user: one 0.3 s after the first answer (on the spares bot the next spare is starting then: the worst case), and one
6 s after the first answer, once that spare is ready and settled (a person reading the answer first; both bots wait
as long, so that their processes have idled alike). A latency is "frame sent by the stand-in → the answer's webhook
post arriving there". Before each first message the spares bot has a spare ready and settled (new conversations are
not seconds apart). Settled: the spare's tree used less than 20 ms of CPU in 0.5 s (a CLI goes on working for about
a second after it answered `initialize`).

A spare's cost: the resident memory of its process tree (bwrap and the CLI) when it is ready, and the CPU it took to
get there, read from /proc before it is adopted.

    .venv/bin/python bench/spares.py [--rounds 8]      # or through bench/run.py, step `spares`
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from warm import _tree_cpu  # noqa: E402

from codebuddy import process_tree  # noqa: E402
from codebuddy.cli_setup import wheel_cli  # noqa: E402
from tests.fake_model_server import FakeModelServer  # noqa: E402
from tests.standin import DingTalkStandin  # noqa: E402

CLIENT_ID, CLIENT_SECRET = "bench-spares-id", "bench-spares-secret"
SPARE_READY = re.compile(r"备用 CodeBuddy 进程 (\d+) 已就绪")
ADOPTED = re.compile(r"备用 CodeBuddy 进程 (\d+) 接手新会话")
TIMEOUT = 120.0
FOLLOW_UP_AFTER = 6.0  # seconds from the first answer to the later follow-up (longer if the next spare is not settled)


@dataclass
class SpareCost:
    first_on: list[float] = field(default_factory=list)  # seconds, first message of a new conversation
    first_off: list[float] = field(default_factory=list)
    follow_on: list[float] = field(default_factory=list)  # seconds, its follow-up once the next spare has settled
    follow_off: list[float] = field(default_factory=list)
    quick_on: list[float] = field(default_factory=list)  # seconds, a follow-up 0.3 s after the first answer
    quick_off: list[float] = field(default_factory=list)
    spare_rss: list[int] = field(default_factory=list)  # bytes of a ready spare's tree
    spare_cpu: list[float] = field(default_factory=list)  # CPU seconds a spare took to get ready
    refill: list[float] = field(default_factory=list)  # seconds from the first answer to the next spare ready (at most)
    adopted: int = 0  # first messages the spares bot answered in a spare
    load: tuple[float, float] = (0.0, 0.0)  # load average before and after


class Bot:
    """`python bot.py` with the real CLI, against a stand-in of its own."""

    def __init__(self, workdir: Path, model_url: str, **settings: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
        self.log = workdir / "bot.log"
        self.answered_at = 0.0  # when the latest answer reached the stand-in (time.monotonic)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
        env.update({
            "NO_PROXY": "127.0.0.1,localhost", "HOME": str(workdir), "PYTHONUNBUFFERED": "1",
            "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
            "DINGTALK_OPENAPI_ENDPOINT": self.standin.base_url, "CODEBUDDY_WORKDIR": str(workdir / "workspace"),
            "LOG_FILE": str(self.log), "TASK_DB": str(workdir / "tasks.db"), "SHUTDOWN_GRACE": "3",
            "CODEBUDDY_BIN": wheel_cli(), "CODEBUDDY_BASE_URL": model_url, "CODEBUDDY_API_KEY": "bench-key",
            "CODEBUDDY_PERMISSION_MODE": "bypassPermissions", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1", "CODEBUDDY_SKIP_BUILTIN_MARKETPLACE": "1",
            "CODEBUDDY_CODE_DISABLE_BACKGROUND_TASKS": "1", "CODEBUDDY_DISABLE_AUTO_MEMORY": "1",
            "USER_RATE_LIMIT": "1000", **settings,
        })
        with open(workdir / "bot.out", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "bot.py")], cwd=workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.standin.wait_connected(timeout=60)

    def log_matches(self, pattern: re.Pattern) -> list[int]:
        text = self.log.read_text(encoding="utf-8") if self.log.exists() else ""
        return [int(match) for match in pattern.findall(text)]

    def wait_spares_ready(self, count: int) -> int:
        """Wait until `count` spares have been ready in all; the pid of the latest (its jail's bwrap)."""
        return self.standin.wait_for(lambda: len(self.log_matches(SPARE_READY)) >= count
                                     and self.log_matches(SPARE_READY)[count - 1], timeout=TIMEOUT,
                                     message=f"spare #{count} ready")

    def settled_spare(self, count: int) -> tuple[int, int, float]:
        """Once the `count`-th spare is ready and has settled: (pid, RSS bytes of its tree, CPU s it has used)."""
        spare = self.wait_spares_ready(count)
        used, deadline = _tree_cpu(spare), time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            before, used = used, _tree_cpu(spare)
            if used - before < 0.02:
                break
        return spare, process_tree.rss_bytes([spare, *process_tree.descendants(spare)]), used

    def ask(self, user: str, text: str) -> float:
        """Seconds from the message frame sent to its answer (the second webhook post) at the stand-in; the answer's
        arrival (monotonic) is kept in `answered_at`."""
        sent = self.standin.send_bot_message(text, sender_staff_id=user)
        sent_at = time.monotonic()
        posts = self.standin.wait_for(lambda: len(self.standin.webhook_posts(sent.session)) >= 2
                                      and self.standin.webhook_posts(sent.session), timeout=TIMEOUT,
                                      message=f"the answer to {text!r}")
        if "回答" not in (posts[1].text or ""):
            raise RuntimeError(f"not an answer: {posts[1].text!r}")
        self.answered_at = posts[1].time
        return posts[1].time - sent_at

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.standin.stop()


def spare_cost(workdir: Path, rounds: int = 8) -> SpareCost:
    """`rounds` new conversations on each bot (after one unmeasured), alternating which bot goes first."""
    if not wheel_cli():
        raise RuntimeError("the codebuddy-agent-sdk wheel (with its CLI) is not installed")
    cost = SpareCost()
    load_before = os.getloadavg()[0]
    common = {"WARM_SESSIONS": str(rounds + 3), "MAX_WORKERS": "2"}
    with FakeModelServer() as model:
        bots = {"on": Bot(workdir / "on", model.base_url, SPARE_SESSIONS="1", **common),
                "off": Bot(workdir / "off", model.base_url, SPARE_SESSIONS="0", **common)}
        try:
            spares = 0
            for number in range(rounds + 1):
                for name in ("on", "off") if number % 2 == 0 else ("off", "on"):
                    bot = bots[name]
                    if name == "on":
                        spares += 1
                        _spare, rss, cpu = bot.settled_spare(spares)
                    user = f"{name}-user-{number}"
                    first = bot.ask(user, f"第一条消息 {number}")
                    answered = bot.answered_at
                    time.sleep(0.3)  # a follow-up comes later than the CLI's quiet period after an answer
                    quick = bot.ask(user, f"马上追问 {number}")
                    if name == "on":
                        bot.wait_spares_ready(spares + 1)  # the adopted spare's replacement
                        refill = time.monotonic() - answered  # at most: it may have been ready a moment earlier
                        bot.settled_spare(spares + 1)
                    # Both bots' processes idle as long before it.
                    time.sleep(max(0.3, answered + FOLLOW_UP_AFTER - time.monotonic()))
                    follow = bot.ask(user, f"追问 {number}")
                    if number == 0:
                        continue  # warm-up: the first CLI start of a run reads the CLI from disk
                    getattr(cost, f"first_{name}").append(first)
                    getattr(cost, f"quick_{name}").append(quick)
                    getattr(cost, f"follow_{name}").append(follow)
                    if name == "on":
                        cost.spare_rss.append(rss)
                        cost.spare_cpu.append(cpu)
                        cost.refill.append(refill)
            cost.adopted = len(bots["on"].log_matches(ADOPTED)) - 1
            if bots["off"].log_matches(ADOPTED):
                raise RuntimeError("the bot without spares adopted one")
        finally:
            for bot in bots.values():
                bot.stop()
    cost.load = (load_before, os.getloadavg()[0])
    return cost


def rows(cost: SpareCost) -> list[tuple[str, str, str, str, str, str]]:
    """(figure, bot = spares on, baseline = spares off, ratio, target, met) rows for BENCHMARKS.md."""
    on, off = statistics.median(cost.first_on), statistics.median(cost.first_off)
    follow_on, follow_off = statistics.median(cost.follow_on), statistics.median(cost.follow_off)
    quick_on, quick_off = statistics.median(cost.quick_on), statistics.median(cost.quick_off)
    ok = on <= 0.6 and on / off <= 0.3
    n = len(cost.first_on)
    return [
        (f"first message of a new conversation through the bot, p50 of {n}; real CLI, loopback model; bot = "
         f"SPARE_SESSIONS=1 ({cost.adopted} of {n} answered by a spare), baseline = 0", f"{on * 1000:.0f} ms",
         f"{off * 1000:.0f} ms", f"{on / off:.2f}", "≤ 600 ms and ≤ 0.3", "yes" if ok else "**no**"),
        ("  first message max", f"{max(cost.first_on) * 1000:.0f} ms", f"{max(cost.first_off) * 1000:.0f} ms",
         "", "", "—"),
        (f"  its follow-up, p50 of {n} (the next spare ready and settled)", f"{follow_on * 1000:.0f} ms",
         f"{follow_off * 1000:.0f} ms", f"{follow_on / follow_off:.2f}", "unchanged (≈ 1)", "—"),
        (f"  a follow-up 0.3 s after the first answer, p50 of {n} (the next spare starting)",
         f"{quick_on * 1000:.0f} ms", f"{quick_off * 1000:.0f} ms", f"{quick_on / quick_off:.2f}", "", "—"),
        (f"  the next spare ready after the first answer, p50 / max of {n} (at most)",
         f"{statistics.median(cost.refill):.1f} / {max(cost.refill):.1f} s", "", "", "a few seconds", "—"),
        ("a ready spare: RSS of its tree (bwrap + CLI), p50 / CPU s it used until settled, p50",
         f"{statistics.median(cost.spare_rss) / 2**20:.0f} MB / {statistics.median(cost.spare_cpu):.2f} s",
         "", "", "", "—"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8, help="measured conversations per bot (default 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-spares-") as scratch:
        cost = spare_cost(Path(scratch), args.rounds)
    print(f"load average {cost.load[0]:.2f} before, {cost.load[1]:.2f} after")
    print("first on  (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.first_on))
    print("first off (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.first_off))
    print("follow on  (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.follow_on))
    print("follow off (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.follow_off))
    print("quick on  (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.quick_on))
    print("quick off (ms):", " ".join(f"{value * 1000:.0f}" for value in cost.quick_off))
    for row in rows(cost):
        print(" | ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
