"""Runs bot.py with the share of the DingTalk month gone pinned, so budget pace tests do not depend on today's date.

`ApiBudget.pace` compares the month's spend with a straight line through the month (api_budget.month_elapsed).
Late in a month no spend below the 90 % "cards off" line is ahead of that line, so an end-to-end test of the
stretched card updates would pass or fail with the calendar. This wrapper pins `api_budget.month_elapsed` and
nothing else (the month's name, every other clock and the bot itself run as usual).

Usage, as BotProcess's `_WRAP` prefix: `python tests/pinned_month.py SHARE python bot.py [args...]`.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path


def main() -> None:
    share, script, args = float(sys.argv[1]), sys.argv[3], sys.argv[4:]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python bot.py` would have it
    api_budget = importlib.import_module("dingtalk.api_budget")
    api_budget.month_elapsed = lambda wall_time: share
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
