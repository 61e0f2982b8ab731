"""The bot's own git: every git process it starts gets a built environment and configuration that nothing on disk can
change (no system or global config, hooks off, no pager, one transport), and a project's token only for its remote.

A repository's own config (`.git/config`) is still read by git, so this runner is only ever pointed at repositories
the bot made and owns (its mirrors and scratch copies, docs/projects.md), never at a workspace's `.git`.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from common.redaction import replace_secrets
from projects.catalog import Project

log = logging.getLogger("projects")

GIT_TIMEOUT = 300.0  # seconds one git process may take (a first fetch of a large project)
# Of the bot's environment only these reach its git: the binary's path, the operator's CA and proxy.
PASSED_VARIABLES = ("PATH", "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO", "http_proxy", "https_proxy",
                    "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")
# Given to every git process on top of an empty system and global config (docs/projects.md says why each).
HARDENED_CONFIG: tuple[tuple[str, str], ...] = (
    ("core.hooksPath", "/dev/null"),  # no hook runs, wherever a repository's config points
    ("core.fsmonitor", "false"),  # no file-system monitor command
    ("core.pager", "cat"),
    ("core.sshCommand", "false"),  # ssh is not a transport the bot speaks
    ("core.askPass", "false"),  # never prompt: a wrong token fails
    ("core.symlinks", "true"),
    ("core.autocrlf", "false"),
    ("core.untrackedCache", "false"),
    ("core.logAllRefUpdates", "false"),  # no reflog naming a host path in what a run later sees
    ("credential.helper", ""),  # the empty value clears the list: no helper runs, nothing is stored
    ("protocol.allow", "never"),  # then one transport allowed per process (`Git.run(scheme=…)`)
    ("http.followRedirects", "false"),  # the token is not carried to a host the operator did not name
    ("transfer.fsckObjects", "true"),  # objects that enter a repository of the bot are checked first
    ("submodule.recurse", "false"),
    ("fetch.recurseSubmodules", "false"),
    ("push.recurseSubmodules", "no"),
    ("gc.auto", "0"),  # no background gc process
    ("maintenance.auto", "false"),
    ("color.ui", "false"),
    ("init.defaultBranch", "main"),
    ("advice.detachedHead", "false"),
)
BOT_IDENTITY = ("DingTalk CodeBuddy bot", "codebuddy-bot@localhost")
_SHA = re.compile(r"^[0-9a-f]{40}$")


class GitError(Exception):
    """A git process failed: `str()` is one line fit for the log and the chat (no token, no long output)."""


@dataclass(frozen=True)
class Identity:
    """Who a commit names as its author or committer."""

    name: str
    email: str


def git_environment(source: Mapping[str, str], config: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The environment of one git process: nothing of the bot's but PASSED_VARIABLES, no system or global config,
    no prompt, no pager, and `config` as command-line configuration (`GIT_CONFIG_COUNT`: never in argv, where
    other users of the host could read it in /proc)."""
    env = {name: source[name] for name in PASSED_VARIABLES if name in source}
    env.setdefault("PATH", os.defpath)
    env.update({"HOME": "/nonexistent", "LANG": "C", "LC_ALL": "C", "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_SYSTEM": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
                "GIT_ASKPASS": "false", "SSH_ASKPASS": "false", "GIT_PAGER": "cat", "PAGER": "cat",
                "GIT_NO_REPLACE_OBJECTS": "1", "GIT_OPTIONAL_LOCKS": "0"})
    pairs = list(config)
    env["GIT_CONFIG_COUNT"] = str(len(pairs))
    for index, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    return env


def auth_header(token: str) -> str:
    """The HTTP header carrying a project's token: `user:token` as given, or the token with the user `oauth2`
    (GitHub, GitLab, Gitee and Gitea all take a token as the password of any user)."""
    user, _, secret = token.partition(":") if ":" in token else ("oauth2", "", token)
    return "Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def transport_config(scheme: str, token: str = "") -> list[tuple[str, str]]:
    """The configuration that allows one transport (and, for http(s), sends the token)."""
    config = [(f"protocol.{scheme}.allow", "always")]
    if token and scheme in ("https", "http"):
        config.append(("http.extraHeader", auth_header(token)))
    return config


def _tail(data: bytes, secrets: Sequence[str]) -> str:
    text = " ".join(data.decode("utf-8", "replace").split())
    return replace_secrets(text, [s for s in secrets if s])[-400:]


