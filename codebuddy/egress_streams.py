"""A proxied connection's bytes, both ways: bodies and tunnels spliced through a pipe (the kernel moves the pages),
heads read through a buffer where the proxy rewrites a response's."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket

MAX_HEAD = 64 * 1024
PIPE_SIZE = 1024 * 1024  # what one splice moves; above the user's pipe budget the kernel gives less, still working
_SPLICE_FLAGS = 1 | 2  # SPLICE_F_MOVE | SPLICE_F_NONBLOCK
_F_SETPIPE_SZ = 1031
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's to consume; Upgrade too, since every request ends with its answer.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
              b"te", b"trailer", b"upgrade"}


def close_response_head(head: bytes) -> bytes:
    """A response head with its Connection and Keep-Alive headers replaced by `Connection: close`."""
    lines = head[:-4].split(b"\r\n")
    kept = [line for line in lines[1:] if line.partition(b":")[0].strip().lower() not in HOP_BY_HOP]
    return b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""])


class ResponseHeads:
    """Rewrites the final response head an origin sends (1xx heads pass as they are); after it, bytes pass untouched."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """Bytes from upstream in, bytes for the client out (held back while a head is incomplete)."""
        self.buffer += data
        out = []
        while not self.done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:  # not a head we can read: pass it on as it is
                    self.done = True
                break
            head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
            status = head.split(b" ", 2)[1:2]
            if status and status[0].startswith(b"1"):
                out.append(head)
                continue
            out.append(close_response_head(head))
            self.done = True
        if self.done:
            out.append(self.buffer)
            self.buffer = b""
        return b"".join(out)

    def flush(self) -> bytes:
        """What is still held back, at the end of the response."""
        rest, self.buffer, self.done = self.buffer, b"", True
        return rest


class Lane:
    """One direction of a connection: bytes from `src` to `dst`, never blocking. Once no head is left to rewrite,
    through a pipe with splice (the kernel moves the pages; no copy through the proxy), else through one buffer."""

    def __init__(self, src: socket.socket, dst: socket.socket, first: bytes = b"",
                 heads: ResponseHeads | None = None) -> None:
        self.src, self.dst, self.heads = src, dst, heads
        self.view: memoryview | None = None
        self.pending = memoryview(first)
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0  # bytes spliced into the pipe and not yet out of it
        self.eof = self.done = False
        self.sent = 0  # bytes delivered to dst, the request or response head as rewritten included

    @property
    def has_output(self) -> bool:
        return bool(self.pending) or self.in_pipe > 0

    def step(self) -> None:
        """Move what can move now: a few buffers' worth, then let the other direction have a turn."""
        for _ in range(8):
            try:
                if self.pending:
                    sent = self.dst.send(self.pending)
                    self.pending = self.pending[sent:]
                    self.sent += sent
                elif self.in_pipe:
                    sent = os.splice(self.pipe[0], self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS)
                    self.in_pipe -= sent
                    self.sent += sent
                elif self.eof:
                    break
                elif self.heads is None or self.heads.done:
                    self._splice_in()
                else:
                    self._read_head()
            except BlockingIOError:
                return
        if self.eof and not self.has_output and not self.done:
            self.done = True  # the source ended and all it sent is delivered: pass the end on
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)

    def _splice_in(self) -> None:
        if self.pipe is None:
            self.pipe = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.pipe[1], _F_SETPIPE_SZ, PIPE_SIZE)
        received = os.splice(self.src.fileno(), self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
        self.in_pipe = received
        if not received:
            self._end()

    def _read_head(self) -> None:
        if self.view is None:
            self.view = memoryview(bytearray(MAX_HEAD))
        received = self.src.recv_into(self.view)
        if not received:
            self._end()
        elif self.heads is not None:
            self.pending = memoryview(self.heads.feed(bytes(self.view[:received])))
        else:
            self.pending = self.view[:received]

    def _end(self) -> None:
        self.eof = True
        self.pending = memoryview(self.heads.flush() if self.heads else b"")

    def close(self) -> None:
        """Close the lane's pipe (the sockets are the connection's)."""
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None


def pump(lanes: tuple[Lane, Lane], idle_timeout: float, until_response_end: bool) -> None:
    """Copy both ways until both directions end (or, for a forwarded request, the response ends), an error, or
    `idle_timeout` seconds in which nothing could move."""
    poller = select.poll()
    sockets = {lanes[0].src.fileno(): lanes[0].src, lanes[0].dst.fileno(): lanes[0].dst}
    for sock in sockets.values():
        sock.setblocking(False)
    while not (lanes[1].done if until_response_end else lanes[0].done and lanes[1].done):
        masks = dict.fromkeys(sockets, 0)
        for lane in lanes:
            if lane.has_output:
                masks[lane.dst.fileno()] |= select.POLLOUT
            elif not lane.eof:
                masks[lane.src.fileno()] |= select.POLLIN
        for fd, mask in masks.items():
            if mask:
                poller.register(fd, mask)
            else:  # a closed peer we wait on for nothing would report POLLHUP in a busy loop
                with contextlib.suppress(KeyError):
                    poller.unregister(fd)
        if not poller.poll(idle_timeout * 1000):
            raise TimeoutError("idle")
        for lane in lanes:
            lane.step()
