"""Regexes in configuration, compiled and matched with RE2 itself (Google's `re2` bindings).

Istio (Envoy) matches VirtualService regexes with RE2: no backtracking, so matching time is linear
in the input, and RE2's semantics (`\\d`, `\\w`, `\\s` and `\\b` are ASCII-only, `(?i)` folds
case by Unicode simple folding, `.` does not match a newline). Validation (`meshctl validate` /
`apply`) and the data path both call `compile_regex`, so a pattern the validator accepts is
exactly a pattern the proxy can run: lookarounds, backreferences, possessive quantifiers and
repeat counts over 1000 are RE2 syntax errors. Istio matches the whole string: use `fullmatch`.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

import re2

MAX_LEN = 1024
# Envoy refuses a regex whose compiled RE2 program is bigger than its runtime's
# `re2.max_program_size.error_level`; Istio's bootstrap sets it to 32768.
MAX_PROGRAM_SIZE = 32768


class RegexError(ValueError):
    """A pattern that RE2 does not accept (or that is over a size bound)."""


class Regex(Protocol):
    """The part of a compiled RE2 pattern the mesh uses."""

    @property
    def pattern(self) -> str: ...

    def fullmatch(self, text: str) -> object | None: ...

    def sub(self, repl: str, text: str) -> str: ...


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print every rejected pattern on stderr
    return options


def compile_regex(pattern: str) -> Regex:
    """`pattern` compiled by RE2; RegexError saying what is wrong when RE2 refuses it."""
    if len(pattern) > MAX_LEN:
        raise RegexError(f"regex is {len(pattern)} characters, over the {MAX_LEN} limit")
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise RegexError(f"regex {pattern!r} is not valid RE2: {reason}") from None
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise RegexError(
            f"regex {pattern!r} compiles to an RE2 program of {compiled.programsize} "
            f"instructions, over the {MAX_PROGRAM_SIZE} limit"
        )
    return cast(Regex, compiled)


def check_regex(pattern: str) -> str | None:
    """None if RE2 accepts `pattern`, else a message saying what is wrong."""
    try:
        compile_regex(pattern)
    except RegexError as exc:
        return str(exc)
    return None
