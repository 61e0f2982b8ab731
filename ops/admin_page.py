"""The read-only admin page's HTML: a pure rendering of an `AdminView`, every string escaped, no JavaScript.

Plain HTML5 and one inline style sheet (allowed by its hash in `CONTENT_SECURITY_POLICY`, nothing else is), no
external resource, no form, no link but the page's own anchors; tokens per day drawn server-side as an inline SVG.
Everything shown comes from chats or the task DB (names, prompts, schedule words): each goes through `esc`.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import html
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

from ops.admin_view import AdminView, BudgetView, status_label

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1240px;padding:0 16px 40px;color:#1b1f24}
header{border-bottom:2px solid #d0d7de;margin-bottom:8px}
h1{font-size:22px;margin:16px 0 4px}h2{font-size:17px;margin:26px 0 8px}
.meta,.note{color:#57606a}.problem{color:#9a3412}
nav a{margin-right:14px}
table{border-collapse:collapse;margin:4px 0 8px}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.mono{font-family:ui-monospace,monospace}
tr.total td{font-weight:600;background:#f6f8fa}
meter{width:320px;height:16px}
svg{display:block;max-width:100%;height:auto}
.bar{fill:#2f81f7}.bar:hover{fill:#0b4fb3}.axis{stroke:#57606a;stroke-width:1}.grid{stroke:#d0d7de}
.label{font-size:11px;fill:#57606a}
"""
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
# No script, no frame, no form, no fetch: only the page's own style sheet.
CONTENT_SECURITY_POLICY = (f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; "
                           "form-action 'none'; frame-ancestors 'none'")

CHART_WIDTH, CHART_HEIGHT = 760, 260
CHART_LEFT, CHART_RIGHT, CHART_TOP, CHART_BOTTOM = 64, 12, 14, 44  # margins around the plot: axis labels


def esc(value: Any) -> str:
    """Text (or a number) made safe in HTML text and in quoted attributes, SVG included."""
    return html.escape(str(value), quote=True)


def _count(value: Any) -> str:
    return f"{int(value):,}"


