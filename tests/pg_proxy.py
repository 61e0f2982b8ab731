"""A TCP proxy in front of the test PostgreSQL that a test can cut, black-hole and restore: one bot process cut off
from the task DB (its network, not the DB, fails) while the others still reach it."""

from __future__ import annotations

import socket
import threading
from urllib.parse import urlsplit, urlunsplit


class PgProxy:
    """Forwards 127.0.0.1:<port> to the DB in `url`; `cut()` drops every connection and refuses new ones;
    `black_hole()` stops forwarding without closing anything."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname or "127.0.0.1", parts.port or 5432)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{self.port}"))
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._open = True
        self._silent = False  # black-holed: new connections are accepted and never answered
        self._silenced: set[socket.socket] = set()  # the sockets whose bytes are dropped, for good
        self._closed = False
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def cut(self) -> None:
        """Drop every connection; new ones are closed at once (like a host whose network to the DB is gone)."""
        with self._lock:
            self._open = False
            sockets, self._sockets = self._sockets, []
            self._silenced.clear()
        for sock in sockets:
            _close(sock)

    def black_hole(self) -> None:
        """Stop forwarding: every byte either way is dropped and nothing is closed; new connections are accepted
        and never answered. As a stateful firewall that lost its state: the connections open now stay silent even
        after `restore()` (only their own timeouts end them); new ones work again then."""
        with self._lock:
            self._silent = True
            self._silenced.update(self._sockets)

    def restore(self) -> None:
        with self._lock:
            self._open = True
            self._silent = False

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
                if self._silent:  # the client's connect completes (the kernel answers it); nothing more does
                    self._sockets.append(client)
                    self._silenced.add(client)
                    threading.Thread(target=self._pump, args=(client, None), daemon=True).start()
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
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket | None) -> None:
        try:
            while data := source.recv(65536):
                if sink is not None and source not in self._silenced:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(source)
            if sink is not None:
                _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
