#!/usr/bin/env python3
"""Benchmark: AI cards against plain messages — time to the first visible answer text, and metered calls per answer.

One run of `python bot.py` with cards (DINGTALK_CARD_TEMPLATE_ID set) and one without, each against the local
stand-in with its card APIs (tests/standin_cards.py) and the fake CLI (tests/fake_codebuddy.py, sandbox off: the
sandbox is measured by bench/run.py). The long answer is the fake CLI's `[stream=10]`: five parts over 10 s, the
first after 2 s. The short one is answered at once. Prints a table (ratios within this run); not part of the tests.

    .venv/bin/python bench/cards.py [--answers 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import CLIENT_ID, CLIENT_SECRET, BotProcess, fake_cli_env  # noqa: E402
from tests.standin import DingTalkStandin  # noqa: E402
from tests.standin_cards import TEMPLATE_ID, CardStandin  # noqa: E402


def start_bot(standin: DingTalkStandin, workdir: Path, cards: bool) -> BotProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "HOME": str(workdir), "PYTHONUNBUFFERED": "1",
                "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
                "DINGTALK_OPENAPI_ENDPOINT": standin.base_url, **fake_cli_env(workdir), "CODEBUDDY_SANDBOX": "none",
                "CODEBUDDY_WORKDIR": str(workdir / "workspace"), "LOG_FILE": str(workdir / "bot.log"),
                "TASK_DB": str(workdir / "tasks.db"), "SYNC_TIMEOUT": "60", "MAX_WORKERS": "4"})
    if cards:
        env["DINGTALK_CARD_TEMPLATE_ID"] = TEMPLATE_ID
    before = standin.stream_connects
    bot = BotProcess(workdir, env).start()
    standin.wait_connected(timeout=30, connects_at_least=before + 1)
    return bot


def first_text_seconds(standin: DingTalkStandin, cards: CardStandin, prompt: str, user: str) -> float:
    """Seconds from the message to the first answer text a user can see (a card update or the message)."""
    sent = standin.send_bot_message(prompt, sender_staff_id=user)

    def visible() -> float | None:
        times = [r.time for r in standin.webhook_posts(sent.session) if "第1段" in (r.text or "")]
        times += [call.time for card in cards.card_list() if f".{user}" in card.space
                  for call in card.streams if "第1段" in call.content]
        return min(times) if times else None

    seen = standin.wait_for(visible, timeout=60)
    standin.wait_for(lambda: any("第5段" in (r.text or "") for r in standin.webhook_posts(sent.session))
                     or any(c.status == "3" for c in cards.card_list() if f".{user}" in c.space), timeout=60)
    return seen - sent.sent_at


def calls_per_answer(standin: DingTalkStandin, cards: CardStandin, prompt: str, user: str) -> int:
    """Metered calls one answer cost (pushes and card calls), the answer waited for."""
    before = cards.metered
    sent = standin.send_bot_message(prompt, sender_staff_id=user)
    standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= 2
                     or any(c.status == "3" for c in cards.card_list() if f".{user}" in c.space), timeout=60)
    time.sleep(0.5)  # the card's last calls
    return cards.metered - before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=5, help="answers per figure (5)")
    args = parser.parse_args()
    rows = []
    for with_cards in (False, True):
        with DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET) as standin, \
                tempfile.TemporaryDirectory(prefix="bench-cards-") as tmp:
            cards = CardStandin(standin)
            bot = start_bot(standin, Path(tmp), with_cards)
            try:
                first = [first_text_seconds(standin, cards, f"[stream=10] 长回答 {n}", f"first{n}")
                         for n in range(args.answers)]
                short = [calls_per_answer(standin, cards, f"你好 {n}", f"short{n}") for n in range(args.answers)]
                long = [calls_per_answer(standin, cards, f"[stream=10] 长 {n}", f"long{n}")
                        for n in range(args.answers)]
            finally:
                bot.terminate()
            rows.append(("cards" if with_cards else "messages", statistics.median(first), short, long))
    print(f"{'answers by':<10} {'first text p50 (s)':>18} {'calls/short p50/max':>20} {'calls/long p50/max':>19}")
    for name, first, short, long in rows:
        print(f"{name:<10} {first:>18.2f} {statistics.median(short):>13.0f} / {max(short):<4} "
              f"{statistics.median(long):>12.0f} / {max(long):<4}")
    print(f"first visible text, cards vs messages: {rows[1][1] / rows[0][1]:.2f}× the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
