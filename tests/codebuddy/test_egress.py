"""The egress wall: the address classifier, the policy, the proxy over its Unix socket, and a run's own network
namespace whose listeners the proxy serves.

Traffic goes only to 127.0.0.1 or inside a network namespace the test made; refused destinations are judged, never
connected to (a recording connect function shows it).
"""

from __future__ import annotations

import ctypes
import errno
import http.server
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from codebuddy.egress import (
    ALLOW_HINT,
    DENY_HINT,
    EgressPolicy,
    model_endpoint,
    parse_rule,
    read_own_addresses,
    refusal_reason,
    resolve_addresses,
)
from codebuddy.egress_proxy import EgressProxy, ResponseHeads, connect_tcp
from codebuddy.jail_network import JailNetwork
from tests.conftest import bwrap_path

BIG = bytes(range(256)) * 32768  # 8 MiB


class Origin(http.server.BaseHTTPRequestHandler):
    """A loopback web server that records what reached it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        body = BIG if self.path == "/big" else b"hello from the loopback origin"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        answer = f"received {len(body)} bytes".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def origin():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


class Recorder:
    """A connect or resolve function that records its calls and lets only loopback through."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def __call__(self, *args):
        self.calls.append(args)
        if self.real is connect_tcp and not args[0].is_loopback:
            raise ConnectionRefusedError("the test lets the proxy connect to loopback only")
        return self.real(*args)


@pytest.fixture
def run_proxy(tmp_path):
    proxies = []

    def start(policy: EgressPolicy, **options):
        refusals, connects, lookups = [], Recorder(connect_tcp), Recorder(resolve_addresses)
        proxy = EgressProxy(policy, lambda *args: refusals.append(args), connect=connects, resolve=lookups,
                            **options)
        path = str(tmp_path / f"egress-{len(proxies)}.sock")
        proxy.open_listener(path, "task-7")
        proxies.append(proxy)
        return proxy, path, refusals, connects, lookups

    yield start
    for proxy in proxies:
        proxy.close()


def ask(path: str, request: bytes) -> bytes:
    """Send one request over the proxy's Unix socket and read the answer to its end."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        try:
            sock.sendall(request)
        except BrokenPipeError:
            pass  # the proxy answered (503) and closed before reading: the answer is still there to read
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks)


def tunnel(path: str, target: str) -> socket.socket:
    """A CONNECT tunnel through the proxy, its 200 read."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(path)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def allow_origin(origin, **settings) -> EgressPolicy:
    return EgressPolicy.from_settings(allow=f"127.0.0.1:{origin.server_address[1]}", **settings)


# The classifier: no traffic, classification only.

@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "a loopback"), ("127.255.0.9", "a loopback"), ("::1", "a loopback"),
    ("10.0.0.5", "a private"), ("172.16.3.4", "a private"), ("172.31.255.1", "a private"), ("192.168.1.1", "a private"),
    ("fd00::1", "a private (unique local)"), ("fc00::1", "a private (unique local)"),
    ("169.254.169.254", "a link-local"), ("169.254.0.23", "a link-local"), ("fe80::1", "a link-local"),
    ("100.64.0.1", "a carrier-grade NAT (shared)"), ("100.100.100.200", "a carrier-grade NAT (shared)"),
    ("0.0.0.0", "a 'this network'"), ("0.1.2.3", "a 'this network'"), ("::", "an unspecified ('this network')"),
    ("224.0.0.1", "a multicast"), ("239.255.255.250", "a multicast"), ("ff02::1", "a multicast"),
    ("255.255.255.255", "the broadcast"), ("240.0.0.1", "a reserved"), ("192.0.0.8", "a reserved (IETF protocol)"),
    ("198.18.0.1", "a reserved (benchmarking)"), ("192.88.99.1", "a reserved (6to4 relay)"),
    ("192.0.2.1", "a documentation"), ("198.51.100.7", "a documentation"), ("203.0.113.9", "a documentation"),
    ("2001:db8::1", "a documentation"), ("3fff::1", "a documentation"), ("fec0::1", "a reserved (site-local)"),
    ("2001::1", "a reserved (IETF protocol, Teredo)"), ("64:ff9b:1::1", "a reserved (local NAT64)"),
    ("100::1", "a reserved (discard)"), ("4000::1", "a reserved"),
])
def test_each_non_public_range_is_refused_with_its_name(address, kind):
    assert refusal_reason(ipaddress.ip_address(address)) == f"{address} is {kind} address"


