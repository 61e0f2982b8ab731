"""Wires the API call budget (monthly, and per user per day) and the AI cards into the sender, the outbox and Stream.

Kept out of bot.py so the entry point stays short: `attach_budget_and_cards` after the manager is built,
`card_topics` and `card_handler` for the Stream connection.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from async_task_manager import AsyncTaskManager
from cards.actions import CardCallbackHandler, handle_card_callback
from cards.api import CARD_CALLBACK_TOPIC, CardApi, CardVariables
from cards.task_cards import Cards
from config import Config
from dingtalk.api_budget import ApiBudget
from dingtalk_sender import BOT_TOPIC, DingTalkSender


def attach_budget_and_cards(config: Config, sender: DingTalkSender, manager: AsyncTaskManager) -> ApiBudget:
    """Ask the budget before every metered call and count it in the task store (the month's, and each user's day but
    an admin's limited to USER_DAILY_API_CALLS); start AI cards when DINGTALK_CARD_TEMPLATE_ID is set."""
    budget = ApiBudget(manager.store, config.monthly_call_budget, user_daily_limit=config.user_daily_api_calls,
                       exempt=config.admin_users)
    sender.meter = budget
    manager.outbox.budget = budget
    if config.card_template_id:
        api = CardApi(sender, config.card_template_id, CardVariables.from_names(config.card_variables))
        manager.outbox.cards = Cards(api, budget, interval=config.card_update_interval, backoff=config.card_backoff)
    return budget


def card_topics(config: Config) -> tuple[str, ...]:
    """The Stream topics the bot subscribes to: bot messages, and card callbacks when cards are on."""
    return (BOT_TOPIC, CARD_CALLBACK_TOPIC) if config.card_template_id else (BOT_TOPIC,)


def card_handler(config: Config, manager: AsyncTaskManager) -> CardCallbackHandler | None:
    """The Stream handler of card button clicks (None when cards are off)."""
    cards = manager.outbox.cards
    if cards is None:
        return None
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="card-click")
    return CardCallbackHandler(lambda data: handle_card_callback(data, cards, manager, config.admin_users), pool)
