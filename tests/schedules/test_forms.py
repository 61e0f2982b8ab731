"""Every form /every takes, as a cron expression, words and next fire times (Asia/Shanghai, and Europe/Berlin across
both DST changes); what is refused, with the forms listed."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from schedules.forms import FORMS, ScheduleError, next_fires, parse, previous_fire, shortest_gap

SHANGHAI = ZoneInfo("Asia/Shanghai")
BERLIN = ZoneInfo("Europe/Berlin")


def _at(tz: ZoneInfo, *parts: int) -> float:
    return datetime(*parts, tzinfo=tz).timestamp()


def _local(times: list[float], tz: ZoneInfo) -> list[str]:
    return [datetime.fromtimestamp(t, tz).strftime("%a %m-%d %H:%M") for t in times]


NOW = _at(SHANGHAI, 2026, 12, 4, 10, 0)  # a Friday, 10:00 in Shanghai


@pytest.mark.parametrize(("text", "cron", "fires"), [
    ("每天 09:00 生成日报", "0 9 * * *", ["Sat 12-05 09:00", "Sun 12-06 09:00", "Mon 12-07 09:00"]),
    ("daily 18:30 x", "30 18 * * *", ["Fri 12-04 18:30", "Sat 12-05 18:30", "Sun 12-06 18:30"]),
    ("工作日 09:00 x", "0 9 * * 1-5", ["Mon 12-07 09:00", "Tue 12-08 09:00", "Wed 12-09 09:00"]),
    ("weekdays 9:00 x", "0 9 * * 1-5", ["Mon 12-07 09:00", "Tue 12-08 09:00", "Wed 12-09 09:00"]),
    ("每周一 08:00 x", "0 8 * * 1", ["Mon 12-07 08:00", "Mon 12-14 08:00", "Mon 12-21 08:00"]),
    ("每周日 20:15 x", "15 20 * * 0", ["Sun 12-06 20:15", "Sun 12-13 20:15", "Sun 12-20 20:15"]),
    ("每周天 20:15 x", "15 20 * * 0", ["Sun 12-06 20:15", "Sun 12-13 20:15", "Sun 12-20 20:15"]),
    ("每月1日 07:00 x", "0 7 1 * *", ["Fri 01-01 07:00", "Mon 02-01 07:00", "Mon 03-01 07:00"]),
    ("每月31日 07:00 x", "0 7 31 * *", ["Thu 12-31 07:00", "Sun 01-31 07:00", "Wed 03-31 07:00"]),
    ("每小时 x", "0 * * * *", ["Fri 12-04 11:00", "Fri 12-04 12:00", "Fri 12-04 13:00"]),
    ("每30分钟 x", "*/30 * * * *", ["Fri 12-04 10:30", "Fri 12-04 11:00", "Fri 12-04 11:30"]),
    ('"0 9 * * 1-5" x', "0 9 * * 1-5", ["Mon 12-07 09:00", "Tue 12-08 09:00", "Wed 12-09 09:00"]),
    ("“0 12 * * 6” x", "0 12 * * 6", ["Sat 12-05 12:00", "Sat 12-12 12:00", "Sat 12-19 12:00"]),
])
def test_every_form_is_a_cron_expression_with_its_next_three_fires(text, cron, fires):
    timing, prompt = parse(text)
    assert timing.cron == cron and prompt.strip() == text.split()[-1]
    assert _local(next_fires(timing.cron, NOW, "Asia/Shanghai", 3), SHANGHAI) == fires


def test_the_words_say_when():
    assert parse("工作日 09:00 生成日报")[0].words == "工作日 (周一至周五) 09:00"
    assert parse("每月15日 9:05 x")[0].words == "每月15日 09:05"
    assert parse('"0 9 * * 1-5" x')[0].words == 'cron "0 9 * * 1-5" (At 09:00 on Monday through Friday)'


@pytest.mark.parametrize(("text", "why"), [
    ("明天 09:00 x", "看不懂这个定时写法"), ("每天 25:00 x", "时间 25:00 无效"), ("每天 09:60 x", "无效"),
    ("每月32日 09:00 x", "日期 32 无效"), ("每0分钟 x", "每0分钟无效"), ('"0 9 * *" x', "无效"),
    ('"0 9 * * 1-5 x', "看不懂"), ('"every day" x', "无效"),
])
def test_a_schedule_that_cannot_be_parsed_is_refused(text, why):
    with pytest.raises(ScheduleError) as caught:
        parse(text)
    assert why in str(caught.value)
    assert "每天 HH:MM" in FORMS and '"0 9 * * 1-5"' in FORMS


def test_berlin_spring_forward_a_time_in_the_gap_fires_once_after_it():
    before = _at(BERLIN, 2026, 3, 28, 12, 0)  # the clocks go 02:00 → 03:00 on Sunday 29 March
    assert _local(next_fires("30 2 * * *", before, "Europe/Berlin", 3), BERLIN) == [
        "Sun 03-29 03:00", "Mon 03-30 02:30", "Tue 03-31 02:30"]
    nine = next_fires("0 9 * * *", before, "Europe/Berlin", 3)
    assert _local(nine, BERLIN) == ["Sun 03-29 09:00", "Mon 03-30 09:00", "Tue 03-31 09:00"]
    assert nine[1] - nine[0] == 24 * 3600  # wall-clock 09:00 each day; the short day lies before the first


def test_berlin_fall_back_a_time_in_the_repeated_hour_fires_once():
    before = _at(BERLIN, 2026, 10, 24, 12, 0)  # the clocks go 03:00 → 02:00 on Sunday 25 October
    fires = next_fires("30 2 * * *", before, "Europe/Berlin", 3)
    assert _local(fires, BERLIN) == ["Sun 10-25 02:30", "Mon 10-26 02:30", "Tue 10-27 02:30"]
    assert fires[1] - fires[0] in (24 * 3600, 25 * 3600)  # one fire that night, not two
    hourly = next_fires("0 * * * *", _at(BERLIN, 2026, 10, 25, 1, 30), "Europe/Berlin", 3)
    assert [b - a for a, b in zip(hourly, hourly[1:], strict=False)] == [3600, 3600]  # real hours, none lost


def test_the_shortest_gap_is_what_min_interval_judges():
    assert shortest_gap("* * * * *", NOW, "Asia/Shanghai") == 60
    assert shortest_gap("*/30 * * * *", NOW, "Asia/Shanghai") == 1800
    assert shortest_gap("0 9 * * 1-5", NOW, "Asia/Shanghai") == 24 * 3600
    assert shortest_gap("0 9,10 * * *", NOW, "Asia/Shanghai") == 3600


def test_the_previous_fire_is_the_latest_at_or_before_a_time():
    nine = _at(SHANGHAI, 2026, 12, 4, 9, 0)
    assert previous_fire("0 9 * * *", nine, "Asia/Shanghai") == nine
    assert previous_fire("0 9 * * *", nine + 3599, "Asia/Shanghai") == nine
    assert previous_fire("0 9 * * *", nine - 1, "Asia/Shanghai") == nine - 24 * 3600
