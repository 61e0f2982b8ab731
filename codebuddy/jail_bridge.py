"""Inside a run's jail: forwards TCP connections on its loopback to the bot's proxy socket, then runs the command.

Usage: python3 jail_bridge.py --listen 127.0.0.1:PORT --unix /path/in/jail.sock [-- COMMAND ARGS...]

Standard library only, and nothing of the project: it runs under the bot's interpreter inside the jail. With a
command, the listener is bound first, a child serves the bridge, and this process becomes the command (same pid,
same stdin and stdout); the child dies with it and holds none of its pipes. Without one, it serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import socket
import sys
import threading

BUFFER = 256 * 1024
MAX_CONNECTIONS = 128  # the proxy caps a run lower; this only keeps the bridge's own threads bounded


def copy(src: socket.socket, dst: socket.socket, finished: threading.Semaphore, drain: bool) -> None:
    """Copy src to dst until src ends, then pass the end on. If dst fails: with `drain` (the client's side) keep
    reading src so the client can still read the proxy's answer (closing a TCP socket with unread input resets it);
    without, end both directions at once."""
    view = memoryview(bytearray(BUFFER))
    open_dst = True
    try:
        while received := src.recv_into(view):
            if open_dst:
                try:
                    dst.sendall(view[:received])
                except OSError:
                    if not drain:
                        raise
                    open_dst = False
        if open_dst:
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):  # wakes the other direction's recv; closing alone would not
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        if not finished.acquire(blocking=False):  # the second direction to end closes both sockets
            src.close()
            dst.close()


def open_tunnel(upstream: socket.socket, target: str) -> bool:
    """Ask the proxy for a CONNECT tunnel to `target` (HOST:PORT); True once it answered 200."""
    upstream.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 16384:
        chunk = upstream.recv(4096)
        if not chunk:
            return False
        head += chunk
    return head.split(b" ", 2)[1:2] == [b"200"] and head.endswith(b"\r\n\r\n")


def bridge(client: socket.socket, unix_path: str, slots: threading.BoundedSemaphore, tunnel: str = "") -> None:
    """Forward one accepted TCP connection to a new connection on the Unix socket, both ways (through a CONNECT
    tunnel to `tunnel` first, for a client that does not use the proxy: the CLI goes direct to a loopback model)."""
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(unix_path)
        if tunnel and not open_tunnel(upstream, tunnel):
            raise OSError("the proxy refused the tunnel")
    except OSError:
        upstream.close()
        client.close()
        slots.release()
        return
    finished = threading.Semaphore(1)
    answers = threading.Thread(target=copy, args=(upstream, client, finished, False), daemon=True)
    answers.start()
    copy(client, upstream, finished, True)
    answers.join()
    slots.release()


def serve(listener: socket.socket, unix_path: str, slots: threading.BoundedSemaphore, tunnel: str = "") -> None:
    """Accept on the TCP listener forever, one pair of threads per connection."""
    while True:
        client, _ = listener.accept()
        if not slots.acquire(blocking=False):
            client.close()
            continue
        threading.Thread(target=bridge, args=(client, unix_path, slots, tunnel), daemon=True).start()


def bind(address: str) -> socket.socket:
    """A TCP listener on HOST:PORT (an IPv6 host in brackets or bare)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    return listener


def serve_all(listener: socket.socket, tunnels: list[tuple[socket.socket, str]], unix_path: str) -> None:
    """Serve the proxy listener and each tunnel listener (one thread each), sharing one connection cap."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    for tunnel_listener, target in tunnels:
        threading.Thread(target=serve, args=(tunnel_listener, unix_path, slots, target), daemon=True).start()
    serve(listener, unix_path, slots)


def end_with(parent_exit: int) -> None:
    """End this process as soon as the command's process does (`parent_exit`: a pidfd of it)."""
    select.select([parent_exit], [], [])
    os._exit(0)


def main(argv: list[str]) -> int:
    """Bind, then serve (no command) or fork a bridge and become the command."""
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    else:
        command = []
    parser = argparse.ArgumentParser(prog="jail_bridge.py")
    parser.add_argument("--listen", required=True, help="HOST:PORT on the jail's loopback")
    parser.add_argument("--unix", required=True, help="the proxy's Unix socket, as the jail sees it")
    parser.add_argument("--tunnel", action="append", default=[],
                        help="HOST:PORT on the jail's loopback tunnelled (CONNECT) to the same HOST:PORT via the proxy")
    args = parser.parse_args(argv)
    listener = bind(args.listen)
    tunnels = [(bind(target), target) for target in args.tunnel]
    if not command:
        serve_all(listener, tunnels, args.unix)
        return 0
    # The bridge is not the command's child: forked twice, it is nobody's tool (a turn's clean-up ends every
    # process below the CLI), and it ends when the command's process does (a pidfd of it).
    parent_exit = os.pidfd_open(os.getpid())
    first = os.fork()
    if first == 0:
        try:
            if os.fork() == 0:
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):  # the bot waits for EOF on the command's pipes: hold none of them
                    os.dup2(devnull, fd)
                threading.Thread(target=end_with, args=(parent_exit,), daemon=True).start()
                serve_all(listener, tunnels, args.unix)
        finally:
            os._exit(0)
    os.waitpid(first, 0)
    os.close(parent_exit)
    listener.close()
    for tunnel_listener, _ in tunnels:
        tunnel_listener.close()
    try:
        os.execvp(command[0], command)
    except OSError as exc:  # worded as bwrap words it, which the bot recognises (codebuddy/cli_setup.py)
        print(f"bwrap: execvp {command[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
