"""The admin page: who may see what (STATUS_TOKEN), the token kept out of every answer and log line, hostile names
shown as text, the usage chart, and what the page gathers from the live bot."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest

from config import load_config
from dingtalk.api_budget import month_of
from dingtalk.route import Route
from ops import admin_page, doctor, status_server
from ops.admin_page import render_admin_page
from ops.admin_view import AdminView, DayUsage, ScheduleRow, TaskRow, UserUsage, admin_view
from schedules.table import Schedule, ScheduleTable
from tasks.task import QUEUED, RUNNING, Task
from tests.ops.test_ops import _sources

TOKEN = "s3cret-Admin-Token_0123456789"
SCRIPT = "<script>document.title='pwned'</script>"
IMG = '"><img src=x onerror=alert(1)>'
NOW = 1_778_000_000.0  # 2026-05-06 00:53:20, Beijing


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode("utf-8")


def _task(task_id: str, name: str, status: str, prompt: str, group: bool = False, **fields) -> Task:
    route = Route(conversation_type="2" if group else "1", user_id="u-" + task_id, conversation_id="cid" if group
                  else "")
    return Task(id=task_id, user_id="u-" + task_id, user_name=name, conversation_key="k" + task_id, route=route,
                prompt=prompt, status=status, created_at=NOW - 42, **fields)


def _board(*tasks: Task) -> SimpleNamespace:
    return SimpleNamespace(lock=threading.RLock(), tasks={t.id: t for t in tasks},
                           queue=[t.id for t in tasks if t.status == QUEUED])


def _live_sources(tmp_path, token: str = TOKEN, **changes):
    sources = _sources(tmp_path, connected=True)
    sources.manager.board = _board(_task("t1", SCRIPT, RUNNING, f"summarise with key {TOKEN} please",
                                         started_at=NOW - 40, last_step="工具 Bash"),
                                   _task("t2", IMG, QUEUED, "生成报告: 本季度", group=True))
    return dataclasses.replace(sources, token=token, **changes)


@pytest.fixture
def serve():
    servers = []

    def start(sources) -> str:
        server = status_server.StatusServer(sources, 0).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        server.stop()


# ---------------------------------------------------------------- who may see what


def test_without_a_token_healthz_and_metrics_stay_open_and_the_page_is_refused(tmp_path, serve):
    base = serve(_live_sources(tmp_path, token=""))
    assert _get(base + "/healthz")[0] == 200
    status, _, text = _get(base + "/metrics")
    assert status == 200 and "dingtalk_bot_queue_length" in text
    status, headers, text = _get(base + "/")
    assert status == 403 and "set STATUS_TOKEN" in text and text.count("\n") == 1
    assert SCRIPT not in text and "t1" not in text
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/", "/metrics", "/nothing"])
@pytest.mark.parametrize("given", [{}, {"headers": {"Authorization": "Bearer wrong-token-0123456789"}},
                                   {"query": "?token=wrong-token-0123456789"}, {"query": "?token="},
                                   {"headers": {"Authorization": f"Basic {TOKEN}"}}])
def test_with_a_token_every_path_but_healthz_is_401_without_it(tmp_path, serve, path, given):
    base = serve(_live_sources(tmp_path))
    status, headers, text = _get(base + path + given.get("query", ""), given.get("headers"))
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert text.startswith("unauthorized") and text.count("\n") == 1 and TOKEN not in text
    assert _get(base + "/healthz")[0] == 200


def test_with_the_token_as_bearer_or_query_the_page_and_metrics_answer(tmp_path, serve):
    base = serve(_live_sources(tmp_path))
    for path in ("/", "/metrics"):
        assert _get(base + path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert _get(base + path + f"?token={TOKEN}")[0] == 200
    status, headers, page = _get(base + f"/?token={TOKEN}")
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'; style-src 'sha256-")
    assert "script-src" not in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer" and headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]  # the one style sheet the policy allows: by hash
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in headers["Content-Security-Policy"]


def test_the_token_is_compared_in_constant_time(tmp_path, serve, monkeypatch):
    compared = []
    real = status_server.hmac.compare_digest

    def spy(a, b):
        compared.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(status_server.hmac, "compare_digest", spy)
    base = serve(_live_sources(tmp_path))
    assert _get(base + "/metrics?token=nope-nope-nope-nope")[0] == 401
    assert _get(base + "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert compared == [(bytes, bytes), (bytes, bytes)]


def test_the_token_is_in_no_answer_and_no_log_line(tmp_path, serve, caplog):
    caplog.set_level(logging.DEBUG)
    base = serve(_live_sources(tmp_path))  # t1's prompt quotes the token
    bodies = [_get(base + f"/?token={TOKEN}")[2], _get(base + f"/metrics?token={TOKEN}")[2],
              _get(base + f"/metrics?a=1&token={TOKEN}&b=2")[2], _get(base + f"/?token={TOKEN}x")[2],
              _get(base + "/healthz")[2], _get(base + "/", {"Authorization": f"Bearer {TOKEN}"})[2]]
    assert "summarise with key *** please" in bodies[0]
    for body in bodies:
        assert TOKEN not in body
    logged = caplog.text
    assert "status server" in logged and "token=***" in logged  # the request lines are logged, masked
    assert TOKEN not in logged


def test_the_request_line_is_masked():
    assert status_server.mask_token(f'"GET /?x=1&token={TOKEN}&y=2 HTTP/1.1" 200 -', TOKEN) == \
        '"GET /?x=1&token=***&y=2 HTTP/1.1" 200 -'
    assert status_server.mask_token(f"Bad request ({TOKEN!r})", TOKEN) == "Bad request ('***')"


def test_status_token_is_a_secret_of_the_config_and_never_quoted_when_wrong(tmp_path):
    env = {"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret-value", "CODEBUDDY_API_KEY": "k" * 20,
           "STATUS_TOKEN": TOKEN}
    config = load_config(env, dotenv_path=None)
    assert TOKEN in config.secrets and TOKEN not in repr(config)
    assert dict(config.describe())["STATUS_TOKEN"] != TOKEN
    with pytest.raises(Exception) as short:
        load_config({**env, "STATUS_TOKEN": "short<tok>"}, dotenv_path=None)
    assert "STATUS_TOKEN must be at least 16" in str(short.value) and "short<tok>" not in str(short.value)


def test_the_doctor_says_whether_the_admin_page_is_on():
    assert doctor.admin_page_line(None, TOKEN) == "· admin page: off (STATUS_PORT unset)"
    assert "off (STATUS_TOKEN unset" in doctor.admin_page_line(9464, "")
    on = doctor.admin_page_line(9464, TOKEN)
    assert on.startswith("· admin page: on at http://127.0.0.1:9464/") and TOKEN not in on


# ---------------------------------------------------------------- what the page shows


class _Elements(HTMLParser):
    """Every element and attribute of a page, to prove hostile text made none."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def _parsed(page: str) -> _Elements:
    elements = _Elements()
    elements.feed(page)
    return elements


