"""The chat's /usage (用量): the sender's day and month and what is left of their quotas; an admin's `/usage all`: the
month's totals and its top users (in a 1:1 chat only: a group would read everyone's numbers)."""

from __future__ import annotations

import logging

from usage.quotas import Quotas
from usage.table import Totals

log = logging.getLogger("usage")

COMMANDS = {"/usage": "usage", "用量": "usage"}
HELP_LINES = "/usage (用量) — 我今天和本月的用量 (运行、tokens、费用、CPU) 与剩余配额；管理员 /usage all: 本月各用户"
TOP_USERS = 10
UNREADABLE = "暂时无法读取用量 (任务数据库不可用)，请稍后再试。"


def usage_line(totals: Totals) -> str:
    """Runs, tokens in and out, cost and CPU time, in words."""
    return (f"{totals.runs} 次运行，输入 {totals.input_tokens:,} / 输出 {totals.output_tokens:,} tokens，"
            f"费用 ${totals.cost_usd:.2f}，CPU {totals.cpu_seconds:.1f} 秒")


class UsageCommands:
    """Answers /usage from the quotas' book."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas

    def handle(self, argument: str, user_id: str, is_admin: bool, in_group: bool) -> str:
        """The reply to `/usage [all]` from `user_id`."""
        try:
            if argument.strip().lower() in ("all", "全部"):
                if not is_admin:
                    return "只有管理员可以查看所有用户的用量。"
                if in_group:
                    return "/usage all 只能在与机器人的单聊中使用 (群里的人都会看到)。"
                return self.everyone()
            if argument.strip():
                return "用法: /usage (我的用量)，管理员: /usage all"
            return self.mine(user_id)
        except Exception as exc:
            log.warning("读取用量失败: %s", " ".join(str(exc).split())[:200])
            return UNREADABLE

    def mine(self, user_id: str) -> str:
        book = self.quotas.book
        now = book.clock()
        day = book.day(now)
        today, month = self.quotas.today(user_id, now), self.quotas.this_month(user_id, now)
        return "\n".join([f"你的用量 (按 {book.tz.key} 计日):", f"今天 ({day[5:]}): {usage_line(today)}",
                          f"本月 ({day[:7]}): {usage_line(month)}", self.quotas.left(user_id, today, month)])

    def everyone(self) -> str:
        book = self.quotas.book
        month = book.day(book.clock())[:7]
        users = book.month(month, "user")
        lines = [f"本月 ({month}) 全部用量: {usage_line(book.month_totals(month))}，{len(users)} 位用户"]
        if users:
            lines.append("用量最多的用户:")
        for rank, user in enumerate(users[:TOP_USERS], 1):
            lines.append(f"{rank}. {user.name or '-'} ({user.key}): {usage_line(user)}")
        return "\n".join(lines)
