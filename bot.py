"""DingTalk ⇄ CodeBuddy bot: the entry point — the DingTalk Stream transport, the wiring and the command line.

Where a message goes:
  DingTalk Stream frame → `StreamConnections` (dingtalk/stream.py: STREAM_CONNECTIONS connect/receive loops)
  → `BotStreamHandler.process` hands the frame to the intake thread (dingtalk/intake.py), ACKs once it is recorded (ms)
  → `incoming_from_callback` turns it into the neutral `IncomingMessage`
  → `ChatApp.handle` (chat/app.py): access checks, rate limit, dedup, chat commands
  → `AsyncTaskManager.submit` (async_task_manager.py): acknowledgement, queue, CLI run, delivery
  → `CodeBuddyClient.run` (codebuddy_client.py) and `DingTalkSender.send` (dingtalk_sender.py).

Run `python bot.py --help` for the commands; docs/architecture.md has the whole house.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import ops.dependencies  # noqa: F401  (first: a missing package is one line saying to install, not a traceback)

from async_task_manager import AsyncTaskManager
from cards.api import CARD_CALLBACK_TOPIC
from cards.wiring import attach_budget_and_cards, card_handler, card_topics
from chat import console
from chat.app import ChatApp
from cluster.hosts import join_cluster, this_host
from codebuddy_client import CodeBuddyClient
from common.logs import log_destination, output_handlers, setup_logging, stop_logging
from common.redaction import dsn_passwords, redact_secrets
from common.supervision import install_exception_hooks
from config import (
    Config,
    ConfigError,
    load_config,
    read_config,
    setting_default,
)
from dingtalk.incoming import incoming_from_callback
from dingtalk.intake import Intake
from dingtalk.stream import INTAKE_ACK_WAIT, StreamConnections
from dingtalk_sender import DingTalkSender
from files.wiring import start_attachment_sweep, with_file_transfer
from ops import (
    command_line,
    doctor,
    health,
    schedule_table,
    systemd_notify,
    task_table,
    usage_report,
)
from ops.admin_view import book_usage
from ops.metrics import DurationHistogram, TimedClient
from ops.startup import (
    StartCancelled,
    claim_host_identity,
    config_failure,
    load_local_config,
    open_task_store_when_up,
    refuse_a_clock_far_off,
    report_cli,
    sandbox_problem,
)
from ops.status_server import StatusSources, start_status_server
from ops.store_admin import migrate_store
from projects.wiring import project_commands, with_project_runs
from schedules.firing import ScheduleFiring
from schedules.wiring import schedule_parts
from store.schema import StoreError
from usage.wiring import usage_parts

__all__ = ["main", "run_daemon", "setup_logging"]

log = logging.getLogger("bot")


# ---------------------------------------------------------------- wiring


def build_app(config: Config, durations: DurationHistogram | None = None
              ) -> tuple[DingTalkSender, TimedClient, AsyncTaskManager, ChatApp, ScheduleFiring]:
    """Create the sender, client (its runs timed into `durations`), store, manager, chat app and the schedules'
    firing thread from `config`."""
    sender = DingTalkSender(config.openapi_endpoint, config.client_id, config.client_secret, config.robot_code,
                            retry_window=config.delivery_retry_window, secrets=config.secrets)
    cli = CodeBuddyClient.from_config(config)
    files_client, after_result, attachments = with_file_transfer(config, sender, cli)
    client, bindings = with_project_runs(config, cli, files_client)  # a bound chat's runs start in its checkout
    client = TimedClient(client, durations or DurationHistogram())
    store = open_task_store_when_up(config)  # a PostgreSQL that does not answer yet is waited for, not exit 2
    refuse_a_clock_far_off(config, store)  # hosts on one DB must agree on the time
    manager = AsyncTaskManager.from_config(config, client, sender, store, after_result)
    attach_budget_and_cards(config, sender, manager)  # the monthly call budget; AI cards when a template is set
    projects = None if bindings is None else project_commands(  # /project, /pull, /diff, /push
        config, cli, bindings, new_session=manager.new_session, send_file=files_client.files.send_file)
    schedules, firing = schedule_parts(config, manager)  # /every, /schedules …, and the thread that fires them
    usage, quotas = usage_parts(config, manager)  # every run's tokens, cost and CPU recorded; quotas; /usage
    firing.quota = quotas.refusal  # a fire over its sender's quota is skipped
    app = ChatApp(manager, config, attachments=attachments, projects=projects, schedules=schedules, usage=usage)
    return sender, client, manager, app, firing


def run_daemon(config: Config) -> int:
    """Run the bot until SIGTERM/SIGINT."""
    os.environ["DINGTALK_OPENAPI_ENDPOINT"] = config.openapi_endpoint  # the SDK reads it at import
    durations = DurationHistogram()  # every run's duration feeds /metrics
    sender, client, manager, app, firing = build_app(config, durations)
    print(log_destination(), file=sys.stderr, flush=True)  # after the store opened: a start-up fault stays one line
    log.info("启动 DingTalk CodeBuddy 机器人: workers=%d, sync_timeout=%.0fs, task_timeout=%.0fs, cli=%s",
             config.max_workers, config.sync_timeout, config.task_timeout, client.binary)
    client.start()  # kills CLI processes a crash of this bot left behind; ends idle warm ones from now on
    join_cluster(config, manager)  # recover this host's tasks; with PostgreSQL, share them with the other hosts
    client.files.resume(manager.get_task)  # files staged for answers delivered just before the bot stopped
    start_attachment_sweep(config, manager.supervisor)  # what people sent goes after ATTACHMENT_RETENTION_DAYS
    manager.start()
    firing.start()  # due schedules become tasks (docs/schedules.md)

    def on_data(data: dict) -> None:
        try:
            message = incoming_from_callback(data)
        except ValueError as exc:
            log.warning("忽略无法解析的机器人消息: %s", exc)
            return
        try:
            app.handle(message)
        except Exception:
            log.exception("处理消息失败 msgId=%s user=%s", message.msg_id, message.user_id)

    # One thread keeps message order; a batch's ACKs wait for its records to be written (or the store to be down).
    intake = Intake(on_data, lambda: manager.store.wait_written(INTAKE_ACK_WAIT), supervisor=manager.supervisor)
    on_card = card_handler(config, manager)  # the buttons of AI cards, when cards are on
    stream = StreamConnections(config, intake, count=config.stream_connections, idle_timeout=config.stream_idle_timeout,
                               topics=card_topics(config),
                               callbacks={CARD_CALLBACK_TOPIC: on_card} if on_card is not None else None)
    notifier = systemd_notify.SystemdNotifier.from_environ(os.environ)  # sd_notify; a no-op outside systemd
    usage_book = app.usage.quotas.book if app.usage is not None else None  # /metrics and the admin page read it
    status_server = start_status_server(config.status_port, StatusSources(
        manager=manager, sender=sender, client=client, stream=stream, store=manager.store,
        supervisor=manager.supervisor, intake=intake, durations=durations, schedules=firing,
        usage_book=usage_book, usage=None if usage_book is None else book_usage(usage_book),
        host=this_host(config), token=config.status_token, tz=config.schedule_tz, secrets=config.secrets))

    def core_alive() -> bool:  # a dead core thread stops the watchdog pings, and systemd restarts the bot
        return not health.core_problems(manager.supervisor, intake)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            notifier.stopping()
            stream.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        watchdog = asyncio.create_task(systemd_notify.notify_systemd(notifier, lambda: stream.connected,
                                                                     alive=core_alive))
        await stream.run()
        watchdog.cancel()

    asyncio.run(main())
    log.info("收到停止信号，停止接收新消息，等待运行中的任务 (最多 %.0f 秒)", config.shutdown_grace)
    manager.supervisor.stop()
    firing.stop()
    intake.shutdown()  # messages already ACKed become queued tasks, re-run after the restart
    manager.shutdown(config.shutdown_grace)
    if app.usage is not None:
        app.usage.quotas.book.stop()  # the runs that ended last are written
    if app.projects is not None:
        app.projects.shutdown()
    sender.stop()
    if status_server is not None:
        status_server.stop()
    log.info("机器人已停止")
    stop_logging()
    logging.shutdown()
    return 0


# ---------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command (the daemon when none is given); returns the exit code."""
    args = command_line.build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "check":
        return doctor.run_check(os.environ)
    if command == "tasks":  # reads the task DB only: a half-filled .env does not stop it
        config = read_config(os.environ)[0]
        db = args.db or config.task_db
        try:
            return task_table.print_tasks(db, user=args.user, status=args.status, limit=args.limit,
                                          secrets=config.secrets)
        except StoreError as exc:
            return startup_failure(f"任务数据库无法打开: {exc}", (*config.secrets, *dsn_passwords(db)))
    if command == "schedules":  # reads the task DB only, like tasks
        config = read_config(os.environ)[0]
        db = args.db or config.task_db
        try:
            return schedule_table.print_schedules(db, config.schedule_tz, secrets=config.secrets)
        except StoreError as exc:
            return startup_failure(f"任务数据库无法打开: {exc}", (*config.secrets, *dsn_passwords(db)))
    if command == "usage":  # reads the task DB only, like tasks
        config = read_config(os.environ)[0]
        db = args.db or config.task_db
        return usage_report.print_usage(db, config.schedule_tz, month=args.month, by=args.by, as_csv=args.csv,
                                        secrets=config.secrets)
    if command == "migrate-store":  # needs the target only: a half-filled .env does not stop it
        return migrate_store(args.sqlite_path, args.to or read_config(os.environ)[0].task_db)
    try:
        config = load_config() if command == "run" else load_local_config(os.environ)
    except ConfigError as exc:
        secrets = read_config(os.environ)[0].secrets  # the problems may quote a value: the secrets that were read
        if command == "run":  # the operator greps the log: the reason goes there too
            setup_logging(os.environ.get("LOG_FILE") or setting_default("LOG_FILE"), "INFO", secrets)
        return startup_failure(config_failure(exc), secrets)
    # On a terminal the log lines show there too; the console shows only warnings (lines would drown the chat).
    handler = setup_logging(config.log_file, config.log_level, config.secrets, echo=sys.stderr.isatty(),
                            writer_thread=command == "run",
                            echo_level="WARNING" if command == "console" else "DEBUG")
    install_exception_hooks()
    problem = sandbox_problem(config)
    if problem:
        return startup_failure(problem, config.secrets)
    report_cli(config)
    if command == "console":
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
        print(log_destination(), file=sys.stderr, flush=True)
        return console.run_console(config, user_id=args.user)
    identity, problem = claim_host_identity(config)  # held until the process ends
    if problem:
        return startup_failure(problem)
    try:
        return run_daemon(config)
    except StartCancelled:  # stopped while waiting for the task DB: a clean stop, not a failure
        return 0
    except StoreError as exc:  # what a restart cannot fix (a newer schema, not the bot's DB, a bad URL): exit 2
        return startup_failure(f"任务数据库无法打开: {exc}", config.secrets)


def startup_failure(message: str, secrets: tuple[str, ...] = ()) -> int:
    """A start-up error: one message on stderr and one line in the log, `secrets` and anything token-like shown as
    ***; exit code 2 (systemd does not restart)."""
    message = redact_secrets(message, secrets)
    to_file = any(isinstance(handler, logging.FileHandler) for handler in output_handlers())
    if not (to_file and _logs_to_stderr()):  # a terminal that echoes the log shows the logged line instead
        print(message, file=sys.stderr)
    if to_file:
        log.error(message)
    return 2


def _logs_to_stderr() -> bool:
    return any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               and getattr(h, "stream", None) is sys.stderr for h in output_handlers())


if __name__ == "__main__":
    code = main()
    stop_logging()  # the log writer thread's last lines reach the file before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leftover non-daemon pool threads must not delay a systemd stop
