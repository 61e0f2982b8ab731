"""A run's network: its own namespace with only its loopback, and the bot's egress proxy as the one way out.

Each jailed CLI process gets `--unshare-net` (the host's loopback, its abstract Unix sockets, other runs and the
intranet are gone), a Unix socket of the bot's egress proxy bound in, and `jail_bridge.py` in front of the CLI:
it listens on the jail's 127.0.0.1:BRIDGE_PORT and forwards to that socket. The run's HTTP(S)_PROXY point there
(docs/sandbox.md, "The network").
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from urllib.parse import urlsplit

from codebuddy.egress import EgressPolicy
from codebuddy.egress_proxy import EgressProxy

log = logging.getLogger("sandbox")

BRIDGE_PORT = 3128
JAIL_DIR = "/run/codebuddy"  # inside the jail: the bridge script and the proxy's socket
JAIL_SOCKET = f"{JAIL_DIR}/egress.sock"
JAIL_BRIDGE = f"{JAIL_DIR}/jail_bridge.py"
BRIDGE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail_bridge.py")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def no_proxy_value(base_url: str) -> str:
    """NO_PROXY for a run: the jail's own loopback names, except the model's host (on loopback in tests, or an
    on-premises gateway): in the run's namespace only the proxy can reach it."""
    model_host = (urlsplit(base_url).hostname or "").lower() if base_url else ""
    return ",".join(name for name in LOOPBACK_NAMES if name != model_host)


class JailNetwork:
    """The egress proxy and the per-process sockets of every jailed run (one listener per CLI process)."""

    def __init__(self, policy: EgressPolicy, socket_dir: str = "", *, base_url: str = "",
                 on_refusal: Callable[[str, str, str], None] | None = None,
                 python: str = "", python_prefix: str = "") -> None:
        self.policy = policy
        # Short (a Unix socket path has at most 107 bytes) and the bot's own: 0700, never another user's.
        default_dir = os.path.join(tempfile.gettempdir(), f"codebuddy-egress-{os.getuid()}")
        self.socket_dir = os.path.abspath(socket_dir or default_dir)
        self.base_url = base_url
        self.on_refusal = on_refusal  # (run id, host, reason), once per run and host
        self.proxy = EgressProxy(policy, self._refused)
        # The bridge runs under the bot's own interpreter, from its read-only installation (not the bot's venv).
        self.python = python or os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        self.python_prefix = python_prefix or os.path.realpath(sys.base_prefix)

    def _refused(self, run_id: str, host: str, reason: str) -> None:
        if self.on_refusal is not None:
            self.on_refusal(run_id, host, reason)
        else:
            log.warning("网络请求被拒绝 (egress refused): %s: %s run=%s", host, reason, run_id)

    def socket_path(self, run_id: str) -> str:
        return os.path.join(self.socket_dir, f"{run_id}.sock")

    def open(self, run_id: str) -> list[str]:
        """Open `run_id`'s proxy socket; the bwrap arguments that give the jail its own network and the bridge."""
        os.makedirs(self.socket_dir, mode=0o700, exist_ok=True)
        info = os.lstat(self.socket_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise OSError(f"{self.socket_dir} is not a directory of the bot's user: remove it")
        os.chmod(self.socket_dir, 0o700)
        path = self.socket_path(run_id)
        self.proxy.open_listener(path, run_id)
        return ["--unshare-net", "--ro-bind", path, JAIL_SOCKET, "--ro-bind", BRIDGE_SCRIPT, JAIL_BRIDGE,
                "--ro-bind-try", self.python_prefix, self.python_prefix]  # before the jail's system paths (sandbox.py)

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` started behind the bridge (which becomes `argv`: same pid, same pipes). A model endpoint on
        loopback is tunnelled too: the CLI goes to a loopback host directly, whatever HTTP_PROXY says."""
        tunnels = []
        model = self.policy.model
        if model is not None and (model[0] in LOOPBACK_NAMES or model[0].startswith("127.")):
            tunnels = ["--tunnel", f"{'[::1]' if model[0] == '::1' else '127.0.0.1'}:{model[1]}"]
        return [self.python, "-I", "-S", JAIL_BRIDGE, "--listen", f"127.0.0.1:{BRIDGE_PORT}", "--unix", JAIL_SOCKET,
                *tunnels, "--", *argv]

    def environment(self) -> dict[str, str]:
        """The proxy variables every run gets (both cases), replacing any the operator's environment held."""
        proxy = f"http://127.0.0.1:{BRIDGE_PORT}"
        no_proxy = no_proxy_value(self.base_url)
        return {**dict.fromkeys(PROXY_VARIABLES, proxy), "NO_PROXY": no_proxy, "no_proxy": no_proxy}

    def close_run(self, run_id: str) -> None:
        """Close `run_id`'s socket and whatever connections it still has open."""
        self.proxy.close_listener(self.socket_path(run_id))

    def close(self) -> None:
        self.proxy.close()

    def stats(self) -> dict[str, int]:
        """The proxy's counters (connections, refusals, bytes, …)."""
        return self.proxy.stats()
