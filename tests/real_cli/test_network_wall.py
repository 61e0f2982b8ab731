"""The run's network wall, tried for real: the real CLI in its jail (bypassPermissions: a shell) reaches for the
host's loopback services in every spelling and by every client, and only the egress proxy's policy decides.

Each probe runs in one Bash call that the loopback model scripts (`[bash:…]`); the answer shows the tool's output.
Traffic goes only to loopback servers this test starts (and to the jail's own loopback).
"""

from __future__ import annotations

import http.server
import threading

import pytest

from tests.conftest import CLI_START_TIMEOUT

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

SECRET = "host-loopback-secret-5f3a"
ALLOWED = "allowed-intranet-page-81c2"
BLOCKED_LINE = "blocked by the bot's network policy"


def _serve(body: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # the OS picks the port at bind time
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture
def host_services():
    secret, secret_port = _serve(SECRET)
    allowed, allowed_port = _serve(ALLOWED)
    yield secret_port, allowed_port
    for server in (secret, allowed):
        server.shutdown()
        server.server_close()


def _output(standin, user: str, command: str) -> str:
    """What the Bash call printed (stdout and stderr), as the answer shows it — not the echoed command."""
    return _answer(standin, user, command).split("Stdout:", 1)[1]


def _answer(standin, user: str, command: str) -> str:
    sent = standin.send_bot_message(f"探测 [bash:{command}]", sender_staff_id=user)
    posts = standin.wait_for(lambda: [p for p in standin.webhook_posts(sent.session) if "回答:" in p.text],
                             timeout=CLI_START_TIMEOUT, message=f"an answer to {command!r}")
    return posts[0].text


def test_a_run_reaches_neither_the_hosts_loopback_nor_its_spellings_and_an_allowed_host_still_answers(
        standin, real_bot, host_services):
    secret_port, allowed_port = host_services
    bot = real_bot(CODEBUDDY_EGRESS_ALLOW=f"127.0.0.1:{allowed_port}")
    url = f"http://127.0.0.1:{secret_port}/"
    direct = _output(standin, "netwall1", f"curl -sS --max-time 5 {url}; curl -sS --max-time 5 --noproxy '*' {url}; "
                     f"bash -c 'exec 3<>/dev/tcp/127.0.0.1/{secret_port} && cat <&3'; echo P-end")
    assert "P-end" in direct and SECRET not in direct and BLOCKED_LINE in direct, direct
    assert "Couldn't connect" in direct and "/dev/tcp/127.0.0.1" in direct, direct  # no host loopback in the jail
    spelled = _output(standin, "netwall2", "; ".join(f"curl -gsS --max-time 5 http://{name}:{secret_port}/"
                                                    for name in ("127.1", "0x7f000001", "2130706433",
                                                                 "0.0.0.0", "localhost"))
                      + "; echo P-end")
    # ([::ffff:127.0.0.1] cannot be written in the model's [bash:…] script: tests/codebuddy/test_egress.py has it)
    assert "P-end" in spelled and SECRET not in spelled and spelled.count(BLOCKED_LINE) >= 4, spelled
    allowed = _output(standin, "netwall3", f"curl -sS --max-time 5 http://127.0.0.1:{allowed_port}/; echo P-end")
    assert ALLOWED in allowed, allowed
    assert "网络请求被拒绝: 127.0.0.1" in bot.log_text()


def test_a_run_cannot_read_the_bots_own_metrics(standin, real_bot):
    bot = real_bot(STATUS_PORT="0")
    port = bot.status_port()
    answer = _answer(standin, "netwall2", f"curl -sS --max-time 5 http://127.0.0.1:{port}/metrics; echo P-end")
    output = answer.split("Stdout:", 1)[1]
    assert "P-end" in output and "dingtalk_bot_" not in answer and BLOCKED_LINE in output, answer
    assert bot.proc.poll() is None
