"""Durations as the options take them (`30m`, `6h`, `90d`, `2w`) and as people read them."""

from __future__ import annotations

import re
from datetime import timedelta

from ..errors import ConfigError

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INTERVAL = re.compile(r"^(\d+)\s*([mhdw])$")


def parse_interval(option: str, text: str) -> timedelta:
    """`30m`, `6h`, `90d`, `2w` as a timedelta; raises ConfigError naming `option`."""
    m = _INTERVAL.match(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"{option} must be a duration such as 6h, 1d, 90d or 2w (m, h, d, w), not {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def interval_text(value: timedelta) -> str:
    """A duration as `--chunk-interval` takes it: `1d`, `6h`, `90d`, `30m`."""
    seconds = int(value.total_seconds())
    for unit in ("d", "h", "m"):
        if seconds and seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


def interval_words(value: timedelta) -> str:
    """`1 day`, `6 hours`, `90 days`."""
    text = interval_text(value)
    number, unit = int(text[:-1]), {"m": "minute", "h": "hour", "d": "day", "s": "second"}[text[-1]]
    return f"{number} {unit}{'' if number == 1 else 's'}"