def _compact(value: float) -> str:
    """12345 → "12.3k": axis labels."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.0f}"


def _row(cells: Iterable[tuple[str, str]], css: str = "") -> str:
    """One table row of (class, already escaped html) cells."""
    tds = "".join(f'<td class="{kind}">{content}</td>' if kind else f"<td>{content}</td>" for kind, content in cells)
    return f'<tr class="{css}">{tds}</tr>' if css else f"<tr>{tds}</tr>"


def _table(headers: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{esc(header)}</th>" for header in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def tasks_section(view: AdminView) -> str:
    if not view.tasks:
        return _section("tasks", "Tasks now", _note("No task is running or queued on this host."))
    rows = [_row([("mono", esc(t.id)), ("", esc(t.user_name)), ("mono", esc(t.user_id)), ("", esc(t.chat)),
                  ("", esc(status_label(t.status))), ("n", esc(f"{t.elapsed:.0f}")), ("", esc(t.prompt)),
                  ("", esc(t.last_step))]) for t in view.tasks]
    running = sum(1 for t in view.tasks if t.status == "running")
    return _section("tasks", "Tasks now", _note(f"{running} running, {len(view.tasks) - running} queued on this host.")
                    + _table(("task", "user", "user id", "chat", "status", "elapsed s", "prompt (start)",
                              "last step"), rows))


def warm_section(view: AdminView) -> str:
    if view.warm is None:
        return ""
    warm = view.warm
    shown = (("live", "live", "CLI processes alive: idle + busy + spares"),
             ("idle", "idle", "kept for their conversation's next message"),
             ("busy", "busy", "running a turn now"), ("spares", "spares", "started ahead for new conversations"),
             ("capacity", "capacity", "WARM_SESSIONS: kept at most"),
             ("hits", "hits", "runs that found their conversation's process, since start"),
             ("misses", "misses", "runs that had to start one, since start"),
             ("ended", "ended", "processes ended (idle, evicted, crashed), since start"))
    rows = [_row([("", esc(label)), ("n", esc(_count(warm.get(key, 0)))), ("", esc(meaning))])
            for key, label, meaning in shown if key in warm]
    if "rss_bytes" in warm:
        rows.append(_row([("", "memory"), ("n", esc(f"{warm['rss_bytes'] / 2**20:,.0f} MB")),
                          ("", "resident memory of the warm processes and their tools")]))
    return _section("warm", "Warm CLI processes", _table(("", "now", "meaning"), rows))


def budget_section(view: AdminView) -> str:
    budget: BudgetView | None = view.budget
    if budget is None:
        return _section("budget", "DingTalk API budget", _note("No monthly call budget is kept by this bot."))
    share = budget.spent / max(1, budget.budget)
    body = (f"<p>{esc(_count(budget.spent))} of {esc(_count(budget.budget))} metered calls in {esc(budget.month)} "
            f"({esc(f'{share:.0%}')}) "
            f'<meter min="0" max="{esc(budget.budget)}" low="{esc(int(budget.budget * 0.8))}" '
            f'high="{esc(int(budget.budget * 0.95))}" value="{esc(min(budget.spent, budget.budget))}">'
            f"{esc(f'{share:.0%}')}</meter></p>")
    if budget.limited:
        body += '<p class="problem">DingTalk refuses metered calls this month (ApiCountLimitForOrg): webhook only.</p>'
    rows = [_row([("", esc(label)), ("n", esc(_count(calls)))]) for label, calls in budget.by_group]
    body += _table(("kind", "calls"), rows)
    body += _note("Pushes, card calls and file transfers count; replies through a session webhook are free. "
                  "Every host's calls, from the task DB.")
    return _section("budget", "DingTalk API budget", body)


def _usage_cells(item: Any) -> list[tuple[str, str]]:
    return [("n", esc(_count(item.runs))), ("n", esc(_count(item.input_tokens))),
            ("n", esc(_count(item.output_tokens))), ("n", esc(f"${float(item.cost_usd):,.2f}")),
            ("n", esc(f"{float(item.cpu_seconds):,.1f}"))]


USAGE_HEADERS = ("runs", "input tokens", "output tokens", "cost", "CPU s")


def _totals(items: Sequence[Any]) -> SimpleNamespace:
    return SimpleNamespace(runs=sum(int(i.runs) for i in items),
                           input_tokens=sum(int(i.input_tokens) for i in items),
                           output_tokens=sum(int(i.output_tokens) for i in items),
                           cost_usd=sum(float(i.cost_usd) for i in items),
                           cpu_seconds=sum(float(i.cpu_seconds) for i in items))


def usage_section(view: AdminView) -> str:
    title = f"Usage in {view.month}"
    if view.users is None or view.days is None:
        return _section("usage", title, _note("Usage is not recorded by this bot."))
    if not view.users and not view.days:
        return _section("usage", title, _note("No run recorded this month yet."))
    users = [_row([("", esc(u.user_name)), ("mono", esc(u.user_id)), *_usage_cells(u)]) for u in view.users]
    users.append(_row([("", "all users"), ("", ""), *_usage_cells(_totals(view.users))], "total"))
    days = [_row([("mono", esc(d.day)), *_usage_cells(d)]) for d in view.days]
    return _section("usage", title, "<h3>By user</h3>" + _table(("user", "user id", *USAGE_HEADERS), users)
                    + "<h3>Tokens by day</h3>" + usage_chart(view.month, view.days)
                    + "<h3>By day</h3>" + _table(("day", *USAGE_HEADERS), days))


def usage_chart(month: str, days: Sequence[Any]) -> str:
    """Tokens (input + output) per day of `month` as an inline SVG bar chart: one bar per day given, with a <title>
    tooltip, the days of the month along the bottom, tokens up the side."""
    try:
        year, number = (int(part) for part in month.split("-"))
        length = calendar.monthrange(year, number)[1]
    except ValueError:
        return _note("No chart: the month is not YYYY-MM.")
    plot_w, plot_h = CHART_WIDTH - CHART_LEFT - CHART_RIGHT, CHART_HEIGHT - CHART_TOP - CHART_BOTTOM
    slot = plot_w / length
    placed = []
    for day in days:
        text = str(day.day)
        if text.startswith(f"{month}-") and text[-2:].isdigit() and 1 <= int(text[-2:]) <= length:
            placed.append((int(text[-2:]), day, int(day.input_tokens) + int(day.output_tokens)))
    top = max([tokens for _, _, tokens in placed] + [1])
    bottom = CHART_TOP + plot_h
    caption = f"Tokens (input + output) per day, {month}"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" '
             f'width="{CHART_WIDTH}" height="{CHART_HEIGHT}" role="img" aria-label="{esc(caption)}">',
             f"<title>{esc(caption)}</title>"]
    for tick in (0.0, 0.5, 1.0):
        y = bottom - tick * plot_h
        parts.append(f'<line class="grid" x1="{CHART_LEFT}" y1="{y:.1f}" x2="{CHART_LEFT + plot_w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="label" x="{CHART_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                     f"{esc(_compact(tick * top))}</text>")
    for number_of_day, day, tokens in placed:
        height = tokens / top * plot_h
        x = CHART_LEFT + (number_of_day - 1) * slot + slot * 0.15
        tip = (f"{day.day}: {tokens:,} tokens (in {int(day.input_tokens):,}, out {int(day.output_tokens):,}), "
               f"{int(day.runs):,} runs, ${float(day.cost_usd):,.2f}")
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{bottom - height:.1f}" width="{slot * 0.7:.1f}" '
                     f'height="{height:.1f}"><title>{esc(tip)}</title></rect>')
    parts.append(f'<line class="axis" x1="{CHART_LEFT}" y1="{bottom}" x2="{CHART_LEFT + plot_w}" y2="{bottom}"/>')
    parts.append(f'<line class="axis" x1="{CHART_LEFT}" y1="{CHART_TOP}" x2="{CHART_LEFT}" y2="{bottom}"/>')
    for labelled in sorted({1, 5, 10, 15, 20, 25, length}):
        x = CHART_LEFT + (labelled - 0.5) * slot
        parts.append(f'<text class="label" x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{labelled}</text>')
    parts.append(f'<text class="label" x="{CHART_LEFT + plot_w / 2:.1f}" y="{CHART_HEIGHT - 6}" '
                 f'text-anchor="middle">{esc(f"day of {month}")}</text>')
    parts.append(f'<text class="label" x="12" y="{CHART_TOP + plot_h / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 12 {CHART_TOP + plot_h / 2:.1f})">tokens</text>')
    parts.append("</svg>")
    return "".join(parts)


def schedules_section(view: AdminView) -> str:
    if view.schedules is None:
        return ""
    rows = [_row([("mono", esc(s.id)), ("", esc(s.user_name)), ("mono", esc(s.user_id)), ("", esc(s.words)),
                  ("", esc(s.next_fire)), ("n", esc(s.fires)), ("n", esc(s.skipped)), ("", esc(s.last_result))])
            for s in view.schedules]
    return _section("schedules", "Schedules", _table(("schedule", "user", "user id", "when", f"next fire ({view.tz})",
                                                      "fires", "skipped", "last fire"), rows))


def render_admin_page(view: AdminView) -> str:
    """The whole page for `view`: a pure function of it."""
    sections = [("tasks", "tasks", tasks_section(view)), ("warm", "warm processes", warm_section(view)),
                ("budget", "API budget", budget_section(view)), ("usage", "usage", usage_section(view)),
                ("schedules", "schedules", schedules_section(view))]
    shown = [(anchor, label, body) for anchor, label, body in sections if body]
    nav = "".join(f'<a href="#{anchor}">{esc(label)}</a>' for anchor, label, _ in shown)
    title = f"DingTalk CodeBuddy bot: {view.host or 'admin'}"
    meta = f"host {esc(view.host or '-')} · rendered {esc(view.rendered_at)}"
    if view.version:
        meta += f" · version {esc(view.version)}"
    problems = "".join(f'<p class="problem">{esc(problem)}</p>' for problem in view.problems)
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="referrer" content="no-referrer">'
            f"<title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>"
            f'<header><h1>DingTalk CodeBuddy bot</h1><p class="meta">{meta} · read-only, refresh to update</p>'
            f"<nav>{nav}</nav></header>{problems}{''.join(body for _, _, body in shown)}</body></html>\n")
