"""End to end: a chat bound to a git project — /project puts a checkout in the workspace where the next run starts,
the agent edits and commits in its jail, /diff sends the patch, /push makes a codebuddy/… branch on the remote (a
bare repository on disk) with the sender as author, and the default branch is never touched.

`python bot.py` against the DingTalk stand-in, the fake CLI in its jail (bypassPermissions, so its Bash runs at
once). One bot serves the module; each test chats as users of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from codebuddy.sandbox import Workspaces
from ops.doctor import api_budget_line
from projects.bindings import short_id
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT, BotProcess, bot_env, cli_runs, replies
from tests.git_http_server import GitHttpServer
from tests.git_remotes import advance_remote, git, make_remote
from tests.standin import DingTalkStandin, _conversation_id

pytestmark = pytest.mark.e2e

GROUP = "cidPROJECTS+group/test=="
TOKEN = "GIT-TOKEN-tVq83kd02LmZ"


@pytest.fixture(scope="module")
def project_bot(tmp_path_factory):
    """(stand-in, bot, tmp dir, git server): one bot with three projects on bare repositories on disk, and two on a
    local HTTP git server that wants a token (one with it, one without)."""
    tmp_path = tmp_path_factory.mktemp("projects")
    (tmp_path / "home").mkdir()
    demo, team = make_remote(tmp_path, "demo"), make_remote(tmp_path, "team")
    make_remote(tmp_path, "secure")
    server = GitHttpServer(tmp_path / "remotes", TOKEN).start()
    (tmp_path / "projects.toml").write_text(
        f'[demo]\nurl = "{demo}"\nusers = ["*"]\npush = true\n\n'
        f'[team]\nurl = "file://{team}"\nbranch = "main"\nusers = ["olga", "boss"]\npush = true\n\n'
        f'[readonly]\nurl = "{demo}"\nusers = ["*"]\n\n'
        f'[secure]\nurl = "{server.url("secure")}"\nusers = ["*"]\npush = true\ntoken_env = "SECURE_GIT_TOKEN"\n\n'
        f'[tokenless]\nurl = "{server.url("secure")}"\nusers = ["*"]\n', encoding="utf-8")
    standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    env = bot_env(standin, tmp_path, tmp_path / "home", DINGTALK_OAPI_ENDPOINT=standin.base_url,
                  CODEBUDDY_PERMISSION_MODE="bypassPermissions", ADMIN_USERS="boss", USER_RATE_LIMIT="100",
                  PROJECTS_FILE=str(tmp_path / "projects.toml"), SECURE_GIT_TOKEN=TOKEN)
    bot = BotProcess(tmp_path, env).start()
    try:
        standin.wait_connected(timeout=60)
        yield standin, bot, tmp_path, server
    finally:
        if bot.proc is not None and bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait(timeout=10)
        standin.stop()
        server.stop()


def say(standin, text: str, user: str, count: int = 1, timeout: float = 30.0, **chat) -> list[str]:
    """Send `text` as `user` and wait for `count` replies on its session webhook."""
    sent = standin.send_bot_message(text, sender_staff_id=user, sender_nick=chat.pop("nick", user.title()), **chat)
    return replies(standin, sent, count, timeout=timeout)


def workspace_of(tmp_path: Path, conversation_id: str) -> Path:
    return Path(Workspaces(str(tmp_path / "workspace")).dirs_for(conversation_id).workspace)


def _single_id(standin, user: str) -> str:
    """The conversation id of `user`'s 1:1 chat with the bot (as the stand-in makes it)."""
    return _conversation_id(f"single:{standin.client_id}:{user}")


def patches_for(standin, user: str) -> list[tuple[object, object]]:
    return [(record, upload) for record, upload in standin.files.file_messages()
            if record.user_ids == [user] and upload.filename.endswith(".patch")]


def metered_calls(tmp_path: Path) -> int:
    """This month's metered DingTalk calls, as the task DB counts them."""
    line = api_budget_line(str(tmp_path / "data" / "tasks.db"), 5000)
    match = re.search(r"(\d+) of 5000 metered calls", line)
    return int(match.group(1)) if match else 0


def all_objects(remote: Path) -> bytes:
    """Every object of a repository, as git stores it uncompressed (what reached the remote)."""
    listed = subprocess.run(["git", f"--git-dir={remote}", "cat-file", "--batch-all-objects", "--batch"],
                            capture_output=True, timeout=60, check=True)
    return listed.stdout


