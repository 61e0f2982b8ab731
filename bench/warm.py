"""Benchmark of warm CLI processes: follow-up latency and CLI CPU per answer, cold vs warm, with the REAL CodeBuddy
CLI (from the codebuddy-agent-sdk wheel) in its bubblewrap sandbox, against the loopback model server of the tests,
which answers at once. Run through `bench/run.py` (step `warm`), or alone: `.venv/bin/python bench/warm.py`.

Cold: `WARM_SESSIONS=0`, every follow-up in a new CLI process that resumes the session from disk (what every
message cost before warm processes). Warm: `WARM_SESSIONS=4`, one process answers the conversation's follow-ups.
Both go through `CodeBuddyClient.run`, the bot's own code path, one conversation each, the same prompts.
CLI CPU: utime+stime of the CLI's process tree in /proc (the sandbox's processes included): cold, the whole new
process after its one answer (its start and the turn); warm, the tree's growth over the follow-ups, per follow-up.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codebuddy import process_tree  # noqa: E402
from codebuddy.cli_setup import wheel_cli  # noqa: E402
from codebuddy.sandbox import Bubblewrap  # noqa: E402
from codebuddy_client import CodeBuddyClient, new_session_id, sandbox_from_config  # noqa: E402
from config import load_config  # noqa: E402
from tests.fake_model_server import FakeModelServer  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class WarmCost:
    cold_latency: list[float]  # seconds per follow-up
    warm_latency: list[float]
    cold_cpu: list[float]  # CLI CPU seconds per follow-up
    warm_cpu: list[float]
    warm_rss: int  # bytes of the warm process tree after the follow-ups
    cli: str


def _tree_cpu(pid: int) -> float:
    total = 0.0
    for member in [pid, *process_tree.descendants(pid)]:
        try:
            with open(f"/proc/{member}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            continue
    return total


def _client(workdir: Path, model_url: str, warm: int, wall: bool = True) -> CodeBuddyClient:
    """The bot's client for the real CLI. `wall`: the sandbox `sandbox_from_config` builds (a network namespace per
    process behind the egress proxy, the run limits); else the same jail with `network=None, limits=None`."""
    binary = wheel_cli()
    if not binary:
        raise RuntimeError("the codebuddy-agent-sdk wheel (with its CLI) is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    # The model endpoint in a .env, as an operator sets it: the egress policy allows it from there.
    dotenv = workdir / ".env"
    dotenv.write_text(f"CODEBUDDY_BASE_URL={model_url}\n")
    config = load_config({"DINGTALK_CLIENT_ID": "bench", "DINGTALK_CLIENT_SECRET": "bench", "CODEBUDDY_BIN": binary,
                          "CODEBUDDY_WORKDIR": str(workdir), "CODEBUDDY_PERMISSION_MODE": "bypassPermissions",
                          "TASK_DB": str(workdir / "tasks.db"), "LOG_FILE": "", "WARM_SESSIONS": str(warm)},
                         dotenv_path=dotenv)
    env = {"PATH": os.environ.get("PATH", os.defpath), "CODEBUDDY_BASE_URL": model_url,
           "CODEBUDDY_API_KEY": "bench-key", "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1",
           "CODEBUDDY_SKIP_BUILTIN_MARKETPLACE": "1"}
    sandbox = sandbox_from_config(config)
    if not wall:
        sandbox = Bubblewrap(sandbox.cli_binary, hidden=sandbox.hidden, read_only=sandbox.read_only,
                             bwrap=sandbox.bwrap, network=None, limits=None)
    return CodeBuddyClient(binary, str(workdir), permission_mode="bypassPermissions", env=env,
                           sandbox=sandbox, warm_sessions=warm, timeout=120)


def warm_cost(workdir: Path, cold_runs: int = 6, warm_runs: int = 20) -> WarmCost:
    """Follow-ups in one conversation: `cold_runs` each in a new process, `warm_runs` in one warm process."""
    with FakeModelServer() as model:
        # Cold: the conversation's process is ended before each follow-up, as WARM_SESSIONS=0 does after each
        # answer; measured after the answer, before it ends (a killed jail's CPU never reaches RUSAGE_CHILDREN).
        cold = _client(workdir / "cold", model.base_url, warm=4)
        session = new_session_id()
        first = cold.run("第一轮", conversation="bench-cold", session_id=session)
        if not first.ok:
            raise RuntimeError(f"the real CLI did not answer: {first.error}")
        cold_latency, cold_cpu = [], []
        for number in range(cold_runs):
            cold.close()
            time.sleep(0.3)
            start = time.perf_counter()
            result = cold.run(f"冷启动追问 {number}", conversation="bench-cold", session_id=session)
            cold_latency.append(time.perf_counter() - start)
            assert result.ok, result.error
            [fresh] = cold.pool.processes()
            cold_cpu.append(_tree_cpu(fresh.pid))
        cold.close()

        warm = _client(workdir / "warm", model.base_url, warm=4)
        session = new_session_id()
        assert warm.run("第一轮", conversation="bench-warm", session_id=session).ok
        [process] = warm.pool.processes()
        warm_latency = []
        cpu_before = _tree_cpu(process.pid)
        for number in range(warm_runs):
            time.sleep(0.3)  # a person's follow-up comes later than the CLI's quiet period after an answer
            start = time.perf_counter()
            result = warm.run(f"热进程追问 {number}", conversation="bench-warm", session_id=session)
            warm_latency.append(time.perf_counter() - start)
            assert result.ok, result.error
        assert warm.pool.processes() == [process], "the follow-ups did not all go to the warm process"
        warm_cpu_total = _tree_cpu(process.pid) - cpu_before
        rss = process.rss_bytes()
        warm.close()
    return WarmCost(cold_latency, warm_latency, cold_cpu, [warm_cpu_total / warm_runs] * warm_runs, rss,
                    os.path.basename(wheel_cli()))


def rows(cost: WarmCost) -> list[tuple[str, str, str, str, str, str]]:
    """(figure, bot = warm, baseline = cold, ratio, target, met) rows for BENCHMARKS.md."""
    warm50, cold50 = statistics.median(cost.warm_latency), statistics.median(cost.cold_latency)
    cpu_warm, cpu_cold = statistics.median(cost.warm_cpu), statistics.median(cost.cold_cpu)
    ratio, cpu_ratio = warm50 / cold50, cpu_warm / cpu_cold
    ok = ratio <= 0.25 and warm50 <= 0.4
    return [
        (f"follow-up latency p50, real CLI, loopback model (warm: {len(cost.warm_latency)} in one process; "
         f"cold: {len(cost.cold_latency)}, a new process each)", f"{warm50 * 1000:.0f} ms",
         f"{cold50 * 1000:.0f} ms (cold)", f"{ratio:.2f}", "≤ 0.25 and ≤ 400 ms", "yes" if ok else "**no**"),
        ("  follow-up latency max", f"{max(cost.warm_latency) * 1000:.0f} ms",
         f"{max(cost.cold_latency) * 1000:.0f} ms", "", "", "—"),
        ("CLI CPU s per answer (sandbox included)", f"{cpu_warm:.2f}", f"{cpu_cold:.2f} (cold)", f"{cpu_ratio:.2f}",
         "≤ 0.25", "yes" if cpu_ratio <= 0.25 else "**no**"),
        ("RSS of one warm CLI process (its tree)", f"{cost.warm_rss / 2**20:.0f} MB", "", "", "", "—"),
    ]


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="bench-warm-") as scratch:
        measured = warm_cost(Path(scratch))
    for row in rows(measured):
        print(" | ".join(row))
