"""The pure parts of the HTTP/1.1 ↔ HTTP/2 bridges: head translation and the upstream codec."""

from __future__ import annotations

import pytest

from nodeagent.http2.selection import upstream_codec
from nodeagent.http2.translate import (
    h2_request_of_http1,
    h2_response_of_http1,
    http1_request_of_h2,
    http1_response_of_h2,
    reason_phrase,
    wants_trailers,
)
from nodeagent.snapshot import ServicePort


def test_an_http1_request_head_as_h2_fields() -> None:
    got = h2_request_of_http1(
        b"POST",
        b"/p?q=1",
        [(b"Host", b"app:80"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
         (b"Transfer-Encoding", b"chunked"), (b"TE", b"trailers, deflate"), (b"Upgrade", b"h2c"),
         (b"Content-Length", b"3"), (b"X-End", b"2")],
        scheme="http",
    )  # fmt: skip
    assert got == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"app:80"),
        (b":path", b"/p?q=1"), (b"te", b"trailers"), (b"content-length", b"3"),
        (b"x-end", b"2"),
    ]  # fmt: skip


def test_an_absolute_form_target_names_the_authority() -> None:
    got = h2_request_of_http1(b"GET", b"http://other:8080", [(b"host", b"x")], scheme="http")
    assert got[2:4] == [(b":authority", b"other:8080"), (b":path", b"/")]


def test_h2_request_fields_as_an_http1_head() -> None:
    fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"),
              (b":path", b"/x"), (b"te", b"trailers"), (b"x-a", b"1")]  # fmt: skip
    method, target, head, chunked = http1_request_of_h2(fields, has_body=False, content_length=None)
    assert (method, target, chunked) == (b"GET", b"/x", False)
    assert head == [(b"host", b"app"), (b"te", b"trailers"), (b"x-a", b"1")]
    _, _, head, chunked = http1_request_of_h2(fields, has_body=True, content_length=None)
    assert chunked
    assert head[-1] == (b"transfer-encoding", b"chunked")
    _, _, head, chunked = http1_request_of_h2(fields, has_body=True, content_length=b"7")
    assert not chunked
    assert head[-1] == (b"content-length", b"7")


@pytest.mark.parametrize(
    ("end_stream", "status", "head_request", "length"),
    [(True, b"200", False, b"0"), (True, b"204", False, None), (True, b"200", True, None),
     (False, b"200", False, None)],
)  # fmt: skip
def test_an_h2_answer_as_an_http1_head(
    end_stream: bool, status: bytes, head_request: bool, length: bytes | None
) -> None:
    fields = [(b":status", status), (b"grpc-status", b"0"), (b"connection", b"close")]
    code, head = http1_response_of_h2(fields, end_stream=end_stream, head_request=head_request)
    assert code == int(status)
    assert (b"connection", b"close") not in head
    assert dict(head).get(b"content-length") == length


def test_an_http1_answer_as_h2_fields() -> None:
    got = h2_response_of_http1(
        404, [(b"Content-Length", b"3"), (b"Keep-Alive", b"timeout=5"), (b"X-B", b"1")]
    )
    assert got == [(b":status", b"404"), (b"content-length", b"3"), (b"x-b", b"1")]


def test_te_trailers_is_recognised_among_other_codings() -> None:
    assert wants_trailers([(b"TE", b"gzip, Trailers")])
    assert not wants_trailers([(b"te", b"gzip")])


@pytest.mark.parametrize(
    ("name", "app_protocol", "client", "upstream"),
    [
        ("grpc", None, "http1", "h2"),  # an HTTP/1.1 client on a gRPC port: translated
        ("http2-web", None, "h2", "h2"),
        ("web", "kubernetes.io/h2c", "http1", "h2"),
        ("http", None, "h2", "http1"),  # an HTTP/2 client on an HTTP port: translated
        ("http-api", None, "http1", "http1"),
        ("web", None, "h2", "h2"),  # not declared (sniffed): the client's own
        ("web", None, "http1", "http1"),
    ],
)
def test_the_upstream_codec_is_the_ports_declared_protocol(
    name: str, app_protocol: str | None, client: str, upstream: str
) -> None:
    port = ServicePort(name, 80, 8080, app_protocol=app_protocol)
    assert upstream_codec(port, client) == upstream  # type: ignore[arg-type]
    assert upstream_codec(None, client) == client  # type: ignore[arg-type]


def test_an_http1_answer_gets_the_standard_reason_phrase() -> None:
    assert reason_phrase(200) == b"OK"
    assert reason_phrase(503) == b"Service Unavailable"
    assert reason_phrase(599) == b""