# ---------------------------------------------------------------- the whole flow


def test_bind_edit_commit_diff_and_push_end_to_end(project_bot):
    standin, bot, tmp_path, _ = project_bot
    remote = tmp_path / "remotes" / "demo.git"
    main_before = git("rev-parse", "main", cwd=remote)
    listed = say(standin, "/project", "olga")[0]
    assert "- demo (分支 远端默认，可 /push)" in listed and "team" in listed and "本会话未绑定项目" in listed

    bound = say(standin, "/project demo", "olga")[0]
    assert bound.startswith("已绑定项目 demo: 分支 main，提交 " + main_before[:10])
    workspace = workspace_of(tmp_path, _single_id(standin, "olga"))
    checkout = workspace / "demo"
    assert (checkout / "README.md").read_text() == "hello\n"
    config = (checkout / ".git" / "config").read_text()
    assert "[remote" not in config and str(tmp_path) not in config  # no remote, no host path for the run to see
    assert not list((checkout / ".git").glob("hooks/*"))  # no sample hooks either

    # The next prompt runs in the checkout; the agent edits and commits there, in its jail.
    answer = say(standin, "改一下 [tool=Bash:pwd && echo changed >> README.md && git commit -qam 'agent edit' "
                          "&& git log -1 --format=%an]", "olga", count=2)[1]
    assert "→ /workspace/demo" in answer and "Olga" in answer  # the binder's name is the checkout's author
    run = [r for r in cli_runs(tmp_path) if "改一下" in r["prompt"]][0]
    assert run["cwd"] == "/workspace/demo"
    prompt = run["argv"][run["argv"].index("--append-system-prompt") + 1]
    assert "git checkout of the project demo" in prompt and "../outbox/" in prompt
    say(standin, "再加个文件 [tool=Bash:echo fresh > notes.txt]", "olga", count=2)  # left uncommitted

    metered_before = metered_calls(tmp_path)
    diffed = say(standin, "/diff", "olga")[0]
    assert "相对起点 " + main_before[:10] + ": 1 个提交，以及未提交的改动" in diffed
    assert "README.md" in diffed and "notes.txt" in diffed and "随后发送文件: demo-" in diffed
    # The chat's warm CLI process (its jail, and whatever a turn could have left running there) ended first.
    bot.wait_log(r"结束 CodeBuddy 进程 \d+: 项目命令读取工作副本")
    record, upload = standin.wait_for(lambda: patches_for(standin, "olga"))[0]
    assert upload.filename == f"demo-{short_id(_single_id(standin, 'olga'))}.patch"
    assert record.msg_key == "sampleFile" and record.msg_param["fileType"] == "patch"
    patch = upload.data.decode()
    assert "+changed" in patch and "+fresh" in patch
    # The patch went out like any file: its upload and its push are metered calls (the answer came by webhook).
    standin.wait_for(lambda: metered_calls(tmp_path) >= metered_before + 2, timeout=20)
    # The patch applies to the commit the checkout started from and gives the agent's files.
    check = tmp_path / "apply-check"
    git("clone", "-q", str(remote), str(check))
    (check / "change.patch").write_text(patch)
    git("apply", "change.patch", cwd=check)
    assert (check / "README.md").read_text() == (checkout / "README.md").read_text()
    assert (check / "notes.txt").read_text() == "fresh\n"

    pushed = say(standin, "/push", "olga", nick="Olga Petrova")[0]
    branch = f"codebuddy/{short_id(_single_id(standin, 'olga'))}-1"
    assert pushed.startswith(f"已推送到分支 {branch}") and "作者 Olga Petrova <olga@dingtalk>" in pushed
    tip = git("log", "-1", "--format=%an <%ae>|%cn|%s", branch, cwd=remote)
    assert tip.startswith("Olga Petrova <olga@dingtalk>|DingTalk CodeBuddy bot|CodeBuddy: changes")
    assert git("log", "-1", "--format=%s", f"{branch}~1", cwd=remote) == "agent edit"  # that commit, below it
    assert git("show", f"{branch}:notes.txt", cwd=remote) == "fresh"
    assert git("rev-parse", "main", cwd=remote) == main_before  # the default branch untouched
    assert git("for-each-ref", "--format=%(refname)", cwd=remote).split() == ["refs/heads/codebuddy/" +
                                                                              branch.split("/", 1)[1],
                                                                              "refs/heads/main"]
    again = say(standin, "/push", "olga")[0]  # a second push makes the next branch, never the same one forced
    assert f"codebuddy/{short_id(_single_id(standin, 'olga'))}-2" in again
    bot.wait_log(r"项目 demo 已推送分支 codebuddy/\w+-1")

    renewed = say(standin, "/new", "olga")[0]  # a new session removes the checkout the bot made
    assert renewed.endswith("项目工作副本已移除: demo/") and not checkout.exists()
    assert "本会话未绑定项目" in say(standin, "/project", "olga")[0]
    assert say(standin, "/project demo", "olga")[0].startswith("已绑定项目 demo")  # a fresh checkout again
    assert (checkout / "README.md").read_text() == "hello\n"


