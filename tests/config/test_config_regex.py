"""Regexes are RE2: `compile_regex` accepts RE2's syntax only, matches in linear time (hostile
patterns over long inputs return at once) and with RE2's semantics (ASCII `\\d`/`\\w`/`\\s`)."""

from __future__ import annotations

import pytest
from deadline import returns_within

from nodeagent.config.regex import MAX_PROGRAM_SIZE, RegexError, check_regex, compile_regex

HOSTILE = 5000


@pytest.mark.parametrize(
    "pattern",
    [
        ".*Chrome.*",
        "^/api/v[0-9]+/.*$",
        "(?i)foo",
        "a{2,5}",
        "[(?=]x",
        r"\d+\.\d+",
        "(?P<x>a)b",
        r"a\z",  # RE2 escapes Python's `re` reads differently are RE2's to accept
        r"\Qa.b\E",
        r"\pN+",
    ],
)
def test_re2_regexes_pass(pattern: str) -> None:
    assert check_regex(pattern) is None


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("foo(?=bar)", "invalid perl operator: (?="),
        ("foo(?!bar)", "invalid perl operator: (?!"),
        ("(?<=a)b", "invalid perl operator: (?<"),
        (r"(a)\1", r"invalid escape sequence: \1"),
        ("(?P<x>a)(?P=x)", "invalid perl operator"),
        ("(?>a)", "invalid perl operator: (?>"),
        ("a++", "bad repetition operator: ++"),
        ("a{2}+", "bad repetition operator"),
        ("a{1001}", "invalid repetition size: {1001}"),
        ("(?x)a b", "invalid perl operator"),
        ("(unclosed", "missing )"),
        ("x" * 2000, "over the 1024 limit"),
        (".{1000}" * 5, f"over the {MAX_PROGRAM_SIZE} limit"),
    ],
)
def test_non_re2_regexes_are_rejected(pattern: str, problem: str) -> None:
    message = check_regex(pattern)
    assert message is not None
    assert problem in message
    with pytest.raises(RegexError, match="regex"):
        compile_regex(pattern)


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        ("(a+)+b", "a" * HOSTILE, False),
        ("(a+)+b", "a" * HOSTILE + "b", True),
        ("(a|aa)+$", "a" * HOSTILE + "!", False),
        ("(a|aa)+$", "a" * HOSTILE, True),
        (r"^(\w+\s?)*$", "word " * (HOSTILE // 5) + "!", False),
        (r"^(\w+\s?)*$", "word " * (HOSTILE // 5), True),
        ("/(a+)+", "/" + "a" * HOSTILE + "!", False),
    ],
)
def test_hostile_patterns_match_in_linear_time(pattern: str, text: str, expected: bool) -> None:
    # With Python's backtracking `re` each of the False cases runs for longer than the universe.
    regex = compile_regex(pattern)
    matched, took = returns_within(10.0, lambda: regex.fullmatch(text) is not None)
    assert matched is expected
    assert took < 1.0, f"{pattern!r} over {len(text)} chars took {took:.3f} s"


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"\d", "٣", False),  # ARABIC-INDIC DIGIT THREE: Python's `re` says it is a digit
        (r"\d", "3", True),
        (r"\w", "é", False),  # RE2's \w is [0-9A-Za-z_]
        (r"\w+", "snake_case9", True),
        (r"\s", "\u00a0", False),  # NO-BREAK SPACE is not RE2 whitespace
        (r"\s", "\t", True),
        (r"\pN", "٣", True),  # Unicode classes are spelled out in RE2
        ("(?i)chrome", "CHROME", True),
        ("(?i)é", "É", True),
        ("chrome", "CHROME", False),
        (".", "\n", False),
        ("a.c", "a\u00e9c", True),  # one code point, not one byte
    ],
)
def test_re2_semantics(pattern: str, text: str, expected: bool) -> None:
    assert (compile_regex(pattern).fullmatch(text) is not None) is expected


def test_case_folding_is_written_in_the_pattern() -> None:
    assert compile_regex("(?i)/API/v[0-9]").fullmatch("/api/V1") is not None
    assert compile_regex("/API/v[0-9]").fullmatch("/api/V1") is None


def test_full_match_not_search() -> None:
    regex = compile_regex("/api/[a-z]+")
    assert regex.fullmatch("/api/users") is not None
    assert regex.fullmatch("/api/users/1") is None
    assert regex.fullmatch("x/api/users") is None
