"""Benchmark of the whole wall (issue 22): what a run's own network namespace behind the egress proxy, and its
limits (cgroups, rlimits, a sized /tmp), add to a jailed run. Sandboxes measured interleaved in one run: plain
(`Bubblewrap(..., network=None, limits=None)`, the jail before issue 22), + network, and + network + limits (what
`sandbox_from_config` builds by default). Not part of the test run; from the repository root (BENCHMARKS.md, "The
whole wall"):

    .venv/bin/python bench/wall.py --warm 40             # all steps (about 6 minutes on 2 cores)
    .venv/bin/python bench/wall.py --only start,download # some of start, run, download, warm

Steps:
- start: `command(["true"], dirs, run_id=…)`, Popen with `preexec_fn=preexec(…)`, wait, `release(run_id)`: the
  wall time of all of it, split into setup (command + preexec), Popen → exit (the child's cgroups, namespace and
  listeners, bwrap, `true`), and release. Each round runs the variants in a rotated order.
- run: one whole `CodeBuddyClient.run` of the instant CLI (bench/instant_cli.sh) in a new process each time
  (WARM_SESSIONS=0: start, `initialize`, the prompt, its answer, the process stopped and released).
- download: 100 MB with curl from a loopback server (127.0.0.2, allowed by CODEBUDDY_EGRESS_ALLOW): on the host,
  in the plain jail (direct, the host's network) and in the whole wall (the egress proxy, accepting on the run's
  own listener), rotated. The proxy runs in this process, as in the bot's. bench/egress.py measures the proxy's
  paths without jails or curl.
- warm: the real CLI against the loopback model (bench/warm.py), wall on (the default sandbox) and wall off
  (network=None, limits=None): cold follow-ups (a new process each) and warm ones (one process), interleaved.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import egress  # noqa: E402
import warm  # noqa: E402

from codebuddy.sandbox import Bubblewrap, Workspaces  # noqa: E402
from codebuddy_client import CodeBuddyClient, new_session_id, sandbox_from_config  # noqa: E402
from config import load_config  # noqa: E402
from tests.fake_model_server import FakeModelServer  # noqa: E402

INSTANT_CLI = ROOT / "bench" / "instant_cli.sh"
VARIANTS = ("plain", "network", "network+limits")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's children waited for so far (not a jail's inner processes:
    bwrap does not hand their times on, so this is used for the host references only)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def sandboxes(workdir: Path, allow: str = "") -> dict[str, Bubblewrap]:
    """The sandboxes for the instant CLI: the default one from the bot's Config (`allow`: CODEBUDDY_EGRESS_ALLOW),
    the same jail without its limits, and without its network too."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config({"DINGTALK_CLIENT_ID": "bench", "DINGTALK_CLIENT_SECRET": "bench",
                          "CODEBUDDY_BIN": str(INSTANT_CLI), "CODEBUDDY_WORKDIR": str(workdir / "workspace"),
                          "TASK_DB": str(workdir / "tasks.db"), "LOG_FILE": "", "CODEBUDDY_EGRESS_ALLOW": allow},
                         dotenv_path=None)

    full = sandbox_from_config(config)
    assert isinstance(full, Bubblewrap) and full.network is not None and full.limits is not None

    def without(network: bool) -> Bubblewrap:
        return Bubblewrap(full.cli_binary, hidden=full.hidden, read_only=full.read_only, bwrap=full.bwrap,
                          network=full.network if network else None, limits=None)

    return {"plain": without(network=False), "network": without(network=True), "network+limits": full}


def order(number: int) -> tuple[str, ...]:
    """The variants rotated by round, so that each goes first, second and third equally often."""
    shift = number % len(VARIANTS)
    return VARIANTS[shift:] + VARIANTS[:shift]


def start_cost(workdir: Path, rounds: int, warmup: int = 10) -> dict[str, dict[str, list[float]]]:
    """Seconds per jailed `true`: total, setup (command + preexec), Popen → exit, release; and, in the same rounds,
    `true` on the host, out of any jail."""
    boxes = sandboxes(workdir)
    dirs = Workspaces(str(workdir / "workspace")).dirs_for("wall-start")
    times: dict[str, dict[str, list[float]]] = {
        name: {"total": [], "setup": [], "process": [], "release": []} for name in VARIANTS}
    times["host: true"] = {"total": [], "cpu": []}
    for number in range(warmup + rounds):
        cpu, start = children_cpu(), time.perf_counter()
        subprocess.run(["true"], env={"PATH": os.defpath}, stdin=subprocess.DEVNULL, check=True)
        if number >= warmup:
            times["host: true"]["total"].append(time.perf_counter() - start)
            times["host: true"]["cpu"].append(children_cpu() - cpu)
        for name in order(number):
            box = boxes[name]
            run_id = "wall-" + uuid.uuid4().hex[:12]
            t0 = time.perf_counter()
            argv, cwd = box.command(["true"], dirs, run_id=run_id)
            preexec = box.preexec(run_id, dirs)
            t1 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=cwd, env={"PATH": os.defpath, **box.environment()},
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec)
            code = proc.wait()
            t2 = time.perf_counter()
            box.release(run_id)
            t3 = time.perf_counter()
            if code != 0:
                raise RuntimeError(f"{name}: the jailed `true` exited with {code}")
            if number >= warmup:
                for part, seconds in (("total", t3 - t0), ("setup", t1 - t0), ("process", t2 - t1),
                                      ("release", t3 - t2)):
                    times[name][part].append(seconds)
    boxes["network"].network.close()
    return times