def test_pull_fast_forwards_a_clean_checkout_and_says_why_not_otherwise(project_bot):
    standin, bot, tmp_path, _ = project_bot
    assert say(standin, "/project team", "boss")[0].startswith("已绑定项目 team")
    assert "已是最新" in say(standin, "/pull", "boss")[0]
    new = advance_remote(tmp_path, "team", "v2\n")
    pulled = say(standin, "拉取代码", "boss")[0]
    assert pulled.startswith(f"项目 team 已快进到 main {new[:10]} (1 个新提交)")
    checkout = workspace_of(tmp_path, _single_id(standin, "boss")) / "team"
    assert (checkout / "CHANGELOG").read_text() == "v2\n"
    assert not list(checkout.parent.glob(".project-pull-*"))  # the bundle is gone
    (checkout / "dirty.txt").write_text("x")
    advance_remote(tmp_path, "team", "v3\n")
    assert "有未提交的改动，不能快进" in say(standin, "/pull", "boss")[0]
    assert "没有改动" not in say(standin, "查看改动", "boss")[0]  # the diff counts from the pulled commit
    assert (checkout / "CHANGELOG").read_text() == "v2\n"


# ---------------------------------------------------------------- who may


def test_a_user_not_in_users_cannot_bind_diff_or_push(project_bot):
    standin, bot, tmp_path, _ = project_bot
    assert say(standin, "/project team", "mallory")[0] == "没有你可用的项目 team。发送 /project 查看可用的项目。"
    assert "team" not in say(standin, "项目", "mallory")[0]  # not even listed
    group = {"conversation_type": "2", "conversation_id": GROUP}
    assert "需要管理员" in say(standin, "/project team", "olga", **group)[0]  # in users, but a group needs an admin
    assert say(standin, "/project team", "boss", **group)[0].startswith("已绑定项目 team")
    say(standin, "改 [tool=Bash:echo evil > evil.txt]", "mallory", count=2, **group)
    assert say(standin, "/push", "mallory", **group)[0] == "你不在项目 team 的 users 中。"
    assert say(standin, "/diff", "mallory", **group)[0] == "你不在项目 team 的 users 中。"
    # olga may use team, but neither bound it nor sent the last task, and is no admin.
    assert "只有绑定项目的人" in say(standin, "/push", "olga", **group)[0]
    remote = tmp_path / "remotes" / "team.git"
    assert not git("for-each-ref", "--format=%(refname)", "refs/heads/codebuddy", cwd=remote)
    assert "未提交的改动已提交，作者 Boss" in say(standin, "/push", "boss", **group)[0]  # an admin may
    assert say(standin, "/push", "carol")[0] == "本会话没有绑定项目。发送 /project 查看可用的项目。"
    assert "不允许推送" in _bound_then(standin, "readonly", "carol", "/push")


def _bound_then(standin, project: str, user: str, command: str) -> str:
    assert say(standin, f"/project {project}", user)[0].startswith(("已绑定项目", "已重新绑定"))
    return say(standin, command, user)[0]


# ---------------------------------------------------------------- attacks planted in the workspace


HOOKS = ("pre-push", "post-checkout", "pre-commit", "post-commit", "post-merge", "reference-transaction",
         "pre-auto-gc", "post-rewrite", "pre-receive", "update")


