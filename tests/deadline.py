"""`returns_within`: fail a test, instead of hanging it, when a synchronous call runs too long.

For calls that never yield (a regex match holding the event loop): a SIGALRM timer interrupts
the call in the main thread (CPython's `re` checks for signals while it backtracks, so even a
catastrophic match is cut), and the test fails with the time bound in its message.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TookTooLong(AssertionError):
    pass


def returns_within(seconds: float, call: Callable[[], T]) -> tuple[T, float]:
    """`call()`'s result and its duration in seconds; TookTooLong once `seconds` have passed."""

    def expire(signum: int, frame: Any) -> None:
        raise TookTooLong(f"did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        result = call()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.perf_counter() - start
