"""Security: a chat user tries to get out of the sandbox, with the REAL CodeBuddy CLI (docs/sandbox.md).

Every attack is sent as a chat message through the stand-in to `python bot.py`, which runs the real CLI from
the wheel inside bubblewrap against the fake model server. The fake model turns `[bash:…]`, `[read:…]` and
`[write:PATH:BASE64]` directives into real tool calls, one per turn, so the CLI really runs them. What the
attacker got is what the tools gave the agent: every tool result the CLI sent on to the model, and every
text the bot sent to the chat. None may hold a bot secret or another conversation's data, in either
permission mode, whatever the mode lets the agent do.
"""

from __future__ import annotations

import base64
import re

import pytest

from tests.conftest import CLI_START_TIMEOUT, CLIENT_SECRET, ROOT

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


@pytest.fixture
def jailed(real_bot, standin, tmp_path, model_server):
    """A bot with a .env of secrets beside it and a victim conversation holding a file and a transcript."""

    def factory(mode: str):
        (tmp_path / ".env").write_text(f"DINGTALK_CLIENT_SECRET={CLIENT_SECRET}\nBOT_CANARY={DOTENV_CANARY}\n")
        # acceptEdits with APPROVALS=off: the mode alone denies Bash; bypassPermissions: every tool runs (as when
        # the attacker approves his own requests), and only the jail keeps the secrets.
        bot = real_bot(CODEBUDDY_PERMISSION_MODE=mode, APPROVALS="off" if mode == "acceptEdits" else "on")
        answer = ask(standin, f"记住 {VICTIM_PROMPT_CANARY} [write:/workspace/notes.txt:{b64(VICTIM_FILE_CANARY)}]",
                     VICTIM)
        assert "tool done" in answer, answer
        [victim_notes] = list((tmp_path / "workspace").glob("conversations/*/workspace/notes.txt"))
        assert victim_notes.read_text() == VICTIM_FILE_CANARY  # the victim's own write worked
        return bot, victim_notes

    return factory


@pytest.mark.parametrize("mode", ["acceptEdits", "bypassPermissions"])
def test_a_chat_user_gets_no_secret_no_bot_file_and_no_other_conversation(jailed, standin, model_server, tmp_path,
                                                                          mode):
    bot, victim_notes = jailed(mode)
    victim_conversation = victim_notes.parent.parent
    victim_transcripts = victim_conversation / "home" / ".codebuddy" / "projects"
    assert list(victim_transcripts.rglob("*.jsonl")), "the victim's CLI transcript is where the test looks"
    task_db, log_file, dotenv = tmp_path / "data" / "tasks.db", tmp_path / "logs" / "bot.log", tmp_path / ".env"
    assert VICTIM in log_file.read_text() and dotenv.exists() and task_db.exists()
    pid = bot.proc.pid
    attacks = " ".join([
        "攻击-读取",
        "[bash:env]", "[bash:env | base64 -w0]",
        "[read:../.env]", f"[read:{dotenv}]", f"[bash:cat ../.env {dotenv}]",
        f"[read:{log_file}]", f"[bash:cat {task_db} {log_file} | base64 -w0]",
        f"[read:/proc/{pid}/environ]", f"[bash:cat /proc/{pid}/environ; ls /proc]",
        f"[read:{victim_notes}]",
        f"[bash:ls -la {tmp_path / 'workspace'} {victim_conversation}; cat {victim_notes}; "
        f"cat {victim_transcripts}/*/*.jsonl]",
        "[bash:ls -la /workspace/.. /home /home/*; cat /home/*/notes.txt]",
    ])
    answer = ask(standin, attacks, "mallory")
    results = tool_results_for(model_server, "攻击-读取")
    assert len(results) == 12, results  # every tool call ran (or was denied) and came back to the agent
    assert leaked(results + [answer]) == [], results
    if mode == "bypassPermissions":  # the tools did run: the jail, not the mode, kept the secrets
        assert "HOME=/home/codebuddy" in results[0] and "CODEBUDDY_BOT_RUN=" in results[0]
        assert API_KEY not in answer  # the model key is the agent's by necessity, but never shown in a chat

    bot_py = ROOT / "bot.py"
    before = bot_py.stat().st_mtime_ns
    escapes = [ROOT / "pwned-by-sandbox-test.txt", tmp_path / "home" / "pwned.txt", tmp_path / "pwned.txt",
               victim_notes.parent / "pwned.txt", tmp_path / "home" / ".codebuddy" / "settings.json"]
    writes = " ".join([
        "攻击-写入",
        *(f"[write:{path}:{b64('pwned')}]" for path in escapes),
        f"[write:../pwned.txt:{b64('pwned')}]",
        f"[bash:touch {bot_py}; echo pwned > {escapes[0]}; echo pwned > {escapes[1]}]",
    ])
    ask(standin, writes, "mallory")
    assert len(tool_results_for(model_server, "攻击-写入")) == 7
    try:
        assert [path for path in escapes if path.exists()] == []
        assert bot_py.stat().st_mtime_ns == before
        assert not list((tmp_path / "workspace").glob("conversations/*/pwned.txt"))
    finally:
        escapes[0].unlink(missing_ok=True)  # never leave a file in the checkout, even when the test fails


def test_settings_written_by_one_message_grant_bash_only_inside_the_jail(jailed, standin, model_server):
    jailed("acceptEdits")
    first = ask(standin, f"攻击-授权 [write:/home/codebuddy/.codebuddy/settings.json:{b64(SETTINGS_GRANTING_BASH)}]",
                "mallory")
    assert "tool done" in first
    ask(standin, "攻击-提权 [bash:env; cat ../.env; cat /proc/1/environ | tr '\\0' ' '; ls /; "
        "grep CapEff /proc/self/status; mknod /tmp/disk b 8 0 || echo no-mknod]", "mallory")
    [escalated] = tool_results_for(model_server, "攻击-提权")
    # The escalation works, as in the CLI without a sandbox: the second message got a shell…
    assert "HOME=/home/codebuddy" in escalated, escalated
    # …but only inside its own jail: no bot secret, no bot setting, nothing of another conversation.
    assert leaked([escalated]) == [], escalated
    # …and without any capability, even when the bot runs as root (CI does): no device nodes, no mounts.
    assert "CapEff:\t0000000000000000" in escalated and "no-mknod" in escalated, escalated


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