def _view(**changes) -> AdminView:
    users = (UserUsage(SCRIPT, IMG, 3, 1200, 300, 0.25, 12.5), UserUsage("u2", "Bob", 1, 10, 5, 0.01, 1.0))
    days = (DayUsage("2026-05-01", 2, 1000, 200, 0.2, 10.0), DayUsage("2026-05-03", 1, 200, 100, 0.05, 2.5),
            DayUsage("2026-05-06", 1, 10, 5, 0.01, 1.0))
    tasks = (TaskRow("t1", SCRIPT, "u1", "1:1", RUNNING, 40.0, IMG, "工具 Bash"),
             TaskRow("t2", IMG, SCRIPT, "group", QUEUED, 3.0, "hello", ""))
    schedules = (ScheduleRow("s1", SCRIPT, "u1", IMG, "2026-05-07 09:00 (周四)", 4, 1, SCRIPT),)
    base = AdminView(host=f"host{SCRIPT}", rendered_at="2026-05-06 01:33:20 CST", tz="Asia/Shanghai", month="2026-05",
                     tasks=tasks, warm={"live": 1, "idle": 1, "busy": 0, "capacity": 4, "rss_bytes": 50 * 2**20},
                     users=users, days=days, schedules=schedules)
    return dataclasses.replace(base, **changes)


def test_hostile_names_show_as_text_in_tables_and_the_chart():
    page = render_admin_page(_view())
    elements = _parsed(page)
    assert "script" not in elements.tags and "img" not in elements.tags
    assert not [name for name in elements.attributes if name.startswith("on")]
    assert "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    text = "".join(elements.text)
    assert text.count(SCRIPT) >= 5 and text.count(IMG) >= 4  # tasks, usage, schedules, the title: shown as written
    hostile_day = dataclasses.replace(_view(), days=(DayUsage(f"2026-05-0{SCRIPT}", 1, 1, 1, 0, 0),))
    assert "script" not in _parsed(render_admin_page(hostile_day)).tags


