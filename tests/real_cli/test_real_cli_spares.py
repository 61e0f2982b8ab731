"""End to end with the REAL CodeBuddy CLI: a new conversation's first prompt, and the first after /new, are answered by
a spare process that was running before the prompt arrived; a new spare follows; conversations never share a
process, a session or a file.

The CLI names its session in every model request (`x-conversation-id`), and each CLI process runs on the session its
argv gives (`--session-id`): so "the request came from a process that existed before" is checked on what the loopback
model received against the processes alive before the prompt was sent.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from codebuddy import process_tree
from codebuddy.sandbox import Workspaces
from tests.conftest import CLI_START_TIMEOUT, process_alive, processes_of_this_test

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

SPARE_READY = r"备用 CodeBuddy 进程 \d+ 已就绪"


def cli_sessions(tmp_path) -> dict[int, str]:
    """The real CLI processes of this test alive now (not their jails' bwrap) → the CLI session each runs on."""
    return {pid: argv[argv.index("--session-id") + 1] for pid, argv in processes_of_this_test(tmp_path).items()
            if "--replay-user-messages" in argv and "--" not in argv and "--session-id" in argv}


def ask(standin, text: str, user: str, count: int = 2):
    sent = standin.send_bot_message(text, sender_staff_id=user)
    posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                             and standin.webhook_posts(sent.session), timeout=CLI_START_TIMEOUT,
                             message=f"{count} posts for {text!r}")
    return sent, posts


def request_for(model_server, marker: str):
    """The model's last request for the prompt holding `marker`."""
    requests = [r for r in model_server.chat_requests() if any(marker in q for q in r.user_queries)]
    assert requests, f"no model request for {marker!r}"
    return requests[-1]


def the_spare(bot, tmp_path, ready: int) -> tuple[int, int, str]:
    """The spare that was the `ready`-th to be ready: (pid the bot logs, its CLI's pid, the CLI session it runs on).
    The bot logs the pid of the jail's bwrap; the CLI runs below it."""
    logged = int(re.search(r"进程 (\d+)", bot.wait_log(SPARE_READY, timeout=CLI_START_TIMEOUT, count=ready)[-1])[1])
    [(cli, session)] = [(pid, session) for pid, session in cli_sessions(tmp_path).items()
                        if pid in process_tree.descendants(logged)]
    return logged, cli, session


def test_first_prompts_are_answered_by_spares_started_before_them_and_nothing_is_shared(standin, real_bot,
                                                                                    model_server, tmp_path):
    bot = real_bot(SPARE_SESSIONS="1")
    spare_a, cli_a, session_a = the_spare(bot, tmp_path, 1)
    assert not [r for r in model_server.requests if r.headers.get("x-conversation-id") == session_a]  # no prompt yet

    # Written with the Write tool: the CLI keeps file-history in its home, which must not keep /new from a spare.
    sent_a, posts = ask(standin, f"会话一 [write:/workspace/a.txt:{base64.b64encode(b'secret-of-a').decode()}]",
                        "spare1")
    assert "回答: 会话一" in posts[1].text
    assert request_for(model_server, "会话一").headers["x-conversation-id"] == session_a
    assert process_alive(cli_a) and cli_sessions(tmp_path)[cli_a] == session_a  # the same process, kept warm
    bot.wait_log(rf"备用 CodeBuddy 进程 {spare_a} 接手新会话")
    assert "启动 CodeBuddy 进程" not in bot.log_text()  # no process was started for the prompt itself

    spare_b, cli_b, session_b = the_spare(bot, tmp_path, 2)  # a new spare after the adoption
    ask(standin, "/new", "spare1", count=1)
    _, posts = ask(standin, "新会话之后 [bash:ls /workspace]", "spare1")
    request = request_for(model_server, "新会话之后")
    assert request.headers["x-conversation-id"] == session_b and request.user_queries == [
        "新会话之后 [bash:ls /workspace]"]  # a fresh session, in the spare started before the prompt
    bot.wait_log(rf"备用 CodeBuddy 进程 {spare_b} 接手新会话")
    assert "a.txt" in posts[1].text  # the workspace stays across /new
    assert not process_alive(cli_a) and process_alive(cli_b)  # the old session's process ended

    spare_c, cli_c, session_c = the_spare(bot, tmp_path, 3)
    sent_c, posts = ask(standin, "会话二 [bash:ls -la /workspace; cat /workspace/a.txt ../*/a.txt]", "spare2")
    request = request_for(model_server, "会话二")
    assert request.headers["x-conversation-id"] == session_c and request.user_queries == [
        "会话二 [bash:ls -la /workspace; cat /workspace/a.txt ../*/a.txt]"]
    bot.wait_log(rf"备用 CodeBuddy 进程 {spare_c} 接手新会话")
    assert "No such file" in posts[1].text and "secret-of-a" not in posts[1].text
    assert "secret-of-a" not in "".join(request.tool_results)
    assert len({cli_a, cli_b, cli_c}) == 3 and len({session_a, session_b, session_c}) == 3
    assert "启动 CodeBuddy 进程" not in bot.log_text()

    workspaces = Workspaces(str(tmp_path / "workspace"))
    mine = Path(workspaces.dirs_for(sent_a.payload["conversationId"]).workspace)
    other = Path(workspaces.dirs_for(sent_c.payload["conversationId"]).workspace)
    assert (mine / "a.txt").read_text().strip() == "secret-of-a" and not (other / "a.txt").exists()
