"""Security: a chat user tries to get out of the sandbox, with the REAL CodeBuddy CLI (docs/sandbox.md).

Every attack is sent as a chat message through the stand-in to `python bot.py`, which runs the real CLI from
the wheel against the fake model server. The fake model turns `[bash:…]`, `[read:…]` and `[write:PATH:BASE64]`
directives into real tool calls, one per turn, so the CLI really runs them; what each tool gave the agent comes
back to the model server, one result per call.

Each attack runs twice: in the jail (CODEBUDDY_SANDBOX=bwrap), where every probe must come back "no such file"
and nothing of the bot or of another conversation may reach the agent or the chat; and with the sandbox off
(CODEBUDDY_SANDBOX=none), where every probe must reach what it aims at. The second run proves that each probe
can succeed: one that stops working (a wrong path, a tool that refuses) fails there instead of passing quietly.
The probes name the bot's real files by their host paths, and run in bypassPermissions (every tool runs), so
only the jail, not the CLI's permission checks, stands between the agent and the bot.
"""

from __future__ import annotations

import base64
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import CLI_START_TIMEOUT, CLIENT_SECRET, ROOT, BotProcess

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

DOTENV_CANARY = "dotenv-canary-7781"
VICTIM = "victim-user-8812"
VICTIM_PROMPT_CANARY = "victim-prompt-canary-5521"
VICTIM_FILE_CANARY = "victim-file-canary-3310"
API_KEY = "fake-key-for-tests"
SETTINGS_GRANTING_BASH = '{"permissions": {"allow": ["Bash"]}}'
# What no attacker may see: bot secrets, bot settings, systemd's variables, other conversations' data.
FORBIDDEN = (CLIENT_SECRET, DOTENV_CANARY, VICTIM, VICTIM_PROMPT_CANARY, VICTIM_FILE_CANARY, "DINGTALK_",
             "NOTIFY_SOCKET", "LOG_FILE=", "TASK_DB=")
# What the CLI's Read tool answers for a path that does not exist.
READ_NOT_FOUND = "<tool_use_error>File does not exist.</tool_use_error>"
SANDBOXES = [pytest.param("bwrap", id="jail"), pytest.param("none", id="sandbox-off")]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decoded_blobs(text: str) -> list[str]:
    """`text` plus every base64 run in it decoded (an attacker may encode what it steals)."""
    found = [text]
    for blob in re.findall(r"[A-Za-z0-9+/=]{16,}", text):
        try:
            found.append(base64.b64decode(blob + "=" * (-len(blob) % 4)).decode("utf-8", "replace"))
        except ValueError:
            continue
    return found


def leaked(texts: list[str]) -> list[str]:
    """The forbidden strings found in `texts` (also base64-decoded)."""
    return sorted({word for text in texts for plain in decoded_blobs(text) for word in FORBIDDEN if word in plain})


def ask(standin, text: str, user: str, count: int = 2) -> str:
    """Send `text` as `user` in a 1:1 chat; the bot's `count`-th reply (the answer)."""
    sent = standin.send_bot_message(text, sender_staff_id=user)
    posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                             and standin.webhook_posts(sent.session), timeout=CLI_START_TIMEOUT * 2,
                             message=f"{count} replies to {user}")
    return posts[count - 1].text or ""


def tool_results_for(model_server, marker: str) -> list[str]:
    """What the tools gave the agent in the conversation whose latest query contains `marker`."""
    results: list[str] = []
    for request in model_server.chat_requests():
        if request.user_queries and marker in request.user_queries[-1]:
            results = request.tool_results
    return results


def tool_output(result: str) -> str:
    """What a tool printed, without the command the Bash tool echoes first ("Command: …\nStdout: …")."""
    return result.split("\nStdout: ", 1)[1] if result.startswith("Command: ") else result


@dataclass(frozen=True)
class Probe:
    """One try at something that is not the agent's: the tool call, what it finds when nothing stops it, and the
    tool's own words when the thing does not exist (in the jail)."""

    name: str
    directive: str
    secret: str
    absent: str

    def outcome(self, result: str) -> str:
        """The outcome ("leaked", "absent", else the whole result), judged on what the tool printed, never on the
        command it echoes."""
        output = tool_output(result)
        if self.secret in output:
            return "leaked"
        return "absent" if self.absent in output else result


@dataclass
class Victim:
    """The bot under attack and what another chat user left with it."""

    bot: BotProcess
    notes: Path  # a file in the victim's workspace, by its host path
    transcript: Path  # the victim's CLI transcript, by its host path


