"""The bot's egress proxy: HTTP forwarding and CONNECT tunnels for each run, on listeners of that run's own (a TCP
listener in the run's network namespace, or a Unix socket), and plain tunnels to one fixed address."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from codebuddy.egress import EgressPolicy, IPAddress, Resolver, Verdict, resolve_addresses
from codebuddy.egress_streams import HOP_BY_HOP, MAX_HEAD, Lane, ResponseHeads, pump

log = logging.getLogger(__name__)

MAX_REMEMBERED_REFUSALS = 1024  # hosts per listener the refusal callback has seen; bounds what a run can make us hold
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
_STATUS = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway", 503: "Service Unavailable"}
_HOST_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789.-_:")

Connector = Callable[[IPAddress, int, float], socket.socket]
RefusalCallback = Callable[[str, str, str], None]


class BadRequest(ValueError):
    """A request the proxy cannot read; the client gets 400 with the message."""


def connect_tcp(ip: IPAddress, port: int, timeout: float) -> socket.socket:
    """A TCP connection to an address the policy checked: an address, never a name, so nothing is looked up twice."""
    return socket.create_connection((str(ip), port), timeout=timeout)


@dataclass(frozen=True)
class Request:
    """What a client asked for: CONNECT, an absolute-form HTTP request (with the head to send upstream), or TUNNEL
    (a connection to a tunnel listener: its fixed address, nothing read first)."""

    method: str
    host: str
    port: int
    upstream_head: bytes = b""  # empty for CONNECT and TUNNEL


def read_head(sock: socket.socket, timeout: float) -> tuple[bytes, bytes]:
    """The request head through its blank line, and any bytes that came after it, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise BadRequest("request head too large")
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(MAX_HEAD)
        if not chunk:
            raise BadRequest("connection closed before the request head ended")
        data += chunk
    end = data.index(b"\r\n\r\n") + 4
    return data[:end], data[end:]


def _host_port(hostname: str | None, port: int | None) -> tuple[str, int]:
    if not hostname or not set(hostname) <= _HOST_CHARS or port is None or not 0 < port < 65536:
        raise BadRequest("the request names no usable host and port")
    return hostname, port


