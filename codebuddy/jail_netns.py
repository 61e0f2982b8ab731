"""A run's network namespace, made in its child process just before bwrap starts: loopback up, the run's listeners
bound in it and handed to the bot over a socket pair, so the bot's egress proxy accepts on them (no process of ours
runs in the jail).

A bot running as root unshares the network namespace alone; any other user first unshares a user namespace that
maps only its own uid and gid (bwrap, started next, makes the jail's own user namespace below it). Either way the
namespace is owned by a user namespace the jail's processes have no capability in: they cannot reconfigure it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
from collections.abc import Callable

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
MAX_LISTENERS = 8

# Looked up in the bot's process: the child runs between fork and exec, where loading a library is not safe.
_unshare = ctypes.CDLL(None, use_errno=True).unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_new_network() -> None:
    """Move this (single-threaded, freshly forked) process into a new network namespace with its loopback up."""
    uid, gid = os.geteuid(), os.getegid()
    if _unshare(CLONE_NEWNET if uid == 0 else CLONE_NEWUSER | CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare: {os.strerror(errno)} (user namespaces may be disabled on this host)")
    if uid != 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(control.fileno(), SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(control.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP listener on the namespace's loopback (`host`: 127.0.0.1 or ::1)."""
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind((host, port))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def child_step(channel: socket.socket, addresses: list[tuple[str, int]]) -> Callable[[], None]:
    """Popen's `preexec_fn` part: a new namespace, a listener on each of `addresses` in it, all sent over
    `channel` (or one line saying what failed, and the exception, which stops the run from starting)."""

    def step() -> None:
        listeners: list[socket.socket] = []
        try:
            enter_new_network()
            listeners = [bind_listener(host, port) for host, port in addresses]
            socket.send_fds(channel, [b"ok"], [listener.fileno() for listener in listeners])
        except OSError as exc:
            with contextlib.suppress(OSError):
                channel.send(f"error {exc}".encode(errors="replace")[:512])
            raise
        finally:
            for listener in listeners:
                listener.close()

    return step


class NotStarted(OSError):
    """The channel was closed before the run's child sent anything: it was released before it started."""


def receive_listeners(channel: socket.socket, count: int) -> list[socket.socket]:
    """The `count` listeners the run's child sent over `channel`; OSError with the child's own words if it failed,
    NotStarted if the channel was closed first."""
    message, fds, _, _ = socket.recv_fds(channel, 1024, MAX_LISTENERS, socket.MSG_CMSG_CLOEXEC)
    listeners = [socket.socket(fileno=fd) for fd in fds]
    if message == b"ok" and len(listeners) == count:
        return listeners
    for listener in listeners:
        listener.close()
    if not message:
        raise NotStarted("the run was released before it started")
    raise OSError(message.decode(errors="replace").removeprefix("error "))
