"""A run's budget, tried by exceeding it with the real CLI in its jail (bypassPermissions: a shell): a process
flood, a memory hog, a full /tmp and a full workspace each cost only that run, double-forked processes do not
outlive their turn, and the bot goes on answering.

Limits are set small (RUN_MAX_PROCS=64, RUN_MEMORY_MB=768, RUN_TMP_MB=32, WORKSPACE_MAX_MB=64) so every attack
stays bounded on a shared machine; the CLI itself needs ~300 MB.
"""

from __future__ import annotations

import pytest

from tests.conftest import CLI_START_TIMEOUT, process_alive, processes_of_this_test, wait_for_process

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

LIMITS = {"RUN_MAX_PROCS": "64", "RUN_MEMORY_MB": "768", "RUN_TMP_MB": "32", "WORKSPACE_MAX_MB": "64"}


def _answer(standin, user: str, prompt: str) -> str:
    sent = standin.send_bot_message(prompt, sender_staff_id=user)
    posts = standin.wait_for(lambda: [p for p in standin.webhook_posts(sent.session)
                                      if "回答:" in p.text or "工作区已满" in p.text or "失败" in p.text],
                             timeout=CLI_START_TIMEOUT * 2, message=f"an answer to {prompt!r}")
    return posts[0].text


def test_a_process_flood_is_capped_and_nothing_of_it_outlives_the_turn(standin, real_bot, tmp_path):
    bot = real_bot(**LIMITS)
    # 3,000 background sleeps, each start tried once (bash would retry a refused fork for seconds each).
    script = ("import os\\nn = 0\\nfor i in range(3000):\\n    try:\\n        os.spawnlp(os.P_NOWAIT, "
              "\"sleep\", \"sleep\", \"97\")\\n        n += 1\\n    except OSError:\\n        pass\\n"
              "print(\"P-flooded\", n)\\n")
    flood = f"printf '{script}' > /tmp/flood.py; python3 /tmp/flood.py > /tmp/flood.out 2>&1; cat /tmp/flood.out"
    answer = _answer(standin, "flood", f"[bash:{flood}]")
    assert "Stdout:" in answer, answer
    started = int(answer.split("Stdout:", 1)[1].split("P-flooded", 1)[1].split()[0])
    assert started < 64, answer  # the jail's own processes count too
    sleepers = [pid for pid, argv in processes_of_this_test(tmp_path).items() if argv == ["sleep", "97"]]
    assert not sleepers, f"{len(sleepers)} sleeps outlived the turn"
    assert "回答:" in _answer(standin, "bystander", "别人的问题")  # the bot and other users go on
    assert bot.proc.poll() is None


def test_a_double_forked_process_is_ended_after_the_turn_and_the_cli_stays_warm(standin, real_bot, tmp_path):
    bot = real_bot(**LIMITS)
    # The daemon lets go of the tool's output (as daemons do): one still holding the pipe can make the real CLI's Bash
    # tool report an empty Stdout under load (seen once in five stressed runs), which proves nothing either way.
    answer = _answer(standin, "daemon", "[bash:(setsid sleep 300 </dev/null >/dev/null 2>&1 &) ; echo P-forked]")
    assert "P-forked" in answer.split("Stdout:", 1)[1], answer
    assert not [pid for pid, argv in processes_of_this_test(tmp_path).items() if argv == ["sleep", "300"]]
    assert "回答:" in _answer(standin, "daemon", "之后的问题")
    assert "复用 CodeBuddy 进程" in bot.log_text()  # the turn's leftovers went, the CLI was kept


def test_a_memory_hog_and_a_full_tmp_cost_only_their_run(standin, real_bot, tmp_path):
    bot = real_bot(**LIMITS)
    answer = _answer(standin, "hog", "[bash:head -c 4500000000 /dev/zero | tail -n 1 | wc -c; echo P-hog]")
    assert "内存超出限制 (768 MB)" in answer, answer
    answer = _answer(standin, "tmpfill", "[bash:dd if=/dev/zero of=/tmp/big bs=1M count=2500; ls -s /tmp/big]")
    assert "No space left on device" in answer, answer
    assert "回答:" in _answer(standin, "bystander", "别人的问题")
    assert bot.proc.poll() is None


def test_a_full_workspace_refuses_the_next_run_until_files_are_deleted(standin, real_bot, tmp_path):
    real_bot(**LIMITS)
    answer = _answer(standin, "filler", "[bash:dd if=/dev/zero of=big bs=1M count=2500 2>&1; ls -s big]")
    assert "File too large" in answer or "File size limit" in answer, answer  # RLIMIT_FSIZE: no file past 64 MB
    _answer(standin, "filler", "[bash:rm -f big; head -c 40000000 /dev/zero > a; head -c 40000000 /dev/zero > b; "
                               "ls -s a b]")
    refused = _answer(standin, "filler", "还能运行吗")
    assert "工作区已满 (64 MB)" in refused, refused
    assert "回答:" in _answer(standin, "bystander", "别人的问题")


def test_leftover_check_sees_no_stray_process_after_cancel(standin, real_bot, tmp_path):
    bot = real_bot(**LIMITS)
    standin.send_bot_message("[bash:(setsid sleep 301 &) ; sleep 300]", sender_staff_id="canceller")
    sleeper = wait_for_process(tmp_path, ["sleep", "300"], timeout=CLI_START_TIMEOUT, exclude={bot.proc.pid})
    sent = standin.send_bot_message("/cancel", sender_staff_id="canceller")
    standin.wait_for(lambda: any(p.text.startswith("已取消任务") for p in standin.webhook_posts(sent.session)),
                     timeout=30)
    standin.wait_for(lambda: not process_alive(sleeper), timeout=10)
    standin.wait_for(lambda: not [pid for pid, argv in processes_of_this_test(tmp_path).items()
                                  if argv == ["sleep", "301"]], timeout=10, message="the double-forked sleep ended")