def test_the_chart_has_one_bar_per_day_with_its_tooltip_and_axis_labels():
    page = render_admin_page(_view())
    svg = page.split("<svg", 1)[1].split("</svg>", 1)[0]
    bars = re.findall(r'<rect class="bar"[^>]*><title>([^<]*)</title></rect>', svg)
    assert bars == ["2026-05-01: 1,200 tokens (in 1,000, out 200), 2 runs, $0.20",
                    "2026-05-03: 300 tokens (in 200, out 100), 1 runs, $0.05",
                    "2026-05-06: 15 tokens (in 10, out 5), 1 runs, $0.01"]
    heights = [float(h) for h in re.findall(r'<rect class="bar"[^>]*height="([\d.]+)"', svg)]
    assert heights[0] == max(heights) and heights[2] < heights[1] < heights[0]
    assert ">1.2k</text>" in svg and ">0</text>" in svg and ">31</text>" in svg and ">tokens</text>" in svg
    assert "day of 2026-05" in svg


def test_an_empty_view_renders_and_says_what_is_missing():
    empty = AdminView(host="", rendered_at="2026-05-06 01:33:20 CST", tz="Asia/Shanghai", month="2026-05")
    page = render_admin_page(empty)
    assert "No task is running or queued" in page and "Usage is not recorded" in page
    assert "No monthly call budget" in page and 'id="schedules"' not in page and "<svg" not in page
    none_yet = render_admin_page(dataclasses.replace(empty, users=(), days=()))
    assert "No run recorded this month yet" in none_yet
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_the_page_has_no_script_no_external_resource_and_only_relative_links():
    page = render_admin_page(_view())
    elements = _parsed(page)
    assert not {"script", "iframe", "form", "link", "img", "object", "embed"} & set(elements.tags)
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(href.startswith("#") for href in hrefs)
    assert "src=" not in page.replace("src=x", "")
    assert admin_page.CONTENT_SECURITY_POLICY.startswith("default-src 'none'")


def test_admin_view_gathers_tasks_budget_usage_and_schedules(tmp_path):
    asked = []
    budget = SimpleNamespace(month_spend=lambda: (120, {"pushes": 100, "cards": 20}), monthly_budget=5000,
                             limited=lambda: False)
    table = ScheduleTable(":memory:")
    table.add(Schedule(id="s1", user_id="u1", user_name=SCRIPT, conversation_key="k", route=Route("1", "u1", ""),
                       cron="0 9 * * *", words="每天 09:00", prompt="日报", created_at=NOW, next_fire=NOW + 3600))

    def usage(month):
        asked.append(month)
        return [UserUsage("u1", "Alice", 2, 10, 20, 0.5, 3.0)], [DayUsage("2026-05-06", 2, 10, 20, 0.5, 3.0)]

    sources = _live_sources(tmp_path, usage=usage, schedules=SimpleNamespace(table=table, counts={}),
                            secrets=("secret-value",))
    sources.manager.outbox.budget = budget
    view = admin_view(sources, NOW)
    assert asked == [month_of(NOW)] == [view.month]
    assert [(t.id, t.status, t.chat) for t in view.tasks] == [("t1", RUNNING, "1:1"), ("t2", QUEUED, "group")]
    assert view.tasks[0].prompt == "summarise with key *** please" and view.tasks[0].elapsed == 42
    assert view.tasks[0].last_step == "工具 Bash" and view.tasks[0].user_name == SCRIPT
    assert view.budget.spent == 120 and view.budget.by_group == (("推送 (pushes)", 100), ("卡片 (cards)", 20))
    assert view.users[0].user_name == "Alice" and view.days[0].day == "2026-05-06"
    assert [(s.id, s.user_name, s.next_fire) for s in view.schedules] == [("s1", SCRIPT, "2026-05-06 01:53 (周三)")]
    assert view.warm["capacity"] == 4 and view.host == "" and view.rendered_at.endswith("CST")
    page = render_admin_page(view)
    assert "120 of 5,000 metered calls" in page and "<meter" in page and "Alice" in page
    table.close()


def test_a_part_that_cannot_be_read_is_a_line_on_the_page_not_a_failed_page(tmp_path, serve, caplog):
    def broken(month):
        raise RuntimeError("usage DB away")

    base = serve(_live_sources(tmp_path, usage=broken))
    status, _, page = _get(base + "/", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and "usage: not read (RuntimeError)" in page and "t1" in page
    assert "管理页读取 usage 失败" in caplog.text


def test_a_long_prompt_is_cut_to_sixty_characters(tmp_path):
    sources = _live_sources(tmp_path)
    sources.manager.board = _board(_task("t9", "A", QUEUED, "x" * 59 + "yz" + "w" * 100))
    assert admin_view(sources, time.time()).tasks[0].prompt == "x" * 59 + "y"