@pytest.mark.parametrize("address, inner, kind", [
    ("::ffff:10.0.0.5", "10.0.0.5", "private"), ("::ffff:127.0.0.1", "127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "169.254.169.254", "link-local"), ("::10.0.0.5", "10.0.0.5", "private"),
    ("2002:7f00:1::1", "127.0.0.1", "loopback"), ("2002:a9fe:a9fe::", "169.254.169.254", "link-local"),
    ("64:ff9b::10.0.0.5", "10.0.0.5", "private"), ("64:ff9b::6464:64c8", "100.100.100.200", "carrier-grade NAT"),
])
def test_ipv4_inside_ipv6_is_judged_as_the_ipv4_address(address, inner, kind):
    reason = refusal_reason(ipaddress.ip_address(address))
    assert f"(IPv4 {inner}) is a {kind}" in reason


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::1"])
def test_public_unicast_addresses_are_allowed(address):
    assert refusal_reason(ipaddress.ip_address(address)) is None


def test_this_machines_own_addresses_are_refused():
    own = read_own_addresses()
    assert ipaddress.ip_network("127.0.0.1/32") in own and ipaddress.ip_network("::1/128") in own
    mine = [net for net in own if net.num_addresses == 1 and not net.network_address.is_loopback]
    assert mine, "this machine has an interface address besides loopback"
    for network in mine:
        reason = refusal_reason(network.network_address, own)
        assert reason == f"{network.network_address} is one of this machine's own addresses"
    # A public address bound on this host (a cloud VM's elastic IP) is refused too.
    assert "own addresses" in refusal_reason(ipaddress.ip_address("8.8.8.8"), [ipaddress.ip_address("8.8.8.8")])


def test_own_addresses_are_read_from_the_local_entries_of_fib_trie_and_if_inet6(tmp_path):
    (tmp_path / "fib_trie").write_text("Local:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 203.0.113.7\n        /32 host LOCAL\n"
                                       "     |-- 203.0.113.255\n        /32 link BROADCAST\n"
                                       "     |-- 10.9.0.0\n        /16 host LOCAL\n")
    (tmp_path / "if_inet6").write_text("20010db8000000000000000000000042 02 40 00 80     eth0\n")
    own = read_own_addresses(str(tmp_path / "fib_trie"), str(tmp_path / "if_inet6"))
    assert [str(net) for net in own] == ["10.9.0.0/16", "203.0.113.7/32", "2001:db8::42/128"]


# The policy: parsed from settings, checked with a fake resolver.

def resolver(table: dict[str, list[str]]):
    calls = []

    def resolve(host, port):
        calls.append(host)
        return [ipaddress.ip_address(address) for address in table.get(host, [host])]
    resolve.calls = calls
    return resolve


@pytest.mark.parametrize("entry, fields", [
    ("git.corp", {"name": "git.corp", "port": None}), ("Git.Corp.:22", {"name": "git.corp", "port": 22}),
    ("*.corp.example", {"suffix": ".corp.example"}), ("nexus:*", {"name": "nexus", "port": 0}),
    ("10.1.0.0/16", {"network": ipaddress.ip_network("10.1.0.0/16")}),
    ("10.1.2.3/32", {"network": ipaddress.ip_network("10.1.2.3/32")}),
    ("10.1.2.3:8080", {"network": ipaddress.ip_network("10.1.2.3/32"), "port": 8080}),
    ("fd00::/8", {"network": ipaddress.ip_network("fd00::/8")}),
    ("[fd00::1]:8443", {"network": ipaddress.ip_network("fd00::1/128"), "port": 8443}),
])
def test_allow_and_deny_entries_parse_in_every_form(entry, fields):
    rule = parse_rule(entry, "CODEBUDDY_EGRESS_ALLOW")
    assert {key: getattr(rule, key) for key in fields} == fields


@pytest.mark.parametrize("variable, settings", [
    ("CODEBUDDY_EGRESS_ALLOW", {"allow": "ok.example, *"}), ("CODEBUDDY_EGRESS_ALLOW", {"allow": "host:"}),
    ("CODEBUDDY_EGRESS_ALLOW", {"allow": "host:99999"}), ("CODEBUDDY_EGRESS_ALLOW", {"allow": "host:ssh"}),
    ("CODEBUDDY_EGRESS_DENY", {"deny": "exa mple.com"}), ("CODEBUDDY_EGRESS_DENY", {"deny": "10.1.2"}),
    ("CODEBUDDY_EGRESS_DENY", {"deny": "[fd00::1]x"}), ("CODEBUDDY_EGRESS_DENY", {"deny": "*."}),
    ("CODEBUDDY_EGRESS", {"mode": "open"}), ("CODEBUDDY_BASE_URL", {"base_url": "ftp://model.example"}),
])
def test_a_bad_setting_raises_one_line_naming_its_variable(variable, settings):
    with pytest.raises(ValueError, match=f"^{variable}: ") as raised:
        EgressPolicy.from_settings(**settings)
    assert "\n" not in str(raised.value)


def test_public_mode_allows_public_hosts_on_80_and_443_and_judges_every_address():
    policy = EgressPolicy.from_settings(" public ")
    resolve = resolver({"pypi.example": ["8.8.8.8", "2001:4860:4860::8888"], "split.example": ["8.8.8.8", "10.0.0.5"]})
    assert policy.check("pypi.example", 443, resolve).addresses == tuple(resolve("pypi.example", 443)[:2])
    assert policy.check("split.example", 80, resolve).reason == "split.example: 10.0.0.5 is a private address"
    refused = policy.check("pypi.example", 22, resolve)
    assert (refused.reason, refused.hint) == ("port 22 is not allowed (only 80 and 443)", ALLOW_HINT)


def test_allow_list_reaches_private_hosts_by_name_suffix_and_network():
    policy = EgressPolicy.from_settings(allow="git.corp, build.corp:8080, *.corp.example, 10.1.0.0/16, 10.2.0.9:*")
    resolve = resolver({"git.corp": ["10.0.0.7"], "build.corp": ["10.0.0.8"], "a.corp.example": ["192.168.0.3"],
                        "corp.example": ["192.168.0.4"], "repo.lan": ["10.1.4.4"]})
    assert policy.check("git.corp", 443, resolve).allowed
    assert not policy.check("git.corp", 22, resolve).allowed  # an entry without a port keeps 80 and 443
    assert policy.check("build.corp", 8080, resolve).allowed
    assert policy.check("a.corp.example", 443, resolve).allowed
    assert "192.168.0.4 is a private address" in policy.check("corp.example", 443, resolve).reason  # not the apex
    assert policy.check("repo.lan", 80, resolve).allowed and policy.check("10.1.200.1", 443, resolve).allowed
    assert policy.check("10.2.0.9", 5432, resolve).allowed


def test_deny_wins_over_allow_but_not_over_the_model_endpoint():
    policy = EgressPolicy.from_settings(allow="*.corp.example, 127.0.0.1:*", deny="secret.corp.example, 8.8.8.0/24, "
                                        "127.0.0.1", base_url="http://127.0.0.1:8080/v1")
    resolve = resolver({"secret.corp.example": ["10.0.0.9"], "dns.example": ["8.8.8.8"]})
    refused = policy.check("secret.corp.example", 443, resolve)
    assert (refused.reason, refused.hint) == ("secret.corp.example is on the deny list", DENY_HINT)
    assert policy.check("dns.example", 443, resolve).reason == "dns.example: 8.8.8.8 is on the deny list"
    assert not policy.check("127.0.0.1", 9000, resolve).allowed
    assert policy.check("127.0.0.1", 8080, resolve).allowed


def test_model_mode_allows_only_the_model_endpoint_and_looks_nothing_else_up():
    policy = EgressPolicy.from_env({"CODEBUDDY_EGRESS": "model", "CODEBUDDY_BASE_URL": "https://models.example/v1"})
    assert policy.model == model_endpoint("https://Models.Example./v1") == ("models.example", 443)
    resolve = resolver({"models.example": ["10.0.0.1"], "pypi.example": ["8.8.8.8"]})
    assert policy.check("models.example", 443, resolve).allowed  # even on a private address
    refused = policy.check("pypi.example", 443, resolve)
    assert (refused.reason, refused.hint) == ("only the model endpoint is allowed", ALLOW_HINT)
    assert resolve.calls == ["models.example"]  # a refused name is not resolved: DNS is no side channel
    assert not policy.check("models.example", 80, resolve).allowed
    assert model_endpoint("http://127.0.0.1:8080") == ("127.0.0.1", 8080) and model_endpoint("") is None


# The proxy over its Unix socket, against a real loopback origin.

def test_forwarded_get_reaches_an_allowed_origin_without_proxy_headers(origin, run_proxy):
    proxy, path, refusals, connects, _ = run_proxy(allow_origin(origin))
    port = origin.server_address[1]
    answer = ask(path, f"GET http://127.0.0.1:{port}/hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                       "Authorization: Bearer upstream-token\r\nProxy-Authorization: Basic cHJveHk=\r\n"
                       "Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhello from the loopback origin")
    assert b"\r\nConnection: close\r\n" in answer
    path_seen, headers = origin.seen[-1]
    assert path_seen == "/hello?x=1" and headers["authorization"] == "Bearer upstream-token"
    assert headers["connection"] == "close" and not {"proxy-authorization", "proxy-connection", "x-hop"} & set(headers)
    assert [call[:2] for call in connects.calls] == [(ipaddress.ip_address("127.0.0.1"), port)] and not refusals


def test_connect_tunnel_and_request_bodies_reach_an_allowed_origin(origin, run_proxy):
    proxy, path, _, _, _ = run_proxy(allow_origin(origin))
    target = f"127.0.0.1:{origin.server_address[1]}"
    with tunnel(path, target) as sock:
        sock.sendall(f"GET /through-the-tunnel HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    assert answer.endswith(b"hello from the loopback origin") and origin.seen[-1][0] == "/through-the-tunnel"
    body = os.urandom(3 << 20)
    answer = ask(path, f"POST http://{target}/upload HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    assert answer.endswith(f"received {len(body)} bytes".encode())
    answer = ask(path, f"GET http://{target}/big HTTP/1.1\r\n\r\n".encode())
    assert answer.endswith(BIG) and len(answer.partition(b"\r\n\r\n")[2]) == len(BIG)
    stats = proxy.stats()
    assert stats["connections"] == 3 and stats["bytes_down"] > len(BIG) and stats["bytes_up"] > len(body)


def test_refused_destination_gets_403_one_line_and_one_callback_per_host(run_proxy):
    proxy, path, refusals, connects, _ = run_proxy(EgressPolicy())
    for _ in range(2):
        answer = ask(path, b"GET http://10.0.0.5/latest HTTP/1.1\r\nHost: 10.0.0.5\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert answer.partition(b"\r\n\r\n")[2] == (b"blocked by the bot's network policy: 10.0.0.5 is a private "
                                                    b"address; an administrator can allow it with "
                                                    b"CODEBUDDY_EGRESS_ALLOW\n")
    assert ask(path, b"CONNECT 169.254.169.254:443 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 403 ")
    upload = b"POST http://10.0.0.5/up HTTP/1.1\r\nContent-Length: 2000000\r\n\r\n" + bytes(2000000)
    assert ask(path, upload).startswith(b"HTTP/1.1 403 ")  # the unread upload does not cost the client its answer
    assert refusals == [("task-7", "10.0.0.5", "10.0.0.5 is a private address"),
                        ("task-7", "169.254.169.254", "169.254.169.254 is a link-local address")]
    assert connects.calls == [] and proxy.stats()["refusals"] == 4


@pytest.mark.parametrize("host", ["127.1", "0x7f000001", "2130706433", "0177.0.0.1", "[::ffff:127.0.0.1]",
                                  "0.0.0.0", "localhost"])
def test_every_spelling_of_this_machine_is_refused_in_public_mode(run_proxy, host):
    _, path, refusals, connects, _ = run_proxy(EgressPolicy())
    for request in (f"GET http://{host}/ HTTP/1.1\r\n\r\n", f"CONNECT {host}:443 HTTP/1.1\r\n\r\n"):
        answer = ask(path, request.encode())
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"is a loopback address" in answer or b"'this network'" in answer
    assert connects.calls == [] and len(refusals) == 1


def test_other_ports_are_refused_before_any_lookup(run_proxy):
    _, path, refusals, connects, lookups = run_proxy(EgressPolicy())
    answer = ask(path, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n")
    assert answer.endswith(b"port 22 is not allowed (only 80 and 443); an administrator can allow it with "
                           b"CODEBUDDY_EGRESS_ALLOW\n")
    assert ask(path, b"GET http://pypi.example:8080/ HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 403 ")
    assert connects.calls == [] and lookups.calls == []


def test_no_header_or_body_reaches_logs_or_callbacks(origin, run_proxy, caplog):
    caplog.set_level(logging.DEBUG, logger="codebuddy")
    _, path, refusals, _, _ = run_proxy(allow_origin(origin))
    secrets = b"Authorization: Bearer sk-SECRET-TOKEN\r\nCookie: session=SECRET-COOKIE\r\n"
    port = origin.server_address[1]
    ask(path, f"GET http://127.0.0.1:{port}/ok HTTP/1.1\r\n".encode() + secrets + b"\r\n")
    ask(path, b"POST http://10.0.0.5/x HTTP/1.1\r\nContent-Length: 11\r\n" + secrets + b"\r\nSECRET-BODY")
    ask(path, b"GET http://10.0.0.6/x HTTP/1.1\r\nX-Bad header\r\n" + secrets + b"\r\n")
    logged = caplog.text + repr(refusals)
    assert "egress task-7: GET 127.0.0.1" in logged and "refused 10.0.0.5:80" in logged
    assert "SECRET" not in logged


@pytest.mark.parametrize("request_bytes", [b"hello\r\n\r\n", b"GET /relative HTTP/1.1\r\n\r\n",
                                           b"GET https://example.com/ HTTP/1.1\r\n\r\n",
                                           b"CONNECT no-port HTTP/1.1\r\n\r\n", b"GET http://a b/ HTTP/1.1\r\n\r\n",
                                           b"GET http://x/ HTTP/1.1\r\n folded\r\n\r\n"])
def test_unreadable_requests_get_400(run_proxy, request_bytes):
    proxy, path, _, connects, _ = run_proxy(EgressPolicy())
    assert ask(path, request_bytes).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert proxy.stats()["bad_requests"] == 1 and connects.calls == []


def test_final_response_head_says_connection_close_and_1xx_heads_pass():
    heads = ResponseHeads()
    stream = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
              b"Content-Length: 2\r\n\r\nhi")
    out = b"".join(heads.feed(stream[i:i + 3]) for i in range(0, len(stream), 3)) + heads.flush()
    assert out == b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"


def test_a_run_over_its_connection_cap_gets_503(origin, run_proxy):
    proxy, path, _, _, _ = run_proxy(allow_origin(origin), max_connections_per_listener=1)
    with tunnel(path, f"127.0.0.1:{origin.server_address[1]}"):
        assert ask(path, b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    assert proxy.stats()["busy"] == 1


def test_closing_a_listener_ends_its_tunnels_and_removes_the_socket(origin, run_proxy):
    proxy, path, _, _, _ = run_proxy(allow_origin(origin))
    with tunnel(path, f"127.0.0.1:{origin.server_address[1]}") as sock:
        proxy.close_listener(path)
        assert sock.recv(1) == b""
    assert not os.path.exists(path) and proxy.stats()["listeners"] == 0


def test_an_idle_tunnel_is_closed(origin, run_proxy):
    _, path, _, _, _ = run_proxy(allow_origin(origin), idle_timeout=0.3)
    with tunnel(path, f"127.0.0.1:{origin.server_address[1]}") as sock:
        started = time.monotonic()
        assert sock.recv(1) == b"" and time.monotonic() - started < 5


# A run's own network namespace (made by its child before bwrap), its listeners served by the bot's proxy.

def jailed(network: JailNetwork, run_id: str, script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`sh -c script` in a bwrap jail in the run's network namespace, as the bot starts a run."""
    network.open(run_id)
    argv = [bwrap_path(), "--unshare-user", "--cap-drop", "ALL", "--ro-bind", "/", "/", "--dev", "/dev",
            "--proc", "/proc", "--bind", str(tmp_path), str(tmp_path), "--", "sh", "-c", script]
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                              preexec_fn=network.preexec(run_id))
    finally:
        network.close_run(run_id)


def test_a_jailed_command_reaches_the_origin_only_through_the_proxy(origin, tmp_path):
    network = JailNetwork(allow_origin(origin))
    url = f"http://127.0.0.1:{origin.server_address[1]}/from-the-jail"
    script = (f"curl -sS -x http://127.0.0.1:3128 {url}; echo; curl -sS -x http://127.0.0.1:3128 http://10.0.0.5/;"
              f" curl -sS --max-time 5 --noproxy '*' {url}; echo direct=$?;"
              " tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
    try:
        result = jailed(network, "run-a", script, tmp_path)
    finally:
        network.close()
    lines = result.stdout.splitlines()
    assert lines[0] == "hello from the loopback origin", result
    assert lines[1].startswith("blocked by the bot's network policy: 10.0.0.5 is a private address")
    assert lines[2] == "direct=7" and "Failed to connect to 127.0.0.1" in result.stderr  # no host loopback inside
    assert lines[3:] == ["lo"]  # the namespace's only interface
    assert origin.seen[-1][0] == "/from-the-jail"
    assert network.stats()["listeners"] == 0  # released with the run


def test_a_loopback_model_is_tunnelled_and_nothing_else_on_loopback_is(origin, tmp_path):
    port = origin.server_address[1]
    network = JailNetwork(EgressPolicy.from_settings("model", base_url=f"http://127.0.0.1:{port}/v1"),
                          base_url=f"http://127.0.0.1:{port}/v1")
    with socket.socket() as other:  # another service on the host's loopback
        other.bind(("127.0.0.1", 0))
        other.listen(1)
        script = (f"curl -sS --noproxy '*' http://127.0.0.1:{port}/model; echo; "
                  f"curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{other.getsockname()[1]}/; echo other=$?")
        try:
            result = jailed(network, "run-m", script, tmp_path)
        finally:
            network.close()
    assert result.stdout.splitlines() == ["hello from the loopback origin", "other=7"], result
    assert origin.seen[-1][0] == "/model"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the run as another uid")
def test_a_bot_that_is_not_root_gets_the_same_namespace_through_a_user_namespace(origin, tmp_path):
    """Production runs the bot as its own user: the child unshares a user namespace first. Started here as an unused
    uid, with a copy of bwrap that uid can run and no bind of the test's (root-only) directories."""
    uid = 47000 + os.getpid() % 1000
    scratch = Path(tempfile.mkdtemp(prefix="egress-nonroot-", dir="/tmp"))
    try:
        scratch.chmod(0o755)
        bwrap = scratch / "bwrap"
        shutil.copy(bwrap_path(), bwrap)
        network = JailNetwork(allow_origin(origin))
        network.open("run-u")
        url = f"http://127.0.0.1:{origin.server_address[1]}/not-root"
        script = (f"id -u; curl -sS -x http://127.0.0.1:3128 {url}; echo; curl -sS --max-time 5 --noproxy '*' {url};"
                  " echo direct=$?; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '")
        argv = [str(bwrap), "--unshare-user", "--cap-drop", "ALL", "--ro-bind", "/", "/", "--dev", "/dev",
                "--proc", "/proc", "--", "sh", "-c", script]
        step, prctl = network.preexec("run-u"), ctypes.CDLL(None, use_errno=True).prctl

        def as_a_bot_started_as_that_user() -> None:
            prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: changing uid in this process cleared it (an exec would not)
            step()

        try:
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", user=uid, group=uid,
                                    extra_groups=[], env={"PATH": os.defpath}, preexec_fn=as_a_bot_started_as_that_user)
        finally:
            network.close()
    finally:
        shutil.rmtree(scratch)
    assert result.stdout.splitlines() == [str(uid), "hello from the loopback origin", "direct=7", "lo"], result
    assert origin.seen[-1][0] == "/not-root"


def test_a_run_whose_namespace_cannot_be_made_does_not_start(origin, tmp_path, caplog, monkeypatch):
    network = JailNetwork(allow_origin(origin))
    def refused(flags: int) -> int:  # what unshare answers where user namespaces are off for the bot's user
        ctypes.set_errno(errno.EPERM)
        return -1

    monkeypatch.setattr("codebuddy.jail_netns._unshare", refused)
    caplog.set_level(logging.ERROR, "sandbox")
    with pytest.raises(subprocess.SubprocessError):
        jailed(network, "run-x", "echo started", tmp_path)
    network.close()
    assert "无法为 CodeBuddy 运行建立网络命名空间: [Errno 1] unshare: Operation not permitted" in caplog.text
