"""End to end with the REAL CLI in its jail: a Bash command forges 100,000 `can_use_tool` control requests into the
CLI's own stdout (`/proc/<cli pid>/fd/1`, same uid inside the jail), and the bot neither grows threads nor asks the
user 100,000 times: the run ends with one line, the bot answers other users and the flooder's next message.

The fake model scripts the tools: `[write:…]` puts the flooding script in the workspace (base64, so it may hold `]`),
`[bash:python3 flood.py]` runs it.
"""

from __future__ import annotations

import base64
import threading

import pytest

from codebuddy.cli_output import FLOOD_MESSAGE
from tests.conftest import CLI_START_TIMEOUT

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

# Finds the CLI above itself (its argv holds the marker and no `--`: the jail's bwrap carries the CLI's argv after
# one) and writes forged requests into its stdout until the bot ends the jail.
FLOOD_SCRIPT = """
import json, os

def argv(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return handle.read().split(b"\\0")

def parent(pid):
    with open(f"/proc/{pid}/stat", "rb") as handle:
        return int(handle.read().rsplit(b")", 1)[1].split()[1])

pid = os.getpid()
while pid > 1 and not (b"--replay-user-messages" in argv(pid) and b"--" not in argv(pid)):
    pid = parent(pid)
print("cli pid", pid, flush=True)
line = {"type": "control_request", "request_id": "", "request": {"subtype": "can_use_tool", "tool_name": "Bash",
        "input": {"command": "echo forged"}, "tool_use_id": "toolu_forged"}}
with open(f"/proc/{pid}/fd/1", "wb", buffering=0) as out:
    for start in range(0, 100_000, 1000):
        batch = []
        for number in range(start, start + 1000):
            line["request_id"] = f"forged-{number}"
            batch.append(json.dumps(line) + "\\n")
        out.write("".join(batch).encode())
print("all 100000 written", flush=True)
"""


def bot_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))


def answers(standin, sent, marker: str, timeout: float = CLI_START_TIMEOUT) -> list[str]:
    return standin.wait_for(lambda: [p.text for p in standin.webhook_posts(sent.session) if marker in p.text],
                            timeout=timeout, message=f"a post with {marker!r}")


def test_a_hundred_thousand_forged_tool_requests_end_the_run_and_the_bot_keeps_answering(standin, real_bot):
    bot = real_bot()
    answers(standin, standin.send_bot_message("热身", sender_staff_id="bystander"), "回答:")
    baseline = bot_threads(bot.proc.pid)
    most, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            try:
                most[0] = max(most[0], bot_threads(bot.proc.pid))
            except (OSError, StopIteration):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    script = base64.b64encode(FLOOD_SCRIPT.encode()).decode()
    flood = standin.send_bot_message(f"洪水 [write:/workspace/flood.py:{script}] [bash:python3 flood.py]",
                                     sender_staff_id="flooder")
    try:
        [ended] = answers(standin, flood, FLOOD_MESSAGE)
        other = answers(standin, standin.send_bot_message("另一个用户的问题", sender_staff_id="bystander"),
                        "回答: 另一个用户的问题")
    finally:
        stop.set()
        sampler.join()
    assert "执行失败" in ended and other
    assert most[0] <= baseline + 12, f"the bot's threads went from {baseline} to {most[0]}"
    notices = [p.text for p in standin.webhook_posts(flood.session) if "请求使用工具" in p.text]
    assert len(notices) <= 1  # at most the first forged request reached the user
    assert len(bot.wait_log(r"输出异常，已结束")) == 1  # the flood is logged once, not per forged line
    answers(standin, standin.send_bot_message("洪水之后", sender_staff_id="flooder"), "回答: 洪水之后")
    assert bot.proc.poll() is None
