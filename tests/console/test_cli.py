"""`nodeagent console`'s command line: bad input is one clear line and exit status 2, and the
console never listens beyond loopback without a token."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.console.cli import main, parse_listen


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "0.0.0.0:20001"], "beyond loopback the console needs --token-file"),
        (["--listen", "localhost:20001"], "expected IP:PORT"),
        (["--listen", "127.0.0.1"], "expected IP:PORT"),
        (["--listen", "127.0.0.1:99999"], "expected IP:PORT"),
        (["--refresh", "0"], "--refresh 0.0: expected 0.1 to 60 seconds"),
        (["--token-file", "/nonexistent/token"], "--token-file /nonexistent/token"),
    ],
)
def test_bad_arguments_are_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--store", "memory://cli", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_a_short_token_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = tmp_path / "token"
    token.write_text("short\n")
    assert main(["--listen", "10.0.0.1:1", "--token-file", str(token)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:20001") == ("127.0.0.1", 20001)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
