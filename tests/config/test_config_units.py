"""Durations and the YAML loader (regexes: test_config_regex.py)."""

from __future__ import annotations

import pytest

from nodeagent.config.documents import MAX_FILE, load_path, load_text
from nodeagent.config.duration import DurationError, parse_duration
from nodeagent.config.errors import LoadError


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("7s", 7_000_000_000),
        ("1.5s", 1_500_000_000),
        ("100ms", 100_000_000),
        ("1h", 3_600_000_000_000),
        ("2m", 120_000_000_000),
        ("1h30m", 5_400_000_000_000),
        ("0", 0),
        ("0s", 0),
        ("300s", 300_000_000_000),
        ("0.001s", 1_000_000),
        ("10us", 10_000),
    ],
)
def test_durations_parse(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "7", "s", "1.5", "-1s", "1d", "1 s", "abc", "1s2", "1e3s"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(DurationError, match="duration"):
        parse_duration(text)


def test_duration_type_error() -> None:
    with pytest.raises(DurationError, match="duration string"):
        parse_duration(7)  # type: ignore[arg-type]


def test_loader_keeps_sources_and_skips_empty_documents() -> None:
    docs = load_text("a: 1\n---\n# only a comment\n---\nb: [1.2.3.4, 2001:db8::]\n", "f.yaml")
    assert [d.data for d in docs] == [{"a": 1}, {"b": ["1.2.3.4", "2001:db8::"]}]
    assert docs[0].source.line == 1
    assert docs[1].source.line == 5
    assert str(docs[1].source) == "f.yaml:5"


def test_yaml_errors_name_file_and_line() -> None:
    with pytest.raises(LoadError, match=r"^bad\.yaml:2:\d+: YAML error"):
        load_text("a: 1\n  b: 2\nc: 3\n", "bad.yaml")


def test_aliases_are_refused() -> None:
    with pytest.raises(LoadError, match="aliases"):
        load_text("a: &x [1, 2]\nb: *x\n", "f.yaml")


def test_oversized_input_is_refused() -> None:
    with pytest.raises(LoadError, match="limit"):
        load_text("a" * (MAX_FILE + 1), "big.yaml")


def test_load_directory_in_name_order(tmp_path: pytest.TempPathFactory) -> None:
    from pathlib import Path

    d = Path(str(tmp_path))
    (d / "b.yaml").write_text("b: 1\n")
    (d / "a.yml").write_text("a: 1\n")
    (d / "ignored.txt").write_text("x: 1\n")
    docs = load_path(str(d))
    assert [doc.data for doc in docs] == [{"a": 1}, {"b": 1}]
    with pytest.raises(LoadError, match="no such file"):
        load_path(str(d / "missing.yaml"))