def run_cost(workdir: Path, rounds: int, warmup: int = 5) -> dict[str, list[float]]:
    """Seconds per whole `CodeBuddyClient.run` of the instant CLI, a new process each (WARM_SESSIONS=0)."""
    boxes = sandboxes(workdir)
    clients = {name: CodeBuddyClient(str(INSTANT_CLI), str(workdir / "workspace"), env={"PATH": os.defpath},
                                     sandbox=box, warm_sessions=0, timeout=60) for name, box in boxes.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for number in range(warmup + rounds):
        for name in order(number):
            start = time.perf_counter()
            outcome = clients[name].run(f"wall bench {number}", conversation="wall-run",
                                        session_id=new_session_id())
            elapsed = time.perf_counter() - start
            if not outcome.ok:
                raise RuntimeError(f"{name} run failed: {outcome.error}")
            if number >= warmup:
                times[name].append(elapsed)
    boxes["network"].network.close()
    return times


def warm_cost(workdir: Path, cold_runs: int, warm_runs: int) -> dict[str, dict[str, list[float]]]:
    """Follow-up latency of the real CLI, wall on vs off: cold (a new process each) and warm (one process)."""
    times: dict[str, dict[str, list[float]]] = {"on": {"cold": [], "warm": []}, "off": {"cold": [], "warm": []}}
    with FakeModelServer() as model:
        clients = {"on": warm._client(workdir / "on", model.base_url, warm=4, wall=True),
                   "off": warm._client(workdir / "off", model.base_url, warm=4, wall=False)}
        assert clients["on"].sandbox.network is not None and clients["off"].sandbox.network is None
        sessions = {name: new_session_id() for name in clients}
        for name, client in clients.items():
            first = client.run("第一轮", conversation="wall-warm", session_id=sessions[name])
            if not first.ok:
                raise RuntimeError(f"wall {name}: the real CLI did not answer: {first.error}")
        for number in range(cold_runs):
            for name in (("on", "off") if number % 2 == 0 else ("off", "on")):
                clients[name].close()  # as WARM_SESSIONS=0 does after each answer
                time.sleep(0.3)
                start = time.perf_counter()
                result = clients[name].run(f"冷启动追问 {number}", conversation="wall-warm", session_id=sessions[name])
                times[name]["cold"].append(time.perf_counter() - start)
                assert result.ok, result.error
        processes = {name: client.pool.processes() for name, client in clients.items()}
        for number in range(warm_runs):
            for name in (("on", "off") if number % 2 == 0 else ("off", "on")):
                time.sleep(0.3)  # a person's follow-up comes later than the CLI's quiet period after an answer
                start = time.perf_counter()
                result = clients[name].run(f"热进程追问 {number}", conversation="wall-warm", session_id=sessions[name])
                times[name]["warm"].append(time.perf_counter() - start)
                assert result.ok, result.error
        for name, client in clients.items():
            assert client.pool.processes() == processes[name], f"wall {name}: a follow-up missed the warm process"
            client.close()
    return times


def download_cost(workdir: Path, rounds: int, megabytes: int) -> dict[str, list[float]]:
    """Seconds of curl's transfer (its time_total) of `megabytes` MB from a loopback server on 127.0.0.2 (not in the
    runs' NO_PROXY, so curl in the wall takes the proxy): on the host; in the plain jail (the host's network,
    direct); in its own network namespace (its listener → the egress proxy → server) without and with the limits
    (which run it at nice 10)."""
    workdir.mkdir(parents=True, exist_ok=True)
    payload = workdir / "payload"
    with open(payload, "wb") as handle:
        handle.write(os.urandom(megabytes * 1_000_000))
    listener = socket.create_server(("127.0.0.2", 0))
    port = listener.getsockname()[1]
    threading.Thread(target=egress.serve_file, args=(listener, str(payload)), daemon=True).start()
    boxes = sandboxes(workdir, allow=f"127.0.0.2:{port}")
    dirs = Workspaces(str(workdir / "workspace")).dirs_for("wall-download")
    curl = ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", f"http://127.0.0.2:{port}/p"]
    paths = {"host, direct": None, "plain jail, direct": boxes["plain"], "network, via the proxy": boxes["network"],
             "whole wall, via the proxy": boxes["network+limits"]}
    times: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for number in range(1 + rounds):
        for name in names[number % len(names):] + names[:number % len(names)]:
            box = paths[name]
            run_id = "wall-" + uuid.uuid4().hex[:12]
            argv, cwd, env, preexec = curl, str(workdir), {"PATH": os.defpath}, None
            if box is not None:
                argv, cwd = box.command(curl, dirs, run_id=run_id)
                env, preexec = {**env, **box.environment()}, box.preexec(run_id, dirs)
            try:
                out = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                     check=True, start_new_session=True, preexec_fn=preexec).stdout.split()
            finally:
                if box is not None:
                    box.release(run_id)
            seconds, size = float(out[0]), int(out[1])
            assert size == megabytes * 1_000_000, f"{name}: {size} bytes"
            if number >= 1:
                times[name].append(seconds)
    boxes["network"].network.close()
    listener.close()
    return times


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def report_start(times: dict[str, dict[str, list[float]]]) -> None:
    plain = statistics.median(times["plain"]["total"])
    print(f"start: jailed `true`, {len(times['plain']['total'])} rounds; ms p50 / p90 (setup, Popen → exit, "
          f"release p50); added p50 over plain")
    for name in VARIANTS:
        total, parts = times[name]["total"], times[name]
        print(f"  {name:28} {ms(statistics.median(total)):>6} / {ms(percentile(total, 90)):>6}   "
              f"({ms(statistics.median(parts['setup']))}, {ms(statistics.median(parts['process']))}, "
              f"{ms(statistics.median(parts['release']))})   "
              f"+{ms(statistics.median(total) - plain)} ms  ratio {statistics.median(total) / plain:.2f}")
    for name, parts in times.items():
        if name not in VARIANTS:
            print(f"  {name:28} {ms(statistics.median(parts['total'])):>6} / {ms(percentile(parts['total'], 90)):>6}"
                  f"   (cpu {ms(statistics.median(parts['cpu']))})")


