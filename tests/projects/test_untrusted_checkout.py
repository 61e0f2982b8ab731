"""The bot's git and a checkout the agent controls: every planted attack fires under plain git (the control: the
attack is live) and runs nothing, reads nothing outside the workspace, when the bot takes the checkout's changes
(snapshot, fetch into the mirror, diff there, push to the remote)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from projects.catalog import Project
from projects.git import Git, GitError, Identity, git_environment
from projects.workspace_repo import Refused, fetch_snapshot, snapshot

SECRET = "TOP-SECRET-VALUE-31337"


def plain_git(*args: str, cwd: Path, input_text: str | None = None) -> subprocess.CompletedProcess:
    """git as a careless bot would run it in the checkout: the repository's own config and hooks honoured."""
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x",
           "GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@x", "GIT_TERMINAL_PROMPT": "0"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          input=input_text, stdin=None if input_text is not None else subprocess.DEVNULL)


@pytest.fixture
def world(tmp_path):
    """A workspace with a checkout `demo` (one commit, one uncommitted change), another conversation's checkout,
    a bare remote, the bot's mirror, a canary path and a secret file outside the workspace."""
    remote = tmp_path / "remote.git"
    plain_git("init", "-q", "--bare", "-b", "main", str(remote), cwd=tmp_path)
    workspace, other = tmp_path / "ws", tmp_path / "other-ws"
    for root, text in ((workspace, "hello\n"), (other, "VICTIM-FILE-CONTENT\n")):
        checkout = root / "demo"
        checkout.mkdir(parents=True)
        plain_git("init", "-q", "-b", "main", cwd=checkout)
        (checkout / "README.md").write_text(text)
        plain_git("add", "-A", cwd=checkout)
        plain_git("commit", "-qm", "first", cwd=checkout)
    plain_git("push", "-q", str(remote), "main", cwd=workspace / "demo")
    (workspace / "demo" / "README.md").write_text("hello\nchanged\n")
    secret = tmp_path / "secret.conf"
    secret.write_text(f"[leak]\n\tvalue = {SECRET}\n")
    git = Git()
    mirror = tmp_path / "mirror.git"
    git.init_bare(str(mirror))
    git.run(["fetch", "-q", "--", str(remote), "+refs/heads/main:refs/heads/main"], git_dir=str(mirror),
            scheme="file")
    return {"tmp": tmp_path, "workspace": workspace, "checkout": workspace / "demo", "other": other / "demo",
            "remote": remote, "mirror": mirror, "canary": tmp_path / "CANARY", "secret": secret, "git": git}


def script(world: dict, name: str = "evil.sh") -> Path:
    path = world["checkout"] / name
    path.write_text(f"#!/bin/sh\ncat {world['secret']} >> {world['canary']}\necho ran >> {world['canary']}\n")
    path.chmod(0o755)
    return path


def hook(world: dict, name: str, directory: Path | None = None) -> None:
    hooks = directory or world["checkout"] / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / name).write_text(script(world).read_text())
    (hooks / name).chmod(0o755)


def configure(world: dict, *pairs: tuple[str, str]) -> None:
    for key, value in pairs:
        plain_git("config", key, value, cwd=world["checkout"])