def plant_config_attacks(checkout: Path, canary: Path, secret: Path) -> None:
    """What an agent can leave in its checkout's .git for the bot's git to run or read: hooks, and config that runs
    a command or reads a file. Each writes the canary outside the workspace (with the secret, if it can read it);
    a hook also marks the workspace (../hook-ran), a configured command ../command-ran."""
    scripts = checkout / ".git" / "scripts"
    scripts.mkdir()
    for kind in ("hook", "command"):
        (scripts / kind).write_text(f"#!/bin/sh\ntouch {canary}\ncat {secret} >> {canary}\ntouch ../{kind}-ran\n")
        (scripts / kind).chmod(0o755)
    hook, command = scripts / "hook", scripts / "command"
    hooks = checkout / ".git" / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in HOOKS:
        (hooks / name).write_text(hook.read_text())
        (hooks / name).chmod(0o755)
    with open(checkout / ".git" / "config", "a") as config:
        config.write(f"""[core]
\thooksPath = {hooks}
\tfsmonitor = {command}
\tsshCommand = {command}
\tpager = {command}
\tattributesFile = {secret}
\texcludesFile = {secret}
\talternateRefsCommand = {command}
[diff]
\texternal = {command}
[diff "evil"]
\tcommand = {command}
\ttextconv = {command}
[filter "evil"]
\tclean = {command}
\tsmudge = {command}
\tprocess = {command}
\trequired = true
[credential]
\thelper = !{command}
[uploadpack]
\tpackObjectsHook = {command}
[include]
\tpath = {secret}
""")


def test_hooks_and_config_planted_in_the_checkout_run_nothing_and_leak_nothing(project_bot):
    standin, bot, tmp_path, _ = project_bot
    canary, secret = tmp_path / "canary-config", tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-OF-THE-HOST\n")
    assert say(standin, "/project demo", "eve")[0].startswith("已绑定项目 demo")
    checkout = workspace_of(tmp_path, _single_id(standin, "eve")) / "demo"
    say(standin, "提交 [tool=Bash:echo mine >> README.md && git commit -qam mine]", "eve", count=2)
    plant_config_attacks(checkout, canary, secret)
    (checkout / ".git" / "info").mkdir(exist_ok=True)
    (checkout / ".git" / "info" / "attributes").write_text("* filter=evil diff=evil\n")
    (checkout / ".gitattributes").write_text("* filter=evil diff=evil\n")
    os.symlink(secret, checkout / ".gitignore")  # an ignore file that is a link to the host's secret
    os.symlink(secret, checkout / "leak.txt")  # a file that is a link: its target is never read
    os.symlink(tmp_path, checkout / "host-dir")
    texts = [say(standin, command, "eve")[0] for command in ("/diff", "/pull", "/push")]
    assert texts[0].startswith("项目 demo 的改动") and "有未提交的改动" in texts[1]
    assert texts[2].startswith("已推送到分支 codebuddy/")
    assert not canary.exists()
    assert not (checkout.parent / "hook-ran").exists() and not (checkout.parent / "command-ran").exists()
    remote = tmp_path / "remotes" / "demo.git"
    branch = re.search(r"codebuddy/\w+-\d+", texts[2]).group(0)
    assert git("cat-file", "-p", f"{branch}:leak.txt", cwd=remote) == str(secret)  # stored as a link, not read
    assert git("cat-file", "-p", f"{branch}:README.md", cwd=remote) == "hello\nmine"  # no clean filter ran
    uploads = [upload.data for upload in standin.files.uploads.values()]
    for seen in (all_objects(remote), *uploads, bot.log_text().encode(), "\n".join(texts).encode()):
        assert b"TOP-SECRET-OF-THE-HOST" not in seen


def test_pull_with_hooks_and_config_planted_runs_no_hook_and_nothing_outside(project_bot):
    standin, bot, tmp_path, _ = project_bot
    canary, secret = tmp_path / "canary-pull", tmp_path / "host-secret.txt"
    secret.write_text("TOP-SECRET-OF-THE-HOST\n")
    assert say(standin, "/project demo", "pat")[0].startswith("已绑定项目 demo")
    checkout = workspace_of(tmp_path, _single_id(standin, "pat")) / "demo"
    plant_config_attacks(checkout, canary, secret)  # all inside .git: the checkout stays clean
    new = advance_remote(tmp_path, "demo", "pulled under attack\n")
    assert say(standin, "/pull", "pat")[0].startswith(f"项目 demo 已快进到 main {new[:10]}")
    assert (checkout / "CHANGELOG").read_text() == "pulled under attack\n"
    # The fast-forward ran in the conversation's jail with hooks and the monitor off: no hook ran, and nothing
    # there reaches the canary outside the workspace (a filter the agent configured runs there with its rights).
    assert not canary.exists() and not (checkout.parent / "hook-ran").exists()