def report_run(times: dict[str, list[float]]) -> None:
    plain = statistics.median(times["plain"])
    print(f"run: CodeBuddyClient.run of the instant CLI, a new process each, {len(times['plain'])} rounds; "
          "ms p50 / p90")
    for name in VARIANTS:
        print(f"  {name:28} {ms(statistics.median(times[name])):>6} / {ms(percentile(times[name], 90)):>6}   "
              f"+{ms(statistics.median(times[name]) - plain)} ms  ratio {statistics.median(times[name]) / plain:.2f}")


def report_warm(times: dict[str, dict[str, list[float]]]) -> None:
    print("warm: real CLI, loopback model; ms p50 / p90 / max; ratio of p50 wall on / wall off")
    for kind in ("cold", "warm"):
        for name in ("on", "off"):
            values = times[name][kind]
            print(f"  {kind} wall {name:3} ({len(values)}) {ms(statistics.median(values)):>7} / "
                  f"{ms(percentile(values, 90)):>7} / {ms(max(values)):>7}")
        ratio = statistics.median(times["on"][kind]) / statistics.median(times["off"][kind])
        print(f"  {kind} ratio on/off {ratio:.2f}")


def report_download(times: dict[str, list[float]], megabytes: int) -> None:
    direct, plain = statistics.median(times["host, direct"]), statistics.median(times["plain jail, direct"])
    print(f"download: {megabytes} MB with curl from 127.0.0.2, {len(times['host, direct'])} rounds; s p50, MB/s, "
          "throughput vs the host direct and vs the plain jail direct")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28} {median:6.3f} s {megabytes / median:7.0f} MB/s   vs host {direct / median:.2f}   "
              f"vs plain jail {plain / median:.2f}   (min {min(values):.3f}, max {max(values):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="start,run,download,warm",
                        help="comma-separated steps: start, run, download, warm")
    parser.add_argument("--rounds", type=int, default=200, help="rounds of the start and run steps")
    parser.add_argument("--cold", type=int, default=6, help="cold follow-ups per side in the warm step")
    parser.add_argument("--warm", type=int, default=30, help="warm follow-ups per side in the warm step")
    parser.add_argument("--downloads", type=int, default=21, help="rounds of the download step")
    parser.add_argument("--megabytes", type=int, default=100, help="size of each download")
    args = parser.parse_args()
    steps = {part.strip() for part in args.only.split(",") if part.strip()}
    with tempfile.TemporaryDirectory(prefix="bench-wall-") as scratch:
        for step in ("start", "run", "download", "warm"):
            if step not in steps:
                continue
            before, started = load_average(), time.monotonic()
            if step == "start":
                report_start(start_cost(Path(scratch) / "start", args.rounds))
            elif step == "run":
                report_run(run_cost(Path(scratch) / "run", args.rounds))
            elif step == "download":
                report_download(download_cost(Path(scratch) / "download", args.downloads, args.megabytes),
                                args.megabytes)
            else:
                report_warm(warm_cost(Path(scratch) / "warm", args.cold, args.warm))
            print(f"  ({time.monotonic() - started:.0f} s; load average before {before}, after {load_average()})",
                  flush=True)


if __name__ == "__main__":
    main()
