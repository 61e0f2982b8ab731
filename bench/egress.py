"""Benchmark of the egress proxy: a 100 MB download from a loopback server, direct and through the proxy.

Paths: direct (TCP to the server), proxy (absolute-form GET on the proxy's Unix socket), tunnel (CONNECT on the
Unix socket, then GET), listener (absolute-form GET on a TCP listener the proxy serves, as a run's listener in its
network namespace is served). The server sends with sendfile; the client is a separate process reading into a 1 MiB
buffer, timed from its connect to the last byte. Prints the median seconds per path and the throughput ratio
proxy/direct (the target is at least 0.5). Not part of the test run:

    .venv/bin/python bench/egress.py [--rounds 5] [--megabytes 100]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codebuddy.egress import EgressPolicy  # noqa: E402
from codebuddy.egress_proxy import EgressProxy  # noqa: E402


def serve_file(listener: socket.socket, path: str) -> None:
    """Answer every GET on `listener` with the file at `path`, sent with sendfile (so the server costs little)."""
    size = os.path.getsize(path)
    while True:
        client, _ = listener.accept()
        with client, open(path, "rb") as handle:
            head = b""
            while b"\r\n\r\n" not in head:
                head += client.recv(65536)
            client.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            client.sendfile(handle)


def fetch(address: str, request: bytes, connect_first: bytes) -> float:
    """Seconds to send `request` to `address` (host:port or a socket path) and read the answer to its end."""
    started = time.perf_counter()
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    else:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)))
    view = memoryview(bytearray(1 << 20))
    with sock:
        if connect_first:
            sock.sendall(connect_first)
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(1)
        sock.sendall(request)
        total = 0
        while received := sock.recv_into(view):
            total += received
    elapsed = time.perf_counter() - started
    print(f"{elapsed} {total}")
    return elapsed


def run_client(address: str, request: bytes, connect_first: bytes = b"") -> tuple[float, int]:
    """`fetch` in a separate process, so the client does not share the proxy's interpreter."""
    argv = [sys.executable, __file__, "--fetch", address, request.decode(), connect_first.decode()]
    seconds, total = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
    return float(seconds), int(total)


def main() -> None:
    """Start the server and the proxy; time each path; print the medians and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--fetch", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fetch:
        address, request, connect_first = args.fetch
        fetch(address, request.encode(), connect_first.encode())
        return
    with tempfile.TemporaryDirectory(prefix="egress-bench-") as scratch:
        payload = os.path.join(scratch, "payload")
        with open(payload, "wb") as handle:
            handle.write(os.urandom(args.megabytes * 1_000_000))
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        threading.Thread(target=serve_file, args=(listener, payload), daemon=True).start()
        proxy = EgressProxy(EgressPolicy.from_settings(allow=f"127.0.0.1:{port}"))
        proxy_socket = os.path.join(scratch, "proxy.sock")
        proxy.open_listener(proxy_socket, "bench")
        run_listener = socket.create_server(("127.0.0.1", 0))
        listener_port = run_listener.getsockname()[1]
        proxy.serve_listener("bench/0", run_listener, "bench")
        try:
            target = f"127.0.0.1:{port}"
            absolute = f"GET http://{target}/payload HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            origin = f"GET /payload HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            paths = {"direct": (target, origin, b""), "proxy": (proxy_socket, absolute, b""),
                     "tunnel": (proxy_socket, origin, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()),
                     "listener": (f"127.0.0.1:{listener_port}", absolute, b"")}
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.rounds):
                for name, (address, request, connect_first) in paths.items():
                    seconds, total = run_client(address, request, connect_first)
                    assert total > args.megabytes * 1_000_000, f"{name}: only {total} bytes"
                    times[name].append(seconds)
        finally:
            proxy.close()
    direct = statistics.median(times["direct"])
    print(f"{args.megabytes} MB from a loopback server, median of {args.rounds} rounds:")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:7} {median:7.3f} s  {args.megabytes / median:8.0f} MB/s  throughput vs direct "
              f"{direct / median:5.2f}")
    print(f"stats: {proxy.stats()}")


if __name__ == "__main__":
    main()
