"""HBONE's sans-IO parts: the CONNECT request's headers, the statuses, the HTTP/2 settings.

HBONE (Istio's ztunnel) is one HTTP/2 `CONNECT` stream per application connection over a pooled
mutual-TLS 1.3 connection with ALPN `h2` (docs/protocol.md). This module builds and parses the
header block of a CONNECT (`:authority` = destination `ip:port`, `forwarded`, `baggage`,
`traceparent`/`tracestate`) with bounded sizes, maps statuses to the client's error flags, and
holds the SETTINGS both sides announce. No I/O: `h2conn.py` drives the `h2` state machine.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import h2.settings

ALPN: Final = "h2"

# ztunnel's values (src/proxy/pool.rs / h2 config): windows sized so one stream can fill a fast
# link without waiting for WINDOW_UPDATEs, frames large so bulk costs few Python calls per MiB.
STREAM_WINDOW: Final = 4 * 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
MAX_FRAME: Final = 1024 * 1024
MAX_STREAMS: Final = 100  # concurrent streams per connection (the pool opens another past it)
MAX_HEADER_LIST: Final = 16 * 1024  # a CONNECT carries a few short headers

# Status codes (ztunnel's): what each means to the client.
OK: Final = 200
BAD_REQUEST: Final = 400  # malformed CONNECT, or a target that is one of the agent's listeners
DENIED: Final = 401  # the destination's authorization policy refused the source identity
UNAVAILABLE: Final = 503  # the app refused or timed out, or no certificate for the destination

_MAX_TEXT = 1024
_MAX_BAGGAGE_ITEMS = 16


class HboneError(Exception):
    """A CONNECT the server refuses with `status` (400 for anything malformed)."""

    def __init__(self, msg: str, status: int = BAD_REQUEST) -> None:
        super().__init__(msg)
        self.status = status


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """Who the client says it is (informational, in `baggage`: the server trusts only the
    certificate and the TCP peer address)."""

    namespace: str = ""
    name: str = ""
    identity: str = ""
    address: str = ""


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """One CONNECT: where to (`address:port` is the `:authority`) and for whom."""

    address: str  # the destination workload's IP
    port: int  # the destination workload's port the bytes are for
    source: SourceInfo = SourceInfo()
    client: str = ""  # the application client's `ip:port` (the `forwarded` header's `for=`)
    trace: tuple[tuple[str, str], ...] = ()  # ("traceparent", …), ("tracestate", …)
    # The source agent's L7 proxy opened the stream and reports every request on it (baggage
    # `nodeagent.l7=source`): a `--destination-l7 when-needed` destination may relay it at L4.
    source_reported: bool = False

    @property
    def authority(self) -> str:
        return f"{self.address}:{self.port}"

    def trace_map(self) -> dict[str, str]:
        return dict(self.trace)


def settings(*, client: bool) -> dict[h2.settings.SettingCodes, int]:
    """The SETTINGS each side announces."""
    out = {
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
        h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
        h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
    }
    if client:
        out[h2.settings.SettingCodes.ENABLE_PUSH] = 0
    else:
        out[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = MAX_STREAMS
    return out


# -- the request's header block -------------------------------------------------------------------


# The baggage member saying the source's L7 proxy reports the stream's requests.
REPORTED_KEY, REPORTED_VALUE = "nodeagent.l7", "source"


def encode_baggage(source: SourceInfo, *, source_reported: bool = False) -> str:
    """W3C baggage with the source's Kubernetes names (values percent-encoded), and the
    `nodeagent.l7=source` member when the source reports the stream's requests."""
    items = []
    for key, value in (
        ("k8s.namespace.name", source.namespace),
        ("k8s.pod.name", source.name),
        ("spiffe.id", source.identity),
    ):
        if value:
            items.append(f"{key}={urllib.parse.quote(value, safe='')}")
    if source_reported:
        items.append(f"{REPORTED_KEY}={REPORTED_VALUE}")
    return ",".join(items)


