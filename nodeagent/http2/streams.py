"""The two sides of a request as the HTTP/2 proxy moves it, whatever codec each side speaks.

`ClientStream`: the client's request and our answer: an `H2Stream` of the client's HTTP/2
connection, or an `h1client.H1ClientStream` (an HTTP/1.1 client). `UpstreamStream`: one
attempt's exchange with the endpoint: an `H2Stream` on a pooled HTTP/2 connection, or an
`h1upstream.H1UpstreamStream` on a pooled HTTP/1.1 one. `Upstreams` opens the latter, per
attempt (`h2_upstreams.H2Upstreams`, `h1upstream.H1Upstreams`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nodeagent.balance import Picker as Cluster
from nodeagent.snapshot import Endpoint

Headers = list[tuple[bytes, bytes]]


class ClientStream(Protocol):
    headers: Headers | None
    trailers: Headers | None
    error: str
    on_fail: Callable[[], None] | None
    on_activity: Callable[[], None] | None
    received_bytes: int
    sent_bytes: int

    @property
    def ended(self) -> bool: ...

    async def receive_data(self) -> bytes: ...

    def send_headers(self, headers: Headers, *, end_stream: bool = False) -> None: ...

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None: ...

    def send_trailers(self, trailers: Headers) -> None: ...

    def end(self) -> None: ...

    def reset(self, code: int = ...) -> None: ...


class UpstreamStream(Protocol):
    headers: Headers | None
    trailers: Headers | None
    on_activity: Callable[[], None] | None

    @property
    def ended(self) -> bool: ...

    async def wait_headers(self) -> Headers: ...

    async def receive_data(self) -> bytes: ...

    async def send_data(self, data: bytes, *, end_stream: bool = False) -> None: ...

    async def finish(self, trailers: Headers | None) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Opened:
    """An attempt's upstream exchange, its head sent: on a reused connection or a new one
    (`setup_s`: the seconds spent opening it, not the endpoint's latency)."""

    stream: UpstreamStream
    reused: bool
    setup_s: float


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What an upstream needs to know of the request beyond its HTTP/2 head."""

    end_stream: bool  # no body follows the head
    content_length: bytes | None  # the client's, when it sent one


class Upstreams(Protocol):
    """Opens the exchange of one attempt with `endpoint` (raises as the pools do:
    UpstreamOverflow, UpstreamDenied, UpstreamTlsError, OSError, trio.TooSlowError,
    trio.BrokenResourceError; StreamReset(refused) when the head could not be sent)."""

    async def open(
        self,
        endpoint: Endpoint,
        service_port: int,
        headers: Headers,
        facts: RequestFacts,
        cluster: Cluster,
    ) -> Opened: ...
