"""DEAD_LETTER_RETENTION by age (`7d`, `500,7d`) on a real Redis: dead letters older than
the age are dropped at the housekeeper's pass, the younger kept, and a warning comes first,
once, when the oldest nears the age (as one comes when their number nears a count)."""

from __future__ import annotations

import logging

import pytest
from tests.conftest import Env

from filepipe import retention
from filepipe.observe.retained import server_ms
from filepipe.partitions import partitions

DAY_MS = 86_400_000


def dead_letters_aged(env: Env, *days: float) -> list[bytes]:
    """Dead letters whose ids are `days` old by the server's clock, oldest first."""
    now = server_ms(env.redis)
    ids = []
    for n, age in enumerate(sorted(days, reverse=True)):
        entry_id = f"{now - int(age * DAY_MS)}-{n}"
        env.redis.xadd(env.settings.dead_stream, {"reason": "missing", "n": str(n)}, id=entry_id)
        ids.append(entry_id.encode())
    return ids


def housekeeper(env: Env, window: str) -> retention.Housekeeper:
    s = env.settings_with(dead_letter_retention=window)
    return retention.Housekeeper(s, env.redis, partitions(s), "test")


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("window", ["7d", "500,7d"])
def test_dead_letters_older_than_the_age_are_dropped(
    env: Env, window: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain with nothing to read makes the pass at its stop: 9 and 8 days old go, 6
    days and an hour stay; the count of `500,7d` does not keep what the age drops."""
    _, _, *young = dead_letters_aged(env, 9, 8, 6, 1 / 24)
    env.drain(dead_letter_retention=window)
    assert [entry_id for entry_id, _ in env.dead()] == young
    assert any(
        f"dead-letter stream {env.settings.dead_stream} is full: dropped its 2 oldest" in m
        for m in warnings(caplog)
    ), warnings(caplog)


def test_an_age_cap_warns_once_before_it_drops(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """The oldest dead letter past 80 % of the age: one warning naming its age and the
    setting, not one a pass; none while the oldest is young."""
    keeper = housekeeper(env, "7d")
    dead_letters_aged(env, 1, 1 / 24)
    keeper.run_once(lease_ms=0)
    assert warnings(caplog) == []
    env.redis.delete(env.settings.dead_stream)
    dead_letters_aged(env, 6, 1, 1 / 24)
    for _ in range(3):
        keeper.run_once(lease_ms=0)
    (warning,) = warnings(caplog)
    assert warning.startswith(
        f"dead-letter stream {env.settings.dead_stream} holds dead letters 6d 0h old, 85% of "
        "DEAD_LETTER_RETENTION=7d: those older than 7d are dropped"
    ), warning
    assert env.redis.xlen(env.settings.dead_stream) == 3


def test_status_shows_dead_letters_nearing_the_age(env: Env) -> None:
    """Status (and so the dashboard and /readyz's neighbours) is degraded once the oldest
    dead letter is past 80 % of the age, naming its age and the setting."""
    from filepipe.status import collect_status

    s = env.settings_with(dead_letter_retention="500,7d")
    dead_letters_aged(env, 2, 1 / 24)
    assert not [p for p in collect_status(s).problems if "dead letters" in p]
    env.redis.delete(s.dead_stream)
    dead_letters_aged(env, 6, 1 / 24)
    st = collect_status(s)
    assert st.health == "degraded"
    (problem,) = [p for p in st.problems if "dead letters" in p]
    assert problem.startswith(
        f"dead letters near their age: the oldest in {s.dead_stream} is 6d 0h old, 85% of "
        "DEAD_LETTER_RETENTION=500,7d (those older than 7d are dropped"
    ), problem
