"""Every secret the bot holds, written through every path out, comes out as *** (issue 23, item 6).

The secrets: the DingTalk client secret, CODEBUDDY_API_KEY, and the task DB's password in each way a DSN can hold
one. The paths: a session-webhook reply and a push (the DingTalk stand-in), a card's create, stream and update (its
card APIs), a log line and a logged traceback (the bot's own log set-up), `bot.py check`, `bot.py tasks` and a
start-up error (subprocesses), and end to end, a bot whose agent prints the key into a card, a reply and a push.
Each check looks for the secret as written and as decoded, and for `***` where it was.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from cards.api import CardApi, CardVariables
from common.logs import setup_logging, stop_logging
from config import read_config
from dingtalk.route import Route
from dingtalk_sender import DingTalkSender
from store.postgres import PostgresTaskStore, safe_url
from store.schema import StoreError
from store.sqlite import SQLiteTaskStore
from tasks.task import Task
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT, fake_cli_env, send_pushed
from tests.standin import BATCH_SEND_PATH, GROUP_SEND_PATH, WEBHOOK_PATH
from tests.standin_cards import CREATE_AND_DELIVER_PATH, INSTANCES_PATH, STREAMING_PATH, TEMPLATE_ID, CardStandin

API_KEY = "cb-key-Vq8mZ3xR7tLp2nW9"


@dataclass(frozen=True)
class Dsn:
    """One way TASK_DB can hold a password: the DSN ({port}, {db}, {sockdir} filled in), the password as libpq
    reads it and as written, and whether the bot opens it as PostgreSQL."""

    name: str
    template: str
    password: str
    written: str = ""
    postgres: bool = True

    def forms(self) -> set[str]:
        return {self.password, self.written or self.password}


DSNS = [
    Dsn("url-user-info", "postgresql://postgres:Pw-userinfo-7Gk2@127.0.0.1:{port}/{db}", "Pw-userinfo-7Gk2"),
    Dsn("url-percent-encoded", "postgresql://postgres:Pw%40enc%2F7Gk3@127.0.0.1:{port}/{db}", "Pw@enc/7Gk3",
        "Pw%40enc%2F7Gk3"),
    Dsn("url-question-mark-and-hash", "postgresql://postgres:Pw?hash#7Gk4@127.0.0.1:{port}/{db}", "Pw?hash#7Gk4"),
    Dsn("url-query-parameter", "postgresql://postgres@127.0.0.1:{port}/{db}?password=Pw-query-7Gk5",
        "Pw-query-7Gk5"),
    Dsn("url-socket-host-then-password",
        "postgresql:///{db}?host={sockdir}&port={port}&user=postgres&password=Pw%2Bsocket-7Gk6", "Pw+socket-7Gk6",
        "Pw%2Bsocket-7Gk6"),
    # libpq's key=value form: PostgreSQL too (store.postgres.is_postgres_url).
    Dsn("key-value", "host=127.0.0.1 port={port} dbname={db} user=postgres password='Pw \\'kv\\' 7Gk7'",
        "Pw 'kv' 7Gk7", "'Pw \\'kv\\' 7Gk7'", postgres=True),
]


@pytest.fixture(params=DSNS, ids=[dsn.name for dsn in DSNS])
def dsn(request) -> Dsn:
    return request.param


@pytest.fixture
def task_db(request, dsn: Dsn) -> str:
    """The DSN, naming a fresh database of the test PostgreSQL server (trust auth: any password gets in)."""
    if not dsn.postgres:
        return dsn.template.format(port=5432, db="tasks", sockdir="")
    server = request.getfixturevalue("pg_server")
    database = server.create_database().rsplit("/", 1)[1]
    return dsn.template.format(port=server.port, db=database, sockdir=server.root)


def secret_forms(dsn: Dsn) -> set[str]:
    return {CLIENT_SECRET, API_KEY, *dsn.forms()}


def shown_forms(dsn: Dsn) -> set[str]:
    """Each secret, and each as repr() or JSON would quote it."""
    return {shown for secret in secret_forms(dsn)
            for shown in (secret, repr(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1])}


def leak(dsn: Dsn, task_db: str) -> str:
    """A text quoting every secret, as an answer or an error might."""
    return (f"client secret {CLIENT_SECRET}; key {API_KEY}; TASK_DB {task_db}; password {dsn.password}; "
            f"as written {dsn.written or dsn.password}")


def assert_redacted(text: str, dsn: Dsn, where: str) -> None:
    shown = [secret for secret in shown_forms(dsn) if secret in text]
    assert not shown, f"{where} shows {shown}:\n{text}"
    assert "***" in text, f"{where} shows no ***:\n{text}"


def bot_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for `python bot.py …`, every path inside tmp_path, the app's secret and the CLI's key."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DINGTALK_", "CODEBUDDY_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
                **fake_cli_env(tmp_path), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
                "LOG_FILE": str(tmp_path / "logs" / "bot.log"), "DINGTALK_CLIENT_ID": CLIENT_ID,
                "DINGTALK_OPENAPI_ENDPOINT": "http://127.0.0.1:9",  # nothing leaves this machine
                "DINGTALK_CLIENT_SECRET": CLIENT_SECRET, "CODEBUDDY_API_KEY": API_KEY, **overrides})
    return env


def run_bot(tmp_path: Path, *args: str, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bot.py"), *args], cwd=tmp_path,
                          env=bot_env(tmp_path, **overrides), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- DingTalk: webhook, push, card


def test_webhook_reply_push_and_card_calls_show_no_secret(standin, dsn, task_db):
    config = read_config({"DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
                          "CODEBUDDY_API_KEY": API_KEY, "TASK_DB": task_db}, dotenv_path=None)[0]
    sender = DingTalkSender(standin.base_url, CLIENT_ID, CLIENT_SECRET, CLIENT_ID, retry_window=5,
                            secrets=config.secrets)
    text = leak(dsn, task_db)
    session = standin.add_session()
    live = Route("1", "alice", "", standin.webhook_url(session), int(time.time() * 1000) + 3_600_000)
    assert sender.send(live, text).path == "webhook"
    assert sender.send(Route("1", "alice", ""), text, markdown=True, title=text).path == "batchSend"

    cards = CardStandin(standin)
    api = CardApi(sender, TEMPLATE_ID, CardVariables())
    assert api.create_and_deliver("cb-t1-1", live, text) == ""
    assert api.stream("cb-t1-1", text) == ""
    assert api.update("cb-t1-1", {"msgTitle": text, "pendingApproval": text}) == ""
    card = cards.card_list()[0]

    assert_redacted(standin.webhook_posts(session)[0].text or "", dsn, "the webhook reply")
    push = standin.batch_sends()[0]
    assert_redacted((push.text or "") + (push.title or ""), dsn, "the push")
    assert_redacted(card.streams[0].content, dsn, "the card stream")
    assert_redacted(card.params["msgTitle"] + card.params["pendingApproval"], dsn, "the card update")
    for request in standin.requests:  # what went over the wire, title and JSON escapes included
        if request.path in CHAT_PATHS:
            assert_redacted(request.raw_body, dsn, request.path)


# ---------------------------------------------------------------- the log


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    stop_logging()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for old in handlers:  # pytest's own capture handlers, as they were
        root.addHandler(old)
    root.setLevel(level)


@pytest.mark.parametrize("writer_thread", [False, True], ids=["handler", "writer-thread"])
def test_log_lines_and_tracebacks_show_no_secret(tmp_path, dsn, task_db, writer_thread, restore_logging):
    config = read_config({"DINGTALK_CLIENT_SECRET": CLIENT_SECRET, "CODEBUDDY_API_KEY": API_KEY,
                          "TASK_DB": task_db}, dotenv_path=None)[0]
    path = tmp_path / "bot.log"
    setup_logging(str(path), "INFO", config.secrets, writer_thread=writer_thread)
    log = logging.getLogger("bot")
    text = leak(dsn, task_db)
    log.info("an info line: %s", text)
    log.warning("a warning: %s", text)
    try:
        try:
            raise ConnectionError(text)
        except ConnectionError as cause:
            raise RuntimeError(f"wrapped: {text}") from cause
    except RuntimeError:
        log.exception("a traceback")
    log.info("a stack", stack_info=True)
    stop_logging()
    written = path.read_text(encoding="utf-8")
    assert "Traceback (most recent call last):" in written and "ConnectionError: " in written
    assert "RuntimeError: wrapped: client secret ***" in written
    assert_redacted(written, dsn, "the log")


def test_a_libpq_error_quoting_the_dsn_is_logged_without_its_password(tmp_path, restore_logging):
    url = "postgresql://postgres:Pw%zz-bad-7Gk9@127.0.0.1:1/tasks"  # not percent-encoding: libpq quotes it back
    config = read_config({"TASK_DB": url}, dotenv_path=None)[0]
    path = tmp_path / "bot.log"
    setup_logging(str(path), "INFO", config.secrets)
    with pytest.raises(StoreError) as caught:
        PostgresTaskStore(url, connect_timeout=1.0)
    written = path.read_text(encoding="utf-8")
    # The store's first connection is its own (not the pool's): libpq's error comes back in the StoreError, which
    # start-up logs once (a URL libpq cannot parse: exit 2, not a retry).
    assert type(caught.value) is StoreError and 'invalid percent-encoded token: "***"' in str(caught.value)
    assert "Pw%zz-bad-7Gk9" not in written + str(caught.value)


# ---------------------------------------------------------------- check, tasks, start-up errors


def test_check_shows_no_secret(tmp_path, standin, dsn, task_db):
    # Secrets pasted where check shows values as they are: the app secret as robot code, the key as the model.
    result = run_bot(tmp_path, "check", DINGTALK_OPENAPI_ENDPOINT=standin.base_url, TASK_DB=task_db,
                     DINGTALK_ROBOT_CODE=CLIENT_SECRET, CODEBUDDY_MODEL=API_KEY, HOST_NAME=dsn.password)
    output = result.stdout + result.stderr
    assert "✓ DingTalk access token" in output, output
    assert_redacted(output, dsn, "check")
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ") and line.split()}
    for name in ("TASK_DB", "DINGTALK_ROBOT_CODE", "CODEBUDDY_MODEL", "HOST_NAME"):
        assert "***" in rows[name], rows[name]
    if dsn.postgres:
        assert f"✓ task DB: {safe_url(task_db)} answers" in output


def test_tasks_shows_no_secret(tmp_path, dsn, task_db):
    if dsn.postgres:
        store = PostgresTaskStore(task_db)
    else:
        store = SQLiteTaskStore(str(tmp_path / task_db))  # what the bot makes of it: a file by that name
    now = time.time()
    for number, secret in enumerate(sorted(secret_forms(dsn))):
        # The secret starts inside the 40 columns shown and ends past them: it is replaced before the cut.
        store.save(Task(id=f"aaaa000{number}", user_id="u1", user_name="u1", conversation_key="u1",
                        route=Route("1", "u1", ""), prompt=f"print it: {secret}", status="failed",
                        created_at=now - number, finished_at=now, error=f"CLI said {secret}"))
    store.close()
    result = run_bot(tmp_path, "tasks", TASK_DB=task_db)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "task(s), newest first, from" in output, output
    assert_redacted(output, dsn, "tasks")
    for secret in secret_forms(dsn):
        assert secret[:8] not in output, f"tasks shows the start of {secret!r}:\n{output}"
    assert output.count("print it: ***") == len(secret_forms(dsn))


def test_a_start_up_error_shows_no_secret(tmp_path, dsn, task_db):
    # A configuration error quotes the value given: here every secret, pasted into LOG_LEVEL.
    result = run_bot(tmp_path, "run", TASK_DB=task_db, LOG_LEVEL=leak(dsn, task_db))
    assert result.returncode == 2 and "LOG_LEVEL must be one of" in result.stderr, result.stderr
    assert_redacted(result.stderr, dsn, "the start-up error")
    assert_redacted((tmp_path / "logs" / "bot.log").read_text(encoding="utf-8"), dsn, "the start-up error's log line")


def test_a_task_db_that_is_not_the_bots_is_named_without_its_password(tmp_path, pg_server):
    database = pg_server.create_database().rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url(database), autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (999)")  # a newer bot's DB: a restart cannot fix that
    dsn = DSNS[3]
    task_db = dsn.template.format(port=pg_server.port, db=database)
    result = run_bot(tmp_path, "run", TASK_DB=task_db)
    assert result.returncode == 2 and "999" in result.stderr, result.stderr
    assert "password=***" in result.stderr and dsn.password not in result.stderr
    assert dsn.password not in (tmp_path / "logs" / "bot.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------- end to end: the agent prints the secrets


E2E_PASSWORD = "Pw-e2e-query-7Gk0"


def echo_bot(make_bot, pg_server, **settings: str):
    """A bot on PostgreSQL (its DSN holding E2E_PASSWORD) whose fake CLI prints CODEBUDDY_API_KEY when asked."""
    return make_bot(TASK_DB=f"{pg_server.create_database()}?password={E2E_PASSWORD}", CODEBUDDY_API_KEY=API_KEY,
                    CODEBUDDY_FAKE_ECHO="CODEBUDDY_API_KEY", SYNC_TIMEOUT="30", **settings)


PROMPT = f"[echo-env] print $CODEBUDDY_API_KEY, {CLIENT_SECRET} and {E2E_PASSWORD}"
E2E_SECRETS = (API_KEY, CLIENT_SECRET, E2E_PASSWORD)
# What the bot sends to a chat (the token request and the Stream's connections/open carry the app secret by design).
CHAT_PATHS = (WEBHOOK_PATH, BATCH_SEND_PATH, GROUP_SEND_PATH, CREATE_AND_DELIVER_PATH, STREAMING_PATH, INSTANCES_PATH)


def assert_none_shown(text: str, where: str) -> None:
    assert not [s for s in E2E_SECRETS if s in text], f"{where} shows a secret:\n{text}"


def assert_chat_clean(standin) -> None:
    sent = [request for request in standin.requests if request.path in CHAT_PATHS]
    assert sent
    for request in sent:
        assert_none_shown(request.raw_body, request.path)


@pytest.mark.e2e
def test_the_agent_printing_the_key_shows_it_masked_in_a_reply_a_push_and_the_log(standin, make_bot, pg_server):
    bot = echo_bot(make_bot, pg_server)
    sent = standin.send_bot_message(PROMPT, sender_staff_id="alice")
    reply = standin.wait_for(lambda: next((p.text for p in standin.webhook_posts(sent.session)
                                           if "CODEBUDDY_API_KEY=" in (p.text or "")), None), timeout=30)
    assert "CODEBUDDY_API_KEY=***" in reply, reply
    send_pushed(standin, PROMPT, sender_staff_id="bob")
    pushed = standin.wait_for(lambda: next((p.text for p in standin.batch_sends()
                                            if "CODEBUDDY_API_KEY=" in (p.text or "")), None), timeout=30)
    assert "CODEBUDDY_API_KEY=***" in pushed, pushed
    assert_chat_clean(standin)
    bot.terminate()
    assert_none_shown(bot.log_text() + bot.output.read_text(encoding="utf-8"), "the bot's log")


@pytest.mark.e2e
def test_the_agent_printing_the_key_into_an_ai_card_shows_it_masked(standin, make_bot, pg_server):
    cards = CardStandin(standin)
    bot = echo_bot(make_bot, pg_server, DINGTALK_CARD_TEMPLATE_ID=TEMPLATE_ID, CARD_UPDATE_INTERVAL="0.3")
    standin.send_bot_message(PROMPT, sender_staff_id="alice")
    card = standin.wait_for(lambda: next((c for c in cards.card_list() if c.status == "3"), None), timeout=30)
    assert "CODEBUDDY_API_KEY=***" in card.shown(), card.shown()
    for call in card.streams:
        assert_none_shown(call.content, "a card stream")
    assert_chat_clean(standin)
    bot.terminate()
    assert_none_shown(bot.log_text(), "the bot's log")
