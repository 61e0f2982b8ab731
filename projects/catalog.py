"""The projects file (`PROJECTS_FILE`, TOML): each project's remote, branch, users, push and token, read and checked
in one place, every problem named at once (docs/projects.md)."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
BRANCH_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,99}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")
# The workspace's own directories: a project checkout may not take their name.
RESERVED_NAMES = frozenset({"outbox", "attachments"})
PUSH_BRANCH_PREFIX = "codebuddy/"  # every branch /push makes starts with it: never a project's default branch
FORGES = ("github", "gitlab", "gitee", "gitea")
KEYS = frozenset({"url", "branch", "users", "push", "token_env", "forge"})
# A run's environment lets these through (codebuddy/sandbox.py): a token there would reach every run.
RUN_VISIBLE_PREFIXES = ("CODEBUDDY_", "LC_")
RUN_VISIBLE_NAMES = frozenset({"PATH", "LANG", "LANGUAGE", "TZ", "HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
                               "NODE_EXTRA_CA_CERTS", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"})


@dataclass(frozen=True)
class Project:
    """One project of the projects file: where its remote is, who may use it, and how the bot's git reaches it."""

    name: str
    url: str  # https://…, http://…, file:///… or an absolute local path
    branch: str = ""  # "": the remote's HEAD
    users: tuple[str, ...] = ()
    push: bool = False
    token_env: str = ""
    token: str = field(default="", repr=False)  # the value of token_env: given only to the bot's git, never to a run
    forge: str = ""  # "": guessed from the host (for the merge request link)

    @property
    def scheme(self) -> str:
        """The transport git uses for the remote: https, http or file."""
        scheme = urlsplit(self.url).scheme.lower()
        return scheme if scheme in ("https", "http") else "file"

    @property
    def everyone(self) -> bool:
        return "*" in self.users

    def may_use(self, user_id: str) -> bool:
        """Whether `user_id` may bind this project and pull, diff and push it."""
        return self.everyone or user_id in self.users


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_problems(url: str, has_token: bool) -> list[str]:
    """What is wrong with a project's url ([] when nothing)."""
    if not url or any(ch.isspace() or ord(ch) < 32 for ch in url) or url.startswith("-"):
        return ["url must be an https URL, a file:// URL or an absolute local path"]
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("https", "http"):
        if parts.username is not None or parts.password is not None:
            return ["url must not hold a user or password: put the token in the variable token_env names"]
        if not parts.hostname:
            return ["url names no host"]
        if scheme == "http" and has_token and not _is_loopback(parts.hostname):
            return ["a token would travel in clear over http://: use https://"]
        return []
    if scheme == "file":
        return [] if parts.path.startswith("/") and not parts.netloc else ["a file:// url must be file:///absolute/path"]
    if scheme or ":" in url.split("/", 1)[0]:
        return [f"{scheme or 'scp-style'} remotes are not supported: use https:// with token_env (ssh keys would be "
                "one more secret the bot holds)"]
    return [] if os.path.isabs(url) else ["a local path must be absolute"]


def _token_env_problems(name: str, url: str, environ: Mapping[str, str], bot_settings: Iterable[str]) -> list[str]:
    if not ENV_NAME_PATTERN.match(name):
        return [f"token_env {name!r} is not a variable name"]
    if name.startswith(RUN_VISIBLE_PREFIXES) or name.upper() in RUN_VISIBLE_NAMES or name in set(bot_settings):
        return [f"token_env {name} names a variable the bot hands to runs or uses itself: pick another name "
                "(e.g. DEMO_GIT_TOKEN)"]
    if urlsplit(url).scheme.lower() not in ("https", "http"):
        return ["token_env is used only with an https:// url"]
    if not environ.get(name, "").strip():
        return [f"token_env {name} is not set (in the environment or .env)"]
    return []


def _project(name: str, table: object, environ: Mapping[str, str],
             bot_settings: Iterable[str]) -> tuple[Project | None, list[str]]:
    """One [name] table as a Project, or the problems with it."""
    if not isinstance(table, dict):
        return None, [f"{name} must be a table ([{name}] with url = …), not a value"]
    problems = []
    if not NAME_PATTERN.match(name) or name in RESERVED_NAMES:
        problems.append("the name must be 1-40 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                        f"and not {' or '.join(sorted(RESERVED_NAMES))}")
    problems += [f"unknown key {key!r} (known: {', '.join(sorted(KEYS))})" for key in table if key not in KEYS]
    url, branch, users = table.get("url", ""), table.get("branch", ""), table.get("users")
    push, token_env, forge = table.get("push", False), table.get("token_env", ""), table.get("forge", "")
    if not isinstance(url, str) or not url:
        problems.append("url is missing")
        url = ""
    else:
        problems += _url_problems(url, bool(token_env))
    if not isinstance(branch, str) or (branch and (not BRANCH_PATTERN.match(branch) or ".." in branch
                                                   or "//" in branch or branch.endswith(("/", ".lock", ".")))):
        problems.append("branch must be a plain branch name (or left out for the remote's HEAD)")
        branch = ""
    elif branch.startswith(PUSH_BRANCH_PREFIX):
        problems.append(f"branch may not start with {PUSH_BRANCH_PREFIX} (the branches /push makes)")
    if not isinstance(users, list) or not users or not all(isinstance(u, str) and u.strip() for u in users):
        problems.append('users must list the staff ids who may use the project, or be ["*"] for everyone')
        users = []
    if not isinstance(push, bool):
        problems.append("push must be true or false")
    if not isinstance(forge, str) or (forge and forge not in FORGES):
        problems.append(f"forge must be one of {', '.join(FORGES)} (or left out to guess from the host)")
    if not isinstance(token_env, str):
        problems.append("token_env must be the name of an environment variable")
    elif token_env:
        problems += _token_env_problems(token_env, url, environ, bot_settings)
    if problems:
        return None, [f"[{name}] {problem}" for problem in problems]
    return Project(name=name, url=url, branch=branch, users=tuple(u.strip() for u in users), push=push,
                   token_env=token_env, token=environ.get(token_env, "").strip() if token_env else "",
                   forge=forge), []


def projects_path(setting: str, dotenv_path: str | os.PathLike | None) -> str:
    """Where the projects file is: PROJECTS_FILE, a relative one beside `.env`."""
    if os.path.isabs(setting) or dotenv_path is None:
        return os.path.abspath(setting)
    return os.path.join(os.path.dirname(os.path.abspath(dotenv_path)), setting)


def load_projects(path: str, environ: Mapping[str, str], *, required: bool = False,
                  bot_settings: Iterable[str] = ()) -> tuple[tuple[Project, ...], list[str]]:
    """The projects of the file at `path` and every problem with it (a missing file: no projects, unless
    `required`); `environ` holds the tokens (the environment over .env)."""
    where = f"PROJECTS_FILE ({path})"
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        return (), ([f"{where} does not exist"] if required else [])
    except OSError as exc:
        return (), [f"{where} cannot be read: {exc.strerror or exc}"]
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        return (), [f"{where} is not valid TOML: {exc}"]
    projects, problems = [], []
    bot_settings = tuple(bot_settings)
    for name, table in data.items():
        project, wrong = _project(name, table, environ, bot_settings)
        problems += [f"{where}: {problem}" for problem in wrong]
        if project is not None:
            projects.append(project)
    return tuple(projects), problems