def parse_request(head: bytes) -> Request:
    """Read `CONNECT host:port` or `METHOD http://host[:port]/path`; the latter gets an origin-form head without the
    hop-by-hop and Proxy-* headers and with `Connection: close`."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise BadRequest("not an HTTP/1.x request line")
    try:
        method, target, version = (part.decode("ascii") for part in parts)
        if method == "CONNECT":
            url = urlsplit(f"//{target}")
            return Request(method, *_host_port(url.hostname, url.port))
        url = urlsplit(target)
        if url.scheme.lower() != "http":
            raise BadRequest("the proxy takes CONNECT or absolute http:// URLs")
        host, port = _host_port(url.hostname, url.port or 80)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest(str(exc) if isinstance(exc, BadRequest) else "unreadable request target") from None
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise BadRequest("malformed header line")
        headers.append((name.lower(), line, value))
    dropped = set(HOP_BY_HOP)
    for name, _line, value in headers:
        if name == b"connection":  # headers a client lists in Connection are hop-by-hop too
            dropped.update(token.strip().lower() for token in value.split(b","))
    kept = [line for name, line, _value in headers if name not in dropped and not name.startswith(b"proxy-")]
    if not any(name == b"host" for name, _line, _value in headers):
        kept.insert(0, b"Host: " + url.netloc.rpartition("@")[2].encode("ascii"))
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    upstream = [f"{method} {path} {version}".encode("ascii"), *kept, b"Connection: close", b"", b""]
    return Request(method, host, port, b"\r\n".join(upstream))


@dataclass
class _Listener:
    key: str
    label: str
    sock: socket.socket
    tunnel: tuple[str, int] | None = None  # every connection goes to this host and port, no request read first
    unix_path: str = ""  # a Unix socket's file, removed with the listener
    active: dict[socket.socket, list[socket.socket]] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)
    closed: bool = False


class EgressProxy:
    """Serves each run's listener: forwards what `policy` allows, answers 403 with a readable line otherwise, and
    reports each refused host once per run to `on_refusal(label, host, reason)`. Logs host, port and reason only."""

    def __init__(self, policy: EgressPolicy, on_refusal: RefusalCallback | None = None, *,
                 resolve: Resolver = resolve_addresses, connect: Connector = connect_tcp,
                 max_connections_per_listener: int = 64, max_connections: int = 512,
                 connect_timeout: float = 10.0, idle_timeout: float = 300.0, head_timeout: float = 30.0) -> None:
        self.policy = policy  # replaceable while running: each request reads it once
        self.on_refusal = on_refusal
        self.resolve, self.connect = resolve, connect
        self.max_connections_per_listener, self.max_connections = max_connections_per_listener, max_connections
        self.connect_timeout, self.idle_timeout, self.head_timeout = connect_timeout, idle_timeout, head_timeout
        self._lock = threading.Lock()
        self._listeners: dict[str, _Listener] = {}
        self._counters = dict.fromkeys(("connections", "refusals", "busy", "bad_requests", "upstream_errors",
                                        "bytes_up", "bytes_down"), 0)

    def open_listener(self, path: str, label: str) -> None:
        """Listen on a new Unix socket at `path` (mode 0600) for one run; `label` (its task or run id) tags logs."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):  # a stale socket from a bot that died; anything else stays
                os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._add(_Listener(path, label, sock, unix_path=path))

    def serve_listener(self, key: str, sock: socket.socket, label: str,
                       tunnel: tuple[str, int] | None = None) -> None:
        """Serve a listening socket made elsewhere (a run's, in its own network namespace) under `key`; with
        `tunnel`, each connection is a tunnel to that host and port, judged by the policy like a CONNECT."""
        self._add(_Listener(key, label, sock, tunnel=tunnel))

    def _add(self, listener: _Listener) -> None:
        with self._lock:
            if listener.key in self._listeners:
                listener.sock.close()
                raise ValueError(f"{listener.key} already has a listener")
            self._listeners[listener.key] = listener
        threading.Thread(target=self._accept, args=(listener,), name=f"egress-{listener.label}", daemon=True).start()

    def close_listener(self, key: str) -> None:
        """Stop the listener `key` (a Unix socket's path: its file is removed) and end its open connections."""
        with self._lock:
            listener = self._listeners.pop(key, None)
            if listener is None:
                return
            listener.closed = True
            for sock in [listener.sock, *(sock for socks in listener.active.values() for sock in socks)]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the accept and the pumps; their threads close
        if listener.unix_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listener.unix_path)

    def close(self) -> None:
        """Close every listener."""
        with self._lock:
            keys = list(self._listeners)
        for key in keys:
            self.close_listener(key)

    def stats(self) -> dict[str, int]:
        """Counters since start (connections, refusals, busy, bad_requests, upstream_errors, bytes_up, bytes_down)
        and what is open now (listeners, active)."""
        with self._lock:
            active = sum(len(listener.active) for listener in self._listeners.values())
            return {**self._counters, "listeners": len(self._listeners), "active": active}

    def _accept(self, listener: _Listener) -> None:
        while True:
            try:
                client, _ = listener.sock.accept()
            except OSError:
                break
            with self._lock:
                if listener.closed:
                    client.close()
                    break
                active = sum(len(other.active) for other in self._listeners.values())
                busy = len(listener.active) >= self.max_connections_per_listener or active >= self.max_connections
                self._counters["busy" if busy else "connections"] += 1
                if not busy:
                    listener.active[client] = [client]
            if busy:
                log.warning("egress %s: too many connections, answered 503", listener.label)
                self._answer(client, 503, "too many connections through the bot's proxy for this run; try again", 0)
                client.close()
                continue
            threading.Thread(target=self._serve, args=(listener, client), daemon=True,
                             name=f"egress-{listener.label}-conn").start()
        listener.sock.close()

    def _serve(self, listener: _Listener, client: socket.socket) -> None:
        host, port, lanes = "-", 0, None
        try:
            try:
                if listener.tunnel is not None:
                    rest, request = b"", Request("TUNNEL", *listener.tunnel)
                else:
                    head, rest = read_head(client, self.head_timeout)
                    request = parse_request(head)
                host, port = request.host, request.port
                verdict = self.policy.check(host, port, self.resolve)
            except BadRequest as exc:
                return self._fail(client, listener, "bad_requests", 400, f"bad request: {exc}")
            except ValueError:  # getaddrinfo's own complaints about a name (too long, bad label)
                return self._fail(client, listener, "bad_requests", 400, f"bad request: cannot look up {host}")
            except TimeoutError:
                return
            except OSError:
                if host == "-":
                    return  # the client left before it asked for anything
                return self._fail(client, listener, "upstream_errors", 502, f"could not resolve {host}")
            if not verdict.allowed:
                if listener.tunnel is not None:  # a raw tunnel has no HTTP to answer in: it is closed
                    return self._note_refusal(listener, host, port, verdict)
                return self._refuse(client, listener, host, port, verdict)
            try:
                upstream = self._connect(verdict, port)
            except OSError as exc:
                text = f"could not connect to {host}:{port}: {exc.strerror or exc.__class__.__name__}"
                return self._fail(client, listener, "upstream_errors", 502, text)
            with self._lock:
                listener.active[client].append(upstream)
                if listener.closed:
                    return
            log.debug("egress %s: %s %s:%d", listener.label, request.method, host, port)
            if request.method in ("CONNECT", "TUNNEL"):
                if request.method == "CONNECT":
                    client.sendall(ESTABLISHED)
                lanes = (Lane(client, upstream, rest), Lane(upstream, client))
            else:
                lanes = (Lane(client, upstream, request.upstream_head + rest), Lane(upstream, client, b"",
                                                                                     ResponseHeads()))
            pump(lanes, self.idle_timeout, until_response_end=request.method not in ("CONNECT", "TUNNEL"))
        except OSError as exc:
            log.debug("egress %s: %s:%d ended: %s", listener.label, host, port, exc.__class__.__name__)
        finally:
            with self._lock:
                for sock in listener.active.pop(client, [client]):
                    sock.close()
                if lanes:
                    self._counters["bytes_up"] += lanes[0].sent
                    self._counters["bytes_down"] += lanes[1].sent
            for lane in lanes or ():
                lane.close()

    def _connect(self, verdict: Verdict, port: int) -> socket.socket:
        error: OSError = OSError("no address")
        for ip in verdict.addresses:  # the addresses the policy judged, in the resolver's order
            try:
                return self.connect(ip, port, self.connect_timeout)
            except OSError as exc:
                error = exc
        raise error

    def _refuse(self, client: socket.socket, listener: _Listener, host: str, port: int, verdict: Verdict) -> None:
        self._note_refusal(listener, host, port, verdict)
        self._answer(client, 403, verdict.message())

    def _note_refusal(self, listener: _Listener, host: str, port: int, verdict: Verdict) -> None:
        """Count a refusal; tell `on_refusal` the first time this listener is refused this host."""
        with self._lock:
            self._counters["refusals"] += 1
            first = host not in listener.refused and len(listener.refused) < MAX_REMEMBERED_REFUSALS
            if first:
                listener.refused.add(host)
        log.debug("egress %s: refused %s:%d: %s", listener.label, host, port, verdict.reason)
        if first and self.on_refusal:
            try:
                self.on_refusal(listener.label, host, verdict.reason)
            except Exception:
                log.exception("egress %s: the refusal callback failed", listener.label)

    def _fail(self, client: socket.socket, listener: _Listener, counter: str, status: int, text: str) -> None:
        with self._lock:
            self._counters[counter] += 1
        log.debug("egress %s: %d %s", listener.label, status, text)
        self._answer(client, status, text)

    @staticmethod
    def _answer(client: socket.socket, status: int, text: str, linger: float = 2.0) -> None:
        """Send a short answer, then read what the client still sends for up to `linger` seconds (0: what is there
        already): closing a socket with unread input makes the peer's read fail, and the answer would be lost."""
        body = f"{text}\n".encode()
        head = (f"HTTP/1.1 {status} {_STATUS[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        deadline = time.monotonic() + linger
        with contextlib.suppress(OSError):
            client.settimeout(5)
            client.sendall(head.encode("ascii") + body)
            client.shutdown(socket.SHUT_WR)
            for _ in range(64):  # at most 4 MiB of a refused upload
                client.settimeout(max(0.0, deadline - time.monotonic()))
                if not client.recv(MAX_HEAD):
                    break
