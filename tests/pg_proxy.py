"""A TCP proxy in front of the test PostgreSQL that a test can cut and restore: one bot process cut off from the task
DB (its network, not the DB, fails) while the others still reach it."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class PgProxy:
    """Forwards 127.0.0.1:<port> to the DB in `url`; `cut()` drops every connection and refuses new ones."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}"))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._open = True
        self._closed = False
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def cut(self) -> None:
        """Drop every connection; new ones are closed at once (like a host whose network to the DB is gone)."""
        with self._lock:
            self._open = False
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def restore(self) -> None:
        with self._lock:
            self._open = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if not self._open:
                    _close(client)
                    continue
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