# Each attack: (plant it, set off under plain git — the control).
ATTACKS: dict[str, tuple[Callable[[dict], None], Callable[[dict], object]]] = {
    "pre-commit hook": (lambda w: hook(w, "pre-commit"),
                        lambda w: plain_git("commit", "-qam", "x", cwd=w["checkout"])),
    "post-checkout hook": (lambda w: hook(w, "post-checkout"),
                           lambda w: plain_git("checkout", "-q", "-b", "side", cwd=w["checkout"])),
    "pre-push hook": (lambda w: hook(w, "pre-push"),
                      lambda w: plain_git("push", "-q", str(w["remote"]), "HEAD:refs/heads/x", cwd=w["checkout"])),
    "core.hooksPath": (lambda w: (hook(w, "pre-commit", w["checkout"] / "myhooks"),
                                  configure(w, ("core.hooksPath", str(w["checkout"] / "myhooks")))),
                       lambda w: plain_git("commit", "-qam", "x", cwd=w["checkout"])),
    "core.fsmonitor": (lambda w: configure(w, ("core.fsmonitor", str(script(w)))),
                       lambda w: plain_git("status", cwd=w["checkout"])),
    "clean filter": (lambda w: (configure(w, ("filter.evil.clean", str(script(w)))),
                                (w["checkout"] / ".gitattributes").write_text("*.md filter=evil\n")),
                     lambda w: plain_git("add", "-A", cwd=w["checkout"])),
    "smudge filter": (lambda w: (configure(w, ("filter.evil.smudge", str(script(w)))),
                                 (w["checkout"] / ".git" / "info").mkdir(exist_ok=True),
                                 (w["checkout"] / ".git" / "info" / "attributes").write_text("* filter=evil\n")),
                      lambda w: plain_git("checkout", "--", "README.md", cwd=w["checkout"])),
    "diff.external": (lambda w: configure(w, ("diff.external", str(script(w)))),
                      lambda w: plain_git("diff", cwd=w["checkout"])),
    "core.sshCommand": (lambda w: configure(w, ("core.sshCommand", str(script(w)))),
                        lambda w: plain_git("ls-remote", "ssh://example.invalid/x.git", cwd=w["checkout"])),
    "credential.helper": (lambda w: configure(w, ("credential.helper", f"!{script(w)}")),
                          lambda w: plain_git("credential", "fill", cwd=w["checkout"],
                                              input_text="protocol=https\nhost=example.invalid\n\n")),
    "include.path": (lambda w: configure(w, ("include.path", str(w["secret"]))),
                     lambda w: w["canary"].write_text(plain_git("config", "leak.value", cwd=w["checkout"]).stdout)),
}


def take_changes(world: dict, author: str = "Olga") -> str:
    """What the bot does for /diff and /push: snapshot into scratch, fetch into the mirror, diff there, push."""
    git, mirror = world["git"], str(world["mirror"])
    snap = snapshot(git, str(world["tmp"] / "scratch.git"), str(world["workspace"]), "demo",
                    Identity(author, "olga@dingtalk"), "changes")
    fetch_snapshot(git, mirror, str(world["tmp"] / "scratch.git"))
    diff = git.text(["diff", "--no-ext-diff", "--no-textconv", "main", snap.worktree], git_dir=mirror)
    git.push_branch(Project(name="demo", url=str(world["remote"])), mirror, snap.worktree, "codebuddy/t-1")
    return diff


@pytest.mark.parametrize("attack", ATTACKS, ids=list(ATTACKS))
def test_a_planted_attack_fires_under_plain_git_and_never_under_the_bots(world, attack):
    plant, set_off = ATTACKS[attack]
    plant(world)
    set_off(world)
    assert world["canary"].exists(), f"the control did not fire: {attack} is not live"
    world["canary"].unlink()
    (world["checkout"] / "README.md").write_text("hello\nchanged\n")  # as before the control (a smudge empties it)
    diff = take_changes(world)
    assert not world["canary"].exists(), f"{attack} ran under the bot's git"
    assert "+changed" in diff and SECRET not in diff
    objects = subprocess.run(["git", f"--git-dir={world['remote']}", "cat-file", "--batch-all-objects", "--batch"],
                             capture_output=True, check=True).stdout
    assert SECRET.encode() not in objects


@pytest.mark.parametrize("shape", ["alternates", "symlink", "gitdir"])
def test_a_git_dir_reaching_another_repository_is_refused_and_the_control_reads_it(world, shape):
    checkout, other = world["checkout"], world["other"]
    victim = plain_git("rev-parse", "HEAD", cwd=other).stdout.strip()
    if shape == "alternates":
        (checkout / ".git" / "objects" / "info" / "alternates").write_text(f"{other / '.git' / 'objects'}\n")
        (checkout / ".git" / "refs" / "heads" / "main").write_text(victim + "\n")
    else:
        os.rename(checkout / ".git", checkout / "own-git")
        if shape == "symlink":
            os.symlink(other / ".git", checkout / ".git")
        else:
            (checkout / ".git").write_text(f"gitdir: {other / '.git'}\n")
    assert "VICTIM-FILE-CONTENT" in plain_git("show", "HEAD:README.md", cwd=checkout).stdout  # the control
    with pytest.raises(Refused) as refused:
        take_changes(world)
    assert {"alternates": "objects/info/alternates 存在", "symlink": ".git 是符号链接",
            "gitdir": ".git 是文件 (gitdir: 指向别处)"}[shape] in str(refused.value)