class Git:
    """Runs git with the hardened environment, at a repository the bot owns (`git_dir`)."""

    def __init__(self, binary: str = "git", environ: Mapping[str, str] | None = None,
                 timeout: float = GIT_TIMEOUT) -> None:
        self.binary = binary
        self.source = dict(os.environ if environ is None else environ)
        self.timeout = timeout

    def run(self, args: Sequence[str], *, git_dir: str, work_tree: str = "", scheme: str = "", token: str = "",
            config: Iterable[tuple[str, str]] = (), env: Mapping[str, str] | None = None,
            input_data: bytes | None = None, timeout: float | None = None, cwd: str = "") -> bytes:
        """`git --git-dir=… args` (no --git-dir when `git_dir` is "": a clone, run in `cwd`); its stdout. Raises
        GitError (with the end of stderr, the token replaced)."""
        settings = [*HARDENED_CONFIG, *(transport_config(scheme, token) if scheme else ()), *config]
        environment = {**git_environment(self.source, settings), **(env or {})}
        argv = [self.binary, *([f"--git-dir={git_dir}"] if git_dir else []),
                *([f"--work-tree={work_tree}"] if work_tree else []), *args]
        try:
            done = subprocess.run(argv, cwd=cwd or git_dir, env=environment, input=input_data, capture_output=True,
                                  stdin=None if input_data is not None else subprocess.DEVNULL,
                                  timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {timeout or self.timeout:.0f} s") from None
        except OSError as exc:
            raise GitError(f"git could not start: {exc.strerror or exc}") from None
        if done.returncode != 0:
            detail = _tail(done.stderr, [token, auth_header(token)] if token else []) or f"exit code {done.returncode}"
            raise GitError(f"git {args[0]} failed: {detail}")
        return done.stdout

    def text(self, args: Sequence[str], **kwargs: object) -> str:
        """`run`, its output as stripped text."""
        return self.run(args, **kwargs).decode("utf-8", "replace").strip()  # type: ignore[arg-type]

    def init_bare(self, path: str) -> None:
        """A new bare repository the bot owns (no template: no sample hooks), mode 0700."""
        os.makedirs(path, mode=0o700, exist_ok=True)
        self.run(["init", "-q", "--bare", "--template="], git_dir=path)

    # -- the project's remote, with its token

    def remote_head(self, project: Project, git_dir: str) -> str:
        """The branch the remote's HEAD names (the project's default when it names none)."""
        out = self.text(["ls-remote", "--symref", "--", project.url, "HEAD"], git_dir=git_dir,
                        scheme=project.scheme, token=project.token)
        match = re.search(r"^ref: refs/heads/(\S+)\tHEAD$", out, re.M)
        if match is None:
            raise GitError("the remote names no default branch: set branch = … in the projects file")
        return match.group(1)

    def remote_branches(self, project: Project, git_dir: str, pattern: str) -> dict[str, str]:
        """The remote's branches matching `pattern` (refs/heads/…): name → commit."""
        out = self.text(["ls-remote", "--heads", "--", project.url, pattern], git_dir=git_dir,
                        scheme=project.scheme, token=project.token)
        branches = {}
        for line in out.splitlines():
            sha, _, ref = line.partition("\t")
            if _SHA.match(sha) and ref.startswith("refs/heads/"):
                branches[ref.removeprefix("refs/heads/")] = sha
        return branches

    def fetch_branch(self, project: Project, git_dir: str, branch: str) -> str:
        """Fetch `branch` of the remote into the mirror's refs/heads/; its commit."""
        self.run(["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--", project.url,
                  f"+refs/heads/{branch}:refs/heads/{branch}"], git_dir=git_dir, scheme=project.scheme,
                 token=project.token)
        return self.text(["rev-parse", "--verify", f"refs/heads/{branch}^{{commit}}"], git_dir=git_dir)

    def push_branch(self, project: Project, git_dir: str, commit: str, branch: str) -> None:
        """Create `branch` on the remote at `commit`: never forced, never a branch but codebuddy/…."""
        if not branch.startswith("codebuddy/") or branch == project.branch or not _SHA.match(commit):
            raise GitError(f"refusing to push {branch}")
        self.run(["push", "-q", "--no-verify", "--no-follow-tags", "--", project.url,
                  f"{commit}:refs/heads/{branch}"], git_dir=git_dir, scheme=project.scheme, token=project.token)


def check_remote(git: Git, project: Project, scratch: str) -> tuple[bool, str]:
    """`bot.py check`'s line for a project: whether its remote answers the bot's git, with the token."""
    try:
        git.init_bare(scratch)
        branch = project.branch or git.remote_head(project, scratch)
        heads = git.remote_branches(project, scratch, f"refs/heads/{branch}")
    except GitError as exc:
        return False, f"{project.url} does not answer: {exc}"
    if branch not in heads:
        return False, f"{project.url} answers but has no branch {branch}"
    token = f", token from {project.token_env}" if project.token else ""
    return True, f"{project.url} answers: {branch} at {heads[branch][:10]}{token}; users {', '.join(project.users)}"
