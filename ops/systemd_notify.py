"""Telling systemd how the bot is doing: sd_notify READY=1, STATUS=, WATCHDOG=1 and STOPPING=1 (stdlib only)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("ops")

# systemd gets READY=1 when the stream first connects, or after this many seconds of trying (so a DingTalk
# outage at boot does not fail the unit's start; the bot keeps reconnecting).
READY_TIMEOUT = 30.0



def _notify_address(value: str) -> str | None:
    """The socket address in $NOTIFY_SOCKET: a path, or '@name' for an abstract socket; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class SystemdNotifier:
    """Sends sd_notify datagrams ("READY=1", "STOPPING=1", "WATCHDOG=1") to $NOTIFY_SOCKET, stdlib only.

    Does nothing when the bot is not started by systemd with Type=notify (no NOTIFY_SOCKET).
    """

    def __init__(self, notify_socket: str = "", watchdog_usec: int = 0) -> None:
        self.address = _notify_address(notify_socket)
        # systemd's advice: ping at half the watchdog timeout.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec > 0 else 0.0
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> SystemdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them."""
        try:
            watchdog_usec = int(environ.get("WATCHDOG_USEC") or 0)
        except ValueError:
            watchdog_usec = 0
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if watchdog_pid and watchdog_pid != str(pid if pid is not None else os.getpid()):
            watchdog_usec = 0  # the watchdog is meant for another process
        return cls(environ.get("NOTIFY_SOCKET", ""), watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of `KEY=value` lines; False when not under systemd or the send failed."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode("utf-8"))
        except OSError as exc:
            if not self._warned:  # a broken socket would otherwise log on every watchdog ping
                self._warned = True
                log.warning("sd_notify 发送失败 (%s): %s", fields[0], exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: finishing running tasks")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


async def notify_systemd(notifier: SystemdNotifier, is_connected: Callable[[], bool], *,
                         alive: Callable[[], bool] = lambda: True, ready_timeout: float = READY_TIMEOUT,
                         poll: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
    """READY=1 once the stream first connects (or after `ready_timeout`), then STATUS= changes and WATCHDOG=1.

    Runs on the daemon's event loop until cancelled: if that loop hangs, or `alive()` says a core thread is
    dead, the pings stop and systemd restarts the bot (WatchdogSec=).
    """
    if not notifier.enabled:
        return
    started = clock()
    ready = False
    last_ping = float("-inf")
    was_connected: bool | None = None
    stalled = False
    while True:
        now = clock()
        connected = bool(is_connected())
        status = "DingTalk Stream connected" if connected else "connecting to DingTalk Stream"
        if not ready and (connected or now - started >= ready_timeout):
            notifier.ready(status)
            ready = True
        elif ready and connected != was_connected:
            notifier.notify(f"STATUS={status}")
        was_connected = connected
        if notifier.watchdog_interval and now - last_ping >= notifier.watchdog_interval:
            if alive():
                notifier.watchdog()
                last_ping = now
            elif not stalled:
                log.error("核心线程异常，停止 systemd watchdog 心跳 (systemd 将重启机器人)")
                stalled = True
        await asyncio.sleep(poll)
