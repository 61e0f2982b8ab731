"""Old attachments go: files in each conversation's `attachments/` older than ATTACHMENT_RETENTION_DAYS are removed,
never through a link the run may have planted there."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from files.attachments import ATTACHMENTS_DIR, open_dir

log = logging.getLogger("files")

SWEEP_INTERVAL = 6 * 3600.0


def sweep_conversation(base: str, cutoff: float) -> int:
    """Remove the entries of `<base>/workspace/attachments/` last modified before `cutoff` (files and links, by
    their own time; directories the run made are left); how many went."""
    removed = 0
    try:
        workspace = open_dir(os.path.join(base, "workspace"))
    except OSError:
        return 0
    try:
        folder = open_dir(ATTACHMENTS_DIR, workspace)
    except OSError:
        return 0
    finally:
        os.close(workspace)
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISDIR(info.st_mode) and info.st_mtime < cutoff:
                        os.unlink(entry.name, dir_fd=folder)
                        removed += 1
    finally:
        os.close(folder)
    return removed


def sweep(root: str, max_age: float, now: float) -> int:
    """Sweep every conversation under CODEBUDDY_WORKDIR `root`; how many files went."""
    conversations = os.path.join(root, "conversations")
    try:
        names = os.listdir(conversations)
    except OSError:
        return 0
    return sum(sweep_conversation(os.path.join(conversations, name), now - max_age)
               for name in names if name.startswith("c-"))


class AttachmentSweeper:
    """Sweeps the attachments of every conversation at start and every `interval` seconds after."""

    def __init__(self, root: str, max_age: float, *, interval: float = SWEEP_INTERVAL,
                 clock: Callable[[], float] = time.time) -> None:
        self.root, self.max_age, self.interval, self.clock = root, max_age, interval, clock
        self._stop = threading.Event()

    def run_once(self) -> int:
        removed = sweep(self.root, self.max_age, self.clock())
        if removed:
            log.info("清理过期附件: %d 个 (超过 %.0f 天)", removed, self.max_age / 86400)
        return removed

    def loop(self) -> None:
        """The supervised loop: sweep, then wait `interval` (or until `stop`)."""
        while not self._stop.is_set():
            self.run_once()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
