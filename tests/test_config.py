"""The settings (config.py): defaults, every problem named at once, examples recognised, secrets never shown."""

from __future__ import annotations

import pytest
from dotenv import dotenv_values

from config import EXAMPLE_VALUES, SEED_LONG_TASK_KEYWORDS, ConfigError, load_config, read_config
from tests.conftest import ROOT

BASE_ENV = {"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret"}


def test_config_defaults_and_robot_code_falls_back_to_client_id():
    config = load_config(BASE_ENV, dotenv_path=None)
    assert config.robot_code == "id"
    assert config.sync_timeout == 60 and config.task_timeout == 1800 and config.max_workers == 4
    assert config.log_file == ""  # stderr: a trial run never writes the production log
    assert config.openapi_endpoint == "https://api.dingtalk.com"
    assert config.all_long_task_keywords == SEED_LONG_TASK_KEYWORDS


def test_config_missing_secret_names_the_variable():
    with pytest.raises(ConfigError, match="DINGTALK_CLIENT_SECRET.*.env.example"):
        load_config({"DINGTALK_CLIENT_ID": "id"}, dotenv_path=None)


def test_config_names_every_problem_at_once_not_only_the_first():
    with pytest.raises(ConfigError) as raised:
        load_config({"SYNC_TIMEOUT": "soon", "MAX_WORKERS": "0", "CODEBUDDY_SANDBOX": "docker"}, dotenv_path=None)
    names = [problem.split()[0] for problem in raised.value.problems]
    assert names == ["DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET", "CODEBUDDY_SANDBOX", "SYNC_TIMEOUT",
                     "MAX_WORKERS"]
    config, error = read_config({"SYNC_TIMEOUT": "soon"}, dotenv_path=None)
    assert config.sync_timeout == 60 and error is not None  # the rest of the settings still usable (check)


def test_every_example_value_env_example_ships_is_recognised_as_unfilled():
    shipped = {name: value for name, value in dotenv_values(ROOT / ".env.example").items() if value}
    assert shipped == {name: example for name, (example, _) in EXAMPLE_VALUES.items()}
    with pytest.raises(ConfigError) as raised:
        load_config({}, dotenv_path=ROOT / ".env.example")
    assert raised.value.unfilled == ("DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET", "CODEBUDDY_API_KEY")
    assert [p.split()[0] for p in raised.value.problems] == list(raised.value.unfilled)  # no "not set" twice
    assert "凭证与基础信息" in str(raised.value) and "codebuddy.ai" in str(raised.value)
    config, _ = read_config({}, dotenv_path=ROOT / ".env.example")
    assert config.cli_env == () and config.cli_secrets == ()  # an example key never reaches the CLI


def test_config_non_number_sync_timeout_is_a_clear_error():
    with pytest.raises(ConfigError, match="SYNC_TIMEOUT must be a number"):
        load_config({**BASE_ENV, "SYNC_TIMEOUT": "soon"}, dotenv_path=None)


def test_config_extra_args_split_like_a_shell_and_keywords_added(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LONG_TASK_KEYWORDS=deep dive, 写论文\nCODEBUDDY_EXTRA_ARGS=--allowedTools 'Read Grep'\n"
                        "MAX_WORKERS=9\n")
    config = load_config({**BASE_ENV, "MAX_WORKERS": "3"}, dotenv_path=env_file)
    assert config.codebuddy_extra_args == ("--allowedTools", "Read Grep")
    assert config.all_long_task_keywords[-2:] == ("deep dive", "写论文")
    assert config.max_workers == 3  # the real environment wins over .env


def test_config_describe_masks_the_secret():
    config = load_config({**BASE_ENV, "DINGTALK_CLIENT_SECRET": "supersecretvalue"}, dotenv_path=None)
    shown = dict(config.describe())
    assert "supersecretvalue" not in shown["DINGTALK_CLIENT_SECRET"]
    assert "supersecretvalue" not in repr(config)


def test_cli_variables_in_dotenv_are_handed_to_the_cli_and_never_shown(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CODEBUDDY_API_KEY=ck-live-123456\nCODEBUDDY_MODEL=m1\nOTHER=x\n")
    config = load_config(BASE_ENV, dotenv_path=env_file)
    assert config.cli_env == (("CODEBUDDY_API_KEY", "ck-live-123456"),)  # bot settings are not passed on
    assert "ck-live" not in repr(config)
    from codebuddy_client import CodeBuddyClient

    assert CodeBuddyClient.from_config(config).run_env("/h")["CODEBUDDY_API_KEY"] == "ck-live-123456"
