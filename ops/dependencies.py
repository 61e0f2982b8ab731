"""Stops the bot with one line when a package of requirements.txt is missing (say, `python3 bot.py` run outside
the venv), instead of a ModuleNotFoundError traceback. bot.py imports it before any other package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "requirements.txt")
INSTALL_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"
# The module a package installs, where its name is not the package's (a lookup, not importlib.metadata: ~40 ms).
IMPORT_NAMES = {"python-dotenv": "dotenv"}


def missing_requirements(path: str = REQUIREMENTS) -> list[str]:
    """The packages requirements.txt names that this Python cannot find (lines with a platform marker are
    optional: the CLI wheel, which the bot can do without)."""
    missing = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if not line or ";" in line:
                continue
            name = re.split(r"[<>=!~\[ ]", line, maxsplit=1)[0]
            if importlib.util.find_spec(IMPORT_NAMES.get(name, name.replace("-", "_"))) is None:
                missing.append(name)
    return missing


_MISSING = missing_requirements()
if _MISSING:
    print(f"bot.py: {', '.join(_MISSING)} not installed for {sys.executable}: run the install command "
          f"({INSTALL_COMMAND}) in the bot's directory, then start it with .venv/bin/python bot.py", file=sys.stderr)
    sys.exit(2)
