"""The run's network wall, tried for real: the real CLI in its jail (bypassPermissions: a shell) reaches for the
host's loopback services in every spelling and by every client, and only the egress proxy's policy decides.

Each probe runs in one Bash call that the loopback model scripts (`[bash:…]`); the answer shows the tool's output.
Traffic goes only to loopback servers this test starts (and to the jail's own loopback).
"""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from codebuddy.egress import read_own_addresses
from tests.conftest import CLI_START_TIMEOUT, wait_for_process

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

SECRET = "host-loopback-secret-5f3a"
ALLOWED = "allowed-intranet-page-81c2"
BLOCKED_LINE = "blocked by the bot's network policy"


def _serve(body: str, host: str = "127.0.0.1") -> tuple[http.server.ThreadingHTTPServer, int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)  # the OS picks the port at bind time
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
    # [::ffff:127.0.0.1] is spelled through base64: brackets would end the model's [bash:…] script. At the secret's
    # port the port already refuses it; at port 80 the address itself is judged (nothing listens there).
    mapped = "$(echo Ww== | base64 -d)::ffff:127.0.0.1$(echo XQ== | base64 -d)"
    spelled = _output(standin, "netwall2", "; ".join(f"curl -gsS --max-time 5 http://{name}:{secret_port}/"
                                                    for name in ("127.1", "0x7f000001", "2130706433",
                                                                 "0.0.0.0", "localhost", mapped))
                      + f"; curl -gsS --max-time 5 http://{mapped}:80/; echo P-end")
    assert "P-end" in spelled and SECRET not in spelled and spelled.count(BLOCKED_LINE) >= 6, spelled
    assert "(IPv4 127.0.0.1) is a loopback address" in spelled, spelled  # judged by its address, not its port
    allowed = _output(standin, "netwall3", f"curl -sS --max-time 5 http://127.0.0.1:{allowed_port}/; echo P-end")
    assert ALLOWED in allowed, allowed
    assert "网络请求被拒绝: 127.0.0.1" in bot.log_text()


def test_a_run_cannot_reach_the_hosts_own_interface_address(standin, real_bot):
    """A service listening on every address of the host, asked for by one of the host's own non-loopback addresses:
    the proxy refuses it without connecting, and the jail has no route to it (no traffic leaves the host)."""
    own = [net.network_address for net in read_own_addresses() if net.version == 4
           and net.prefixlen == net.max_prefixlen and not net.network_address.is_loopback]
    assert own, "this host has no IPv4 address but loopback"
    server, port = _serve(SECRET, host="0.0.0.0")
    try:
        real_bot()
        url = f"http://{own[0]}:{port}/"
        output = _output(standin, "netwall5", f"curl -sS --max-time 5 {url}; curl -sS --max-time 5 --noproxy '*' "
                         f"{url}; curl -sS --max-time 5 http://{own[0]}/; echo P-end")
    finally:
        server.shutdown()
        server.server_close()
    assert "P-end" in output and SECRET not in output, output
    assert f"{own[0]} is one of this machine's own addresses" in output, output  # at port 80: by its address
    assert "Couldn't connect" in output or "unreachable" in output.lower(), output  # no route out of the jail


def test_a_run_cannot_read_the_bots_own_metrics(standin, real_bot):
    bot = real_bot(STATUS_PORT="0")
    port = bot.status_port()
    answer = _answer(standin, "netwall2", f"curl -sS --max-time 5 http://127.0.0.1:{port}/metrics; echo P-end")
    output = answer.split("Stdout:", 1)[1]
    assert "P-end" in output and "dingtalk_bot_" not in answer and BLOCKED_LINE in output, answer
    assert bot.proc.poll() is None


def test_python_urllib_and_a_host_abstract_socket_are_out_of_reach(standin, real_bot, host_services):
    secret_port, _ = host_services
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0dingtalk-bot-wall-test")  # an abstract socket of the host's network namespace
    listener.listen(1)
    try:
        real_bot()
        output = _output(standin, "netwall4", (
            f"python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{secret_port}/', "
            "timeout=5).read())\" 2>&1 | tail -n 1; "
            "python3 -c \"import socket; s = socket.socket(socket.AF_UNIX); s.connect('\\0dingtalk-bot-wall-test'); "
            "print('connected')\" 2>&1 | tail -n 1; echo P-end"))
    finally:
        listener.close()
    assert "P-end" in output and SECRET not in output, output
    assert "HTTP Error 403" in output, output  # urllib honours the proxy variables: the policy's answer
    assert "ConnectionRefusedError" in output and "connected" not in output.replace("ConnectionRefused", ""), output


def test_one_run_cannot_reach_another_runs_listening_port(standin, real_bot, tmp_path):
    real_bot()
    standin.send_bot_message("[bash:timeout 60 python3 -m http.server 8765 --bind 127.0.0.1 > /dev/null 2>&1]",
                             sender_staff_id="netwall-server")
    wait_for_process(tmp_path, ["python3", "-m", "http.server", "8765", "--bind", "127.0.0.1"],
                     timeout=CLI_START_TIMEOUT)
    output = _output(standin, "netwall-client", "curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:8765/; "
                                                "curl -sS --max-time 5 http://127.0.0.1:8765/; echo P-end")
    assert "P-end" in output and "Directory listing" not in output, output
    assert "Couldn't connect" in output and BLOCKED_LINE in output, output


def test_in_a_mode_that_asks_for_the_shell_an_approved_shell_meets_the_same_wall(standin, real_bot, host_services):
    secret_port, _ = host_services
    real_bot(CODEBUDDY_PERMISSION_MODE="acceptEdits", APPROVAL_TIMEOUT="20")
    sent = standin.send_bot_message(f"探测 [bash:curl -sS --max-time 5 http://127.0.0.1:{secret_port}/; echo P-end]",
                                    sender_staff_id="netwall5")
    standin.wait_for(lambda: any("CodeBuddy 请求使用工具 Bash" in p.text for p in standin.webhook_posts(sent.session)),
                     timeout=CLI_START_TIMEOUT, message="the Bash approval question")
    approve = standin.send_bot_message("同意", sender_staff_id="netwall5")
    standin.wait_for(lambda: standin.webhook_posts(approve.session), timeout=20)
    posts = standin.wait_for(lambda: [p for p in standin.webhook_posts(sent.session) if "回答:" in p.text],
                             timeout=CLI_START_TIMEOUT)
    output = posts[0].text.split("Stdout:", 1)[1]
    assert "P-end" in output and SECRET not in output and BLOCKED_LINE in output, output