@pytest.mark.parametrize("shape", ["alternates", "git-symlink", "gitdir-file"])
def test_a_git_dir_that_reaches_another_conversation_is_refused(project_bot, shape):
    standin, bot, tmp_path, _ = project_bot
    victim, attacker = f"victim-{shape}", f"thief-{shape}"
    assert say(standin, "/project demo", victim)[0].startswith("已绑定项目 demo")
    say(standin, "秘密 [tool=Bash:echo VICTIM-SECRET-DATA > secret.txt && git add secret.txt && git commit -qm s]",
        victim, count=2)
    victim_git = workspace_of(tmp_path, _single_id(standin, victim)) / "demo" / ".git"
    assert say(standin, "/project demo", attacker)[0].startswith("已绑定项目 demo")
    checkout = workspace_of(tmp_path, _single_id(standin, attacker)) / "demo"
    if shape == "alternates":
        (checkout / ".git" / "objects" / "info" / "alternates").write_text(f"{victim_git / 'objects'}\n")
        (checkout / ".git" / "HEAD").write_text(git("rev-parse", "HEAD", cwd=victim_git.parent) + "\n")
        expected = "objects/info/alternates 存在"
    elif shape == "git-symlink":
        os.rename(checkout / ".git", checkout / "old-git")
        os.symlink(victim_git, checkout / ".git")
        expected = ".git 是符号链接"
    else:
        os.rename(checkout / ".git", checkout / "old-git")
        (checkout / ".git").write_text(f"gitdir: {victim_git}\n")
        expected = ".git 是文件 (gitdir: 指向别处)"
    texts = [say(standin, command, attacker)[0] for command in ("/diff", "/pull", "/push")]
    assert all(text.startswith("已拒绝: ") and expected in text for text in texts), texts
    remote = tmp_path / "remotes" / "demo.git"
    assert b"VICTIM-SECRET-DATA" not in all_objects(remote)
    assert not any(b"VICTIM-SECRET-DATA" in upload.data for upload in standin.files.uploads.values())
    assert not git("for-each-ref", f"refs/heads/codebuddy/{short_id(_single_id(standin, attacker))}-*", cwd=remote)


# ---------------------------------------------------------------- a remote over HTTP that wants a token


def test_a_token_remote_is_reached_by_the_bots_git_only_and_no_run_ever_sees_the_token(project_bot):
    standin, bot, tmp_path, server = project_bot
    turned_away = len([r for r in server.requests if r.status == 401])
    refused = say(standin, "/project tokenless", "tina")[0]  # the same remote without the token: 401, no prompt
    assert refused.startswith("git 操作失败") and len([r for r in server.requests if r.status == 401]) > turned_away
    assert say(standin, "/project secure", "tina")[0].startswith("已绑定项目 secure")
    answer = say(standin, "看看 [tool=Bash:env; cat .git/config; git remote -v; grep -rl tVq83kd /workspace "
                          "/home/codebuddy; echo edit >> README.md; echo done]", "tina", count=2)[1]
    assert "→ " in answer and "HOME=/home/codebuddy" in answer and TOKEN not in answer
    pushed = say(standin, "/push", "tina")[0]
    branch = re.search(r"codebuddy/\w+-1", pushed).group(0)
    remote = tmp_path / "remotes" / "secure.git"
    assert git("show", f"{branch}:README.md", cwd=remote) == "hello\nedit"
    authorized = [r for r in server.requests if r.authorized]
    assert any("git-receive-pack" in r.path for r in authorized) and any("upload-pack" in r.path for r in authorized)
    # Nowhere a run could look, nor in any file the bot wrote for the conversation (mirror config included).
    conversation = Path(Workspaces(str(tmp_path / "workspace")).base_for(_single_id(standin, "tina")))
    for path in conversation.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in bot.log_text() and TOKEN not in "".join(p.text or "" for p in standin.webhook_posts())


def test_check_says_which_project_remotes_answer(project_bot):
    standin, bot, tmp_path, server = project_bot
    env = {**bot.env, "DINGTALK_OPENAPI_ENDPOINT": standin.base_url}
    result = subprocess.run([sys.executable, str(ROOT / "bot.py"), "check"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line[2:].startswith("project ")}
    assert lines["✓ project demo"] and "answers: main at" in lines["✓ project demo"]
    assert "token from SECURE_GIT_TOKEN" in lines["✓ project secure"]
    assert "does not answer" in lines["✗ project tokenless"]
    assert TOKEN not in result.stdout + result.stderr