def write_dotenv(tmp_path: Path) -> Path:
    """A .env of secrets in the bot's directory (where the bot reads it)."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(f"DINGTALK_CLIENT_SECRET={CLIENT_SECRET}\nBOT_CANARY={DOTENV_CANARY}\n")
    return dotenv


@pytest.fixture
def victim_of(real_bot, standin, tmp_path):
    """Factory: the bot (with `settings`) after a victim's conversation left a file, a transcript, a log line and a
    task row."""

    def factory(**settings: str) -> Victim:
        write_dotenv(tmp_path)
        bot = real_bot(**settings)
        answer = ask(standin, f"记住 {VICTIM_PROMPT_CANARY} [write:notes.txt:{b64(VICTIM_FILE_CANARY)}]", VICTIM)
        assert "tool done" in answer, answer
        [notes] = list((tmp_path / "workspace").glob("conversations/*/workspace/notes.txt"))
        assert notes.read_text() == VICTIM_FILE_CANARY  # the victim's own write worked
        transcripts = list((notes.parent.parent / "home" / ".codebuddy" / "projects").glob("*/*.jsonl"))
        [transcript] = [path for path in transcripts if VICTIM_PROMPT_CANARY in path.read_text()]
        assert VICTIM in (tmp_path / "logs" / "bot.log").read_text()
        return Victim(bot, notes, transcript)

    return factory


def read_probes(tmp_path: Path, victim: Victim) -> list[Probe]:
    """Tries to read the bot's secrets and files and another conversation's data, each by its real host path."""
    dotenv, task_db, log_file = tmp_path / ".env", tmp_path / "data" / "tasks.db", tmp_path / "logs" / "bot.log"
    environ = f"/proc/{victim.bot.proc.pid}/environ"
    missing = ": No such file"  # cat and grep add " or directory", the shell (dash) does not
    return [
        Probe(".env by Read", f"[read:{dotenv}]", DOTENV_CANARY, READ_NOT_FOUND),
        Probe(".env by cat", f"[bash:cat {dotenv}]", DOTENV_CANARY, f"{dotenv}{missing}"),
        # Only the secret's line is printed: the rest of the bot's environment is the test machine's.
        Probe("the bot's environment", f"[bash:tr '\\0' '\\n' < {environ} | grep CLIENT_SECRET]", CLIENT_SECRET,
              f"{environ}{missing}"),
        Probe("LOG_FILE by Read", f"[read:{log_file}]", VICTIM, READ_NOT_FOUND),
        # The rows sit in the write-ahead log until a checkpoint: search both files, as an attacker would.
        Probe("TASK_DB by grep", f"[bash:grep -aoh 'victim-prompt-canary-....' {task_db} {task_db}-wal]",
              VICTIM_PROMPT_CANARY, f"{task_db}{missing}"),
        Probe("another workspace's file by Read", f"[read:{victim.notes}]", VICTIM_FILE_CANARY, READ_NOT_FOUND),
        Probe("another workspace's file by cat", f"[bash:cat {victim.notes}]", VICTIM_FILE_CANARY,
              f"{victim.notes}{missing}"),
        Probe("another conversation's transcript", f"[bash:cat {victim.transcript}]", VICTIM_PROMPT_CANARY,
              f"{victim.transcript}{missing}"),
        # No path known: the neighbours of the agent's own workspace.
        Probe("the workspace's neighbours", "[bash:cat ../../*/workspace/notes.txt]", VICTIM_FILE_CANARY,
              f"workspace/notes.txt'{missing}"),
    ]


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_a_chat_user_reads_and_writes_nothing_of_the_bot_or_of_another_conversation(victim_of, standin,
                                                                                   model_server, tmp_path,
                                                                                   sandbox):
    victim = victim_of(CODEBUDDY_SANDBOX=sandbox)  # bypassPermissions: every tool runs, the jail alone stands
    probes = read_probes(tmp_path, victim)
    # `env` tests the run's environment, an allowlist with or without the jail (run_environment): it never leaks.
    answer = ask(standin, " ".join(["攻击-读取", *(probe.directive for probe in probes), "[bash:env]"]), "mallory")
    results = tool_results_for(model_server, "攻击-读取")
    assert len(results) == len(probes) + 1, results  # every tool call ran and came back to the agent
    *results, env = results
    outcomes = {probe.name: probe.outcome(result) for probe, result in zip(probes, results, strict=True)}
    assert outcomes == {probe.name: "leaked" if sandbox == "none" else "absent" for probe in probes}
    assert "HOME=" in tool_output(env) and "CODEBUDDY_BOT_RUN=" in tool_output(env), env
    assert leaked([env]) == [], env
    assert API_KEY not in answer  # the model key is the agent's by necessity, but never shown in a chat
    if sandbox == "bwrap":
        assert leaked(results + [answer]) == [], results

    bot_py = ROOT / "bot.py"
    before = bot_py.stat()
    escapes = {"the bot's checkout": ROOT / f"pwned-by-sandbox-test-{uuid.uuid4().hex[:8]}.txt",
               "the bot's directory, beside .env": tmp_path / "pwned.txt",
               "the CLI settings in the bot's HOME": tmp_path / "home" / ".codebuddy" / "settings.json",
               "another conversation's workspace": victim.notes.parent / "pwned.txt"}
    by_bash = tmp_path / "home" / "pwned-by-bash.txt"
    writes = " ".join(["攻击-写入", *(f"[write:{path}:{b64('pwned')}]" for path in escapes.values()),
                       f"[bash:touch {bot_py}; echo pwned > {by_bash}]"])
    try:
        ask(standin, writes, "mallory")
        assert len(tool_results_for(model_server, "攻击-写入")) == len(escapes) + 1
        landed = {name: path.exists() for name, path in {**escapes, "the bot's HOME by bash": by_bash}.items()}
        assert landed == {name: sandbox == "none" for name in landed}
        assert (bot_py.stat().st_mtime_ns != before.st_mtime_ns) == (sandbox == "none")
    finally:  # never leave a file in the checkout nor a touched bot.py, whatever the outcome
        escapes["the bot's checkout"].unlink(missing_ok=True)
        os.utime(bot_py, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("sandbox", SANDBOXES)
def test_settings_written_by_one_message_grant_a_shell_that_finds_nothing_of_the_bot(real_bot, standin,
                                                                                     model_server, tmp_path,
                                                                                     sandbox):
    dotenv = write_dotenv(tmp_path)
    # acceptEdits with APPROVALS=off: the mode denies Bash, but lets the agent write the CLI's settings in its cwd.
    # WARM_SESSIONS=0: each message starts a CLI, which reads its settings at start (when a warm one notices the
    # change is up to the CLI, and not what this test is about).
    bot = real_bot(CODEBUDDY_SANDBOX=sandbox, CODEBUDDY_PERMISSION_MODE="acceptEdits", APPROVALS="off",
                   WARM_SESSIONS="0")
    first = ask(standin, f"攻击-授权 [write:.codebuddy/settings.json:{b64(SETTINGS_GRANTING_BASH)}]", "mallory")
    assert "tool done" in first, first
    environ = f"/proc/{bot.proc.pid}/environ"
    ask(standin, f"攻击-提权 [bash:cat {dotenv}; tr '\\0' '\\n' < {environ} | grep CLIENT_SECRET; "
        "grep CapEff /proc/self/status; mknod probe-node c 1 3 && echo mknod-\"\"made]", "mallory")
    [escalated] = tool_results_for(model_server, "攻击-提权")
    output = tool_output(escalated)
    # The escalation works, as in the CLI without a sandbox: the second message got a shell…
    assert escalated.startswith("Command: ") and "Exit Code:" in output, escalated
    if sandbox == "none":  # …which, unjailed, reads the bot's secrets and, as root, makes device nodes
        assert DOTENV_CANARY in output and CLIENT_SECRET in output, escalated
        if os.geteuid() == 0:
            assert "CapEff:\t0000000000000000" not in output and "mknod-made" in output, escalated
        return
    # …but only inside its own jail: no bot secret, no bot setting…
    assert f"{dotenv}: No such file" in output and f"{environ}: No such file" in output, output
    assert leaked([escalated]) == [], escalated
    # …and without any capability, even when the bot runs as root (CI does): no device nodes, no mounts.
    assert "CapEff:\t0000000000000000" in output and "mknod: probe-node: Operation not permitted" in output, output
    assert "mknod-made" not in output


def test_the_agent_still_reads_writes_runs_programs_and_commits_in_its_workspace(real_bot, standin, model_server,
                                                                                 tmp_path):
    real_bot()  # bypassPermissions: the mode operators pick so the agent can run tests
    ask(standin, "写脚本 [write:/workspace/hello.py:" + b64("print('hello from the jail')\n") + "] "
        "[bash:python3 hello.py && git init -q && git add hello.py && "
        "git -c user.email=bot@example.com -c user.name=bot commit -qm init && git log --oneline | wc -l]",
        "builder")
    read_back = ask(standin, "读回 [read:/workspace/hello.py] [bash:mkdir -p out && echo ok > out/x && cat out/x]",
                    "builder")
    run = tool_results_for(model_server, "写脚本")[1]
    assert "Stdout: hello from the jail\n1\n" in run and "Exit Code: 0" in run, run
    [workspace] = list((tmp_path / "workspace").glob("conversations/*/workspace"))
    assert (workspace / "hello.py").exists() and (workspace / ".git").is_dir() and (workspace / "out" / "x").exists()
    assert "print('hello from the jail')" in tool_results_for(model_server, "读回")[0]
    assert "Stdout: ok" in read_back
    assert oct(workspace.stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "data" / "tasks.db").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "logs" / "bot.log").stat().st_mode & 0o777) == "0o600"
