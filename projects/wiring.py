"""The wiring of projects, from the settings: runs started in a bound checkout and kept apart from its git, and the
project chat commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from codebuddy.sandbox import Workspaces
from codebuddy_client import CodeBuddyClient
from config import Config
from dingtalk.route import Route
from projects.bindings import Bindings, ProjectClient
from projects.changes import ProjectChanges
from projects.commands import ProjectCommands
from projects.git import Git
from projects.jailed import run_in_jail


def with_project_runs(config: Config, cli: CodeBuddyClient, client: Any) -> tuple[Any, Bindings | None]:
    """`client` wrapped so a conversation's run and its project git never overlap, and `cli` told where a bound
    conversation starts; unchanged (and no bindings) when PROJECTS_FILE names no project."""
    if not config.projects:
        return client, None
    bindings = Bindings(Workspaces(config.codebuddy_workdir))
    cli.place_for = bindings.place_for
    return ProjectClient(client, bindings), bindings


def project_commands(config: Config, cli: CodeBuddyClient, bindings: Bindings, *,
                     new_session: Callable[[str], object],
                     send_file: Callable[[Route, str, str], str] | None) -> ProjectCommands:
    """The project chat commands: git in the bot's mirrors, /pull's merge in the conversation's jail, patches sent
    through the outbox's metered upload and push."""
    git = Git()
    changes = ProjectChanges(git, bindings, send_file=send_file,
                             jail=lambda key, subdir, argv: run_in_jail(cli, key, subdir, argv),
                             max_patch_bytes=config.max_attachment_mb * 1024 * 1024,
                             quiesce=lambda key: cli.pool.end_idle(key, "项目命令读取工作副本"))
    return ProjectCommands(config.projects, bindings, git, changes, new_session=new_session)
