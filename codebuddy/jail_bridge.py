"""Inside a run's jail: forwards TCP connections on its loopback to the bot's proxy socket, then runs the command.

Usage: python3 jail_bridge.py --listen 127.0.0.1:PORT --unix /path/in/jail.sock [-- COMMAND ARGS...]

Standard library only, and nothing of the project: it runs under the bot's interpreter inside the jail. With a
command, the listener is bound first, a child serves the bridge, and this process becomes the command (same pid,
same stdin and stdout); the child dies with it and holds none of its pipes. Without one, it serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading

BUFFER = 256 * 1024
MAX_CONNECTIONS = 128  # the proxy caps a run lower; this only keeps the bridge's own threads bounded
PR_SET_PDEATHSIG = 1


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


def bridge(client: socket.socket, unix_path: str, slots: threading.BoundedSemaphore) -> None:
    """Forward one accepted TCP connection to a new connection on the Unix socket, both ways."""
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(unix_path)
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


def serve(listener: socket.socket, unix_path: str) -> None:
    """Accept on the TCP listener forever, one pair of threads per connection."""
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while True:
        client, _ = listener.accept()
        if not slots.acquire(blocking=False):
            client.close()
            continue
        threading.Thread(target=bridge, args=(client, unix_path, slots), daemon=True).start()


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent (the command) exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the bridge outlives the command until the jail ends
    if os.getppid() != parent:  # the parent ended before the request took hold
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
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    if not command:
        serve(listener, args.unix)
        return 0
    parent = os.getpid()
    if os.fork() == 0:
        try:
            die_with_parent(parent)
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # the bot waits for EOF on the command's pipes: hold none of them
                os.dup2(devnull, fd)
            serve(listener, args.unix)
        finally:
            os._exit(0)
    listener.close()
    os.execvp(command[0], command)
    return 127  # not reached: execvp raises if the command cannot start


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
