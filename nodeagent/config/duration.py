"""Durations as Istio writes them: Go/protobuf style "7s", "1.5s", "100ms", "1h30m", "0".

Parsed exactly (integer nanoseconds, no float rounding). Consumers of stored documents use
`parse_duration` too, so that the proxy and the validator never disagree.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
MAX_LEN = 64
# protobuf's Duration is bounded to ±10000 years; anything near that is a typo in a mesh config.
MAX_NS = 315_576_000_000 * 1_000_000_000


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> int:
    """Return the duration in nanoseconds; raise DurationError naming what is wrong."""
    if not isinstance(text, str):
        raise DurationError(f'must be a duration string like "1.5s", not {type(text).__name__}')
    if text == "0":
        return 0
    if not text or len(text) > MAX_LEN:
        raise DurationError(f'invalid duration {text!r}: expected e.g. "7s", "100ms", "1h"')
    pos = 0
    total = Decimal(0)
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise DurationError(
                f"invalid duration {text!r}: expected a number and a unit "
                '(ns, us, ms, s, m, h), e.g. "7s", "1.5s", "100ms"'
            )
        try:
            total += Decimal(m.group(1)) * _UNITS[m.group(2)]
        except InvalidOperation:
            raise DurationError(f"invalid duration {text!r}") from None
        pos = m.end()
    if total > MAX_NS:
        raise DurationError(f"duration {text!r} is too long")
    if total != total.to_integral_value():
        raise DurationError(f"duration {text!r} is finer than a nanosecond")
    return int(total)


def seconds(text: str) -> float:
    """The duration in (float) seconds, for timers."""
    return parse_duration(text) / 1e9