def test_a_nested_repository_is_left_out_and_its_gitdir_never_followed(world):
    nested = world["checkout"] / "vendor" / "lib"
    nested.mkdir(parents=True)
    (nested / ".git").write_text(f"gitdir: {world['other'] / '.git'}\n")
    (nested / "code.py").write_text("x = 1\n")
    victim = plain_git("rev-parse", "HEAD", cwd=world["other"]).stdout.strip()
    plain_git("add", "-A", "--dry-run", cwd=world["checkout"])
    control = plain_git("add", "-A", cwd=world["checkout"])
    assert victim in plain_git("ls-files", "-s", "vendor/lib", cwd=world["checkout"]).stdout, control.stderr
    plain_git("reset", "-q", cwd=world["checkout"])
    snap = snapshot(world["git"], str(world["tmp"] / "scratch.git"), str(world["workspace"]), "demo",
                    Identity("a", "a@x"), "m")
    assert snap.skipped == ("vendor/lib",)
    listed = world["git"].text(["ls-tree", "-r", snap.worktree], git_dir=str(world["tmp"] / "scratch.git"))
    assert "vendor" not in listed and victim not in listed


def test_symlinks_in_the_checkout_are_stored_as_links_never_read(world):
    os.symlink(world["secret"], world["checkout"] / "leak.conf")
    os.symlink(world["tmp"], world["checkout"] / "host")
    os.symlink(world["secret"], world["checkout"] / ".gitignore")
    diff = take_changes(world)
    assert f"+{world['secret']}" in diff and SECRET not in diff


def test_the_token_reaches_git_only_in_its_environment_and_nothing_of_the_bot_does(tmp_path):
    spy = tmp_path / "git"
    spy.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/argv\nenv > {tmp_path}/env\n")
    spy.chmod(0o755)
    project = Project(name="p", url="https://git.example.com/p.git", token="tok-SECRET-77")
    git = Git(binary=str(spy), environ={"PATH": os.environ["PATH"], "DINGTALK_CLIENT_SECRET": "bot-secret",
                                        "CODEBUDDY_API_KEY": "model-key", "GIT_DIR": "/elsewhere"})
    git.run(["ls-remote", "--", project.url], git_dir=str(tmp_path), scheme="https", token=project.token)
    argv, env = (tmp_path / "argv").read_text(), (tmp_path / "env").read_text()
    assert "tok-SECRET" not in argv and "Authorization: Basic " in env
    assert "bot-secret" not in env and "model-key" not in env and "/elsewhere" not in env
    assert "GIT_CONFIG_GLOBAL=/dev/null" in env and "GIT_CONFIG_NOSYSTEM=1" in env
    assert git_environment({}, [("a.b", "c")])["GIT_CONFIG_KEY_0"] == "a.b"


def test_the_bot_never_pushes_a_branch_but_a_new_codebuddy_one_and_never_forces(world):
    git, mirror = world["git"], str(world["mirror"])
    head = git.text(["rev-parse", "main"], git_dir=mirror)
    project = Project(name="demo", url=str(world["remote"]), branch="main")
    for branch in ("main", "feature", "codebuddy-x"):
        with pytest.raises(GitError, match="refusing to push"):
            git.push_branch(project, mirror, head, branch)
    git.push_branch(project, mirror, head, "codebuddy/t-1")
    people = {"GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@x", "GIT_COMMITTER_NAME": "a",
              "GIT_COMMITTER_EMAIL": "a@x"}
    orphan = git.text(["commit-tree", "-m", "x", "main^{tree}"], git_dir=mirror, env=people)
    with pytest.raises(GitError, match="rejected"):  # not a fast-forward of the branch: refused, never forced
        git.push_branch(project, mirror, orphan, "codebuddy/t-1")
    assert plain_git("rev-parse", "codebuddy/t-1", cwd=world["remote"]).stdout.strip() == head
