"""A run's network: its own namespace with only its loopback, and the bot's egress proxy as the one way out.

Each jailed CLI process starts in a new network namespace made by its own child process just before bwrap
(jail_netns.py): the host's loopback, its abstract Unix sockets, other runs and the intranet are gone. The child
binds a listener on the namespace's 127.0.0.1:PROXY_PORT (and, for a model endpoint on loopback, on the model's
port) and hands it to the bot, whose egress proxy accepts on it; the run's HTTP(S)_PROXY point there
(docs/sandbox.md, "The network").
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from codebuddy import jail_netns
from codebuddy.egress import EgressPolicy
from codebuddy.egress_proxy import EgressProxy

log = logging.getLogger("sandbox")

PROXY_PORT = 3128
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def no_proxy_value(base_url: str) -> str:
    """NO_PROXY for a run: the jail's own loopback names, except the model's host (on loopback in tests, or an
    on-premises gateway): in the run's namespace only the proxy can reach it."""
    model_host = (urlsplit(base_url).hostname or "").lower() if base_url else ""
    return ",".join(name for name in LOOPBACK_NAMES if name != model_host)


class JailNetwork:
    """The egress proxy, and the listeners each jailed run's namespace hands it (one set per CLI process)."""

    def __init__(self, policy: EgressPolicy, *, base_url: str = "",
                 on_refusal: Callable[[str, str, str], None] | None = None) -> None:
        self.policy = policy
        self.base_url = base_url
        self.on_refusal = on_refusal  # (run id, host, reason), once per run and host
        self.proxy = EgressProxy(policy, self._refused)
        self._lock = threading.Lock()
        # run id: the bot's end of the channel, the child's end, the thread that takes the listeners to the proxy
        self._channels: dict[str, tuple[socket.socket, socket.socket, threading.Thread]] = {}

    def _refused(self, run_id: str, host: str, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(run_id, host, reason)
        else:
            log.warning("网络请求被拒绝 (egress refused): %s: %s run=%s", host, reason, run_id)

    def listeners(self) -> list[tuple[tuple[str, int], tuple[str, int] | None]]:
        """What a run's namespace listens on: (address, tunnel target). The proxy on PROXY_PORT; a model endpoint on
        loopback gets its own port tunnelled, since the CLI goes to a loopback host directly, whatever HTTP_PROXY
        says."""
        listeners: list[tuple[tuple[str, int], tuple[str, int] | None]] = [(("127.0.0.1", PROXY_PORT), None)]
        model = self.policy.model
        if model is not None and (model[0] in LOOPBACK_NAMES or model[0].startswith("127.")):
            target = ("::1", model[1]) if model[0] == "::1" else ("127.0.0.1", model[1])
            if target != listeners[0][0]:
                listeners.append((target, target))
        return listeners

    def open(self, run_id: str) -> None:
        """Get ready for `run_id`'s process: the channel its child hands the listeners over, and a thread that takes
        them to the proxy. The process must be started with `preexec(run_id)`; `close_run(run_id)` after."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        adopter = threading.Thread(target=self._adopt, args=(run_id, ours, theirs), name=f"netns-{run_id}",
                                   daemon=True)
        with self._lock:
            if run_id in self._channels:
                ours.close()
                theirs.close()
                raise ValueError(f"run {run_id} already has a network")
            self._channels[run_id] = (ours, theirs, adopter)
        adopter.start()

    def preexec(self, run_id: str) -> Callable[[], None]:
        """The part of the run's `preexec_fn` that makes its namespace and sends its listeners."""
        with self._lock:
            _ours, theirs, _adopter = self._channels[run_id]
        return jail_netns.child_step(theirs, [address for address, _tunnel in self.listeners()])

    def _adopt(self, run_id: str, ours: socket.socket, theirs: socket.socket) -> None:
        listeners = self.listeners()
        try:
            sockets = jail_netns.receive_listeners(ours, len(listeners))
        except jail_netns.NotStarted:
            return  # released before its process started
        except OSError as exc:
            log.error("无法为 CodeBuddy 运行建立网络命名空间: %s run=%s", exc, run_id)
            return
        finally:
            theirs.close()  # the child has it (or never will): the bot's copy goes
        for index, (sock, (_address, tunnel)) in enumerate(zip(sockets, listeners, strict=True)):
            try:
                self.proxy.serve_listener(f"{run_id}/{index}", sock, run_id, tunnel)
            except ValueError:
                sock.close()
        with self._lock:
            released = run_id not in self._channels
        if released:  # released while the listeners were on their way
            self._close_listeners(run_id, len(listeners))

    def environment(self) -> dict[str, str]:
        """The proxy variables every run gets (both cases), replacing any the operator's environment held."""
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
        no_proxy = no_proxy_value(self.base_url)
        return {**dict.fromkeys(PROXY_VARIABLES, proxy), "NO_PROXY": no_proxy, "no_proxy": no_proxy}

    def close_run(self, run_id: str) -> None:
        """Close `run_id`'s listeners and whatever connections they still have open."""
        with self._lock:
            channel = self._channels.pop(run_id, None)
        if channel is not None:
            ours, _theirs, adopter = channel
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)  # wakes the adopting thread if nothing came
            adopter.join(timeout=5)
            ours.close()
        self._close_listeners(run_id, jail_netns.MAX_LISTENERS)  # however many it had (the policy may change)

    def _close_listeners(self, run_id: str, count: int) -> None:
        for index in range(count):
            self.proxy.close_listener(f"{run_id}/{index}")  # a key with no listener is nothing to do

    def close(self) -> None:
        with self._lock:
            runs = list(self._channels)
        for run_id in runs:
            self.close_run(run_id)
        self.proxy.close()

    def stats(self) -> dict[str, int]:
        """The proxy's counters (connections, refusals, bytes, …)."""
        return self.proxy.stats()