def parse_baggage(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(",")[:_MAX_BAGGAGE_ITEMS]:
        key, sep, value = item.strip().partition("=")
        if sep and key:
            # Properties after ';' are allowed by W3C baggage and not used here.
            out[key.strip()] = urllib.parse.unquote(value.split(";", 1)[0].strip())
    return out


def connect_headers(req: ConnectRequest) -> list[tuple[str, str]]:
    headers = [(":method", "CONNECT"), (":authority", req.authority)]
    if req.client:
        # RFC 7239: an IP with a port is a quoted string.
        headers.append(("forwarded", f'for="{req.client}"'))
    baggage = encode_baggage(req.source, source_reported=req.source_reported)
    if baggage:
        headers.append(("baggage", baggage))
    for name, value in req.trace:
        if name in ("traceparent", "tracestate"):
            headers.append((name, value))
    return headers


def _text(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    out = []
    for name, value in headers:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        if len(v) > _MAX_TEXT:
            raise HboneError(f"header {n!r} is {len(v)} bytes, over the {_MAX_TEXT} limit")
        out.append((n, v))
    return out


def parse_authority(authority: str) -> tuple[str, int]:
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit():
        raise HboneError(f":authority {authority!r} is not ip:port")
    host = host.removeprefix("[").removesuffix("]")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise HboneError(f":authority {authority!r}: {host!r} is not an IP address") from None
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise HboneError(f":authority {authority!r}: port out of range")
    return address, port


def parse_forwarded_for(value: str) -> str:
    """The first `for=` of a `forwarded` header, unquoted ("" when absent)."""
    for element in value.split(",")[:1]:
        for pair in element.split(";"):
            key, sep, v = pair.strip().partition("=")
            if sep and key.lower() == "for":
                return v.strip().strip('"')
    return ""


def parse_connect(headers: Iterable[tuple[bytes | str, bytes | str]]) -> ConnectRequest:
    """The server's view of a request's header block; HboneError (400) when it is not a CONNECT
    we serve. h2 already checked the pseudo-headers' HTTP/2 rules."""
    fields = _text(headers)
    pseudo = {n: v for n, v in fields if n.startswith(":")}
    method = pseudo.get(":method", "")
    if method != "CONNECT":
        raise HboneError(f"method {method!r}: only CONNECT is served")
    if ":protocol" in pseudo:
        raise HboneError("extended CONNECT (:protocol) is not served")
    address, port = parse_authority(pseudo.get(":authority", ""))
    regular = {n: v for n, v in fields if not n.startswith(":")}
    baggage = parse_baggage(regular.get("baggage", ""))
    source = SourceInfo(
        namespace=baggage.get("k8s.namespace.name", ""),
        name=baggage.get("k8s.pod.name", ""),
        identity=baggage.get("spiffe.id", ""),
    )
    trace = tuple((n, regular[n]) for n in ("traceparent", "tracestate") if n in regular)
    return ConnectRequest(
        address,
        port,
        source=source,
        client=parse_forwarded_for(regular.get("forwarded", "")),
        trace=trace,
        source_reported=baggage.get(REPORTED_KEY) == REPORTED_VALUE,
    )


def response_headers(status: int) -> list[tuple[str, str]]:
    return [(":status", str(status))]


def parse_status(headers: Iterable[tuple[bytes | str, bytes | str]]) -> int:
    for name, value in _text(headers):
        if name == ":status":
            if not value.isdigit() or len(value) != 3:
                raise HboneError(f"bad :status {value!r}")
            return int(value)
    raise HboneError("response without :status")


def status_flag(status: int) -> str:
    """The client's error flag for a non-200 status (logs, counters, the balancer)."""
    if status == DENIED:
        return "denied"
    if status == BAD_REQUEST:
        return "bad_request"
    if status == UNAVAILABLE:
        return "unavailable"
    return "refused"
