"""The ClientHello parser on real ClientHellos (Python's ssl writes them), split, and fuzzed."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.gateway.clienthello import (
    MAX_HELLO,
    ClientHelloError,
    parse_client_hello,
)


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first bytes a real TLS client sends (ssl.MemoryBIO: no socket)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_reads_sni_and_alpn_of_a_real_client_hello() -> None:
    hello = parse_client_hello(client_hello("Api.Example.COM", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.server_name == "api.example.com"
    assert hello.alpn == ("h2", "http/1.1")


def test_no_sni_is_none() -> None:
    hello = parse_client_hello(client_hello(None))
    assert hello is not None
    assert hello.server_name is None


def test_every_prefix_needs_more_data() -> None:
    data = client_hello("a.example.com")
    for n in range(len(data)):
        assert parse_client_hello(data[:n]) is None
    assert parse_client_hello(data) is not None


def test_a_hello_split_over_two_records() -> None:
    data = client_hello("split.example.com")
    body = data[5:]
    cut = 40
    records = b"".join(
        b"\x16\x03\x01" + len(part).to_bytes(2) + part for part in (body[:cut], body[cut:])
    )
    hello = parse_client_hello(records)
    assert hello is not None
    assert hello.server_name == "split.example.com"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x00\x00",
        b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
    ],
)
def test_not_a_client_hello_is_an_error(data: bytes) -> None:
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)


def test_an_oversized_hello_is_an_error_not_a_bigger_buffer() -> None:
    head = b"\x01" + (MAX_HELLO + 100).to_bytes(3)
    data = b"\x16\x03\x01" + (16384).to_bytes(2) + head + b"\x00" * (16384 - 4)
    with pytest.raises(ClientHelloError):
        parse_client_hello(data)


@given(st.binary(max_size=600))
def test_fuzz_never_crashes(data: bytes) -> None:
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(data)


@given(st.integers(min_value=0, max_value=400), st.binary(min_size=1, max_size=8))
def test_fuzz_corrupted_real_hello(pos: int, junk: bytes) -> None:
    data = bytearray(client_hello("fuzz.example.com"))
    pos %= len(data)
    data[pos : pos + len(junk)] = junk
    with contextlib.suppress(ClientHelloError):
        parse_client_hello(bytes(data))
