"""The projects file: a good one read, a bad one refused with every problem named (exit 2), tokens kept secret."""

from __future__ import annotations

import os
import subprocess
import sys

from config import read_config
from projects.catalog import Project, load_projects, projects_path
from projects.forges import merge_request_link
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT, fake_cli_env

GOOD = """
[demo]
url = "https://git.example.com/team/demo.git"
branch = "main"
users = ["*"]
push = true
token_env = "DEMO_GIT_TOKEN"

[local]
url = "/srv/git/local.git"
users = ["alice", "bob"]
"""

BAD = """
top = "a value, not a table"

[nourl]
users = ["*"]

[creds]
url = "https://user:pw@git.example.com/x.git"
users = ["*"]

[ssh]
url = "git@github.com:team/x.git"
users = ["*"]

[relative]
url = "repos/x.git"
users = ["*"]

[plain-http]
url = "http://git.example.com/x.git"
users = ["*"]
token_env = "PLAIN_TOKEN"

[leaky]
url = "https://git.example.com/x.git"
users = ["*"]
token_env = "CODEBUDDY_GIT_TOKEN"

[missing-token]
url = "https://git.example.com/x.git"
users = ["*"]
token_env = "NOT_SET_ANYWHERE"

[ours]
url = "https://git.example.com/x.git"
branch = "codebuddy/x"
users = []
pusch = true

[outbox]
url = "/srv/git/x.git"
users = ["*"]
"""


def test_a_good_file_gives_each_project_with_its_token(tmp_path):
    path = tmp_path / "projects.toml"
    path.write_text(GOOD, encoding="utf-8")
    projects, problems = load_projects(str(path), {"DEMO_GIT_TOKEN": "tok-123"})
    assert problems == []
    demo, local = projects
    assert demo == Project(name="demo", url="https://git.example.com/team/demo.git", branch="main", users=("*",),
                           push=True, token_env="DEMO_GIT_TOKEN", token="tok-123")
    assert "tok-123" not in repr(demo)
    assert demo.scheme == "https" and demo.may_use("anyone")
    assert local.scheme == "file" and local.branch == "" and not local.push
    assert local.may_use("alice") and not local.may_use("mallory")


def test_a_bad_file_names_every_problem_at_once(tmp_path):
    path = tmp_path / "projects.toml"
    path.write_text(BAD, encoding="utf-8")
    projects, problems = load_projects(str(path), {"PLAIN_TOKEN": "x", "CODEBUDDY_GIT_TOKEN": "y"},
                                       bot_settings=("LOG_FILE",))
    assert projects == ()
    text = "\n".join(problems)
    for expected in ("top must be a table", "[nourl] url is missing", "[creds] url must not hold a user or password",
                     "[ssh] scp-style remotes are not supported", "[relative] a local path must be absolute",
                     "[plain-http] a token would travel in clear over http://",
                     "[leaky] token_env CODEBUDDY_GIT_TOKEN names a variable the bot hands to runs",
                     "[missing-token] token_env NOT_SET_ANYWHERE is not set",
                     "[ours] branch may not start with codebuddy/", "[ours] users must list the staff ids",
                     "[ours] unknown key 'pusch'", "[outbox] the name must be"):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert len(problems) == 12 and all(line.startswith(f"PROJECTS_FILE ({path}): ") for line in problems)


def test_a_missing_file_is_no_projects_unless_named_and_invalid_toml_is_a_problem(tmp_path):
    assert load_projects(str(tmp_path / "none.toml"), {}) == ((), [])
    assert "does not exist" in load_projects(str(tmp_path / "none.toml"), {}, required=True)[1][0]
    (tmp_path / "broken.toml").write_text("[demo\nurl=", encoding="utf-8")
    assert "is not valid TOML" in load_projects(str(tmp_path / "broken.toml"), {})[1][0]
    assert projects_path("projects.toml", tmp_path / ".env") == str(tmp_path / "projects.toml")


def test_the_settings_carry_the_projects_and_their_tokens_as_secrets(tmp_path):
    (tmp_path / "projects.toml").write_text(GOOD, encoding="utf-8")
    (tmp_path / ".env").write_text("DEMO_GIT_TOKEN=from-dotenv-token-42\n", encoding="utf-8")
    config, error = read_config({"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret-value-1234",
                                 "CODEBUDDY_API_KEY": "k"}, tmp_path / ".env")
    assert error is None, error
    assert [p.name for p in config.projects] == ["demo", "local"]
    assert "from-dotenv-token-42" in config.secrets and "from-dotenv-token-42" not in repr(config)


def test_the_bot_does_not_start_with_a_bad_projects_file_and_lists_every_problem(tmp_path):
    (tmp_path / "projects.toml").write_text(BAD, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DINGTALK_", "CODEBUDDY_"))}
    env.update({"HOME": str(tmp_path), "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
                **fake_cli_env(tmp_path), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
                "TASK_DB": str(tmp_path / "tasks.db"), "PROJECTS_FILE": str(tmp_path / "projects.toml"),
                "PLAIN_TOKEN": "plain-token-value-987"})
    result = subprocess.run([sys.executable, str(ROOT / "bot.py")], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("PROJECTS_FILE (") == 12, result.stderr
    assert "plain-token-value-987" not in result.stdout + result.stderr


def test_merge_request_links_for_each_kind_of_host():
    def link(url: str, forge: str = "") -> str:
        return merge_request_link(Project(name="x", url=url, forge=forge), "codebuddy/ab12-1", "main")

    assert link("https://github.com/team/demo.git") == (
        "https://github.com/team/demo/compare/main...codebuddy/ab12-1?expand=1")
    assert link("https://gitlab.example.com/group/sub/demo.git") == (
        "https://gitlab.example.com/group/sub/demo/-/merge_requests/new?"
        "merge_request%5Bsource_branch%5D=codebuddy/ab12-1&merge_request%5Btarget_branch%5D=main")
    assert link("https://gitee.com/team/demo.git") == "https://gitee.com/team/demo/compare/main...codebuddy/ab12-1"
    assert link("https://code.example.com/team/demo.git", "gitea") == (
        "https://code.example.com/team/demo/compare/main...codebuddy/ab12-1")
    assert link("https://code.example.com/team/demo.git") == ""  # unknown kind: the branch name only
    assert link("/srv/git/demo.git") == ""
