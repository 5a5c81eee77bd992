"""Data-plane recording: turns the proxies' connections and requests into telemetry.

The proxies (`nodeagent/proxy/` pod paths, the ingress gateway) call in here at the points where a
connection or a request starts and completes; this module derives Istio's labels from the
snapshot (who is the peer workload, which service was addressed), then updates the metrics, queues
one access-log line and finishes the span. Everything here is synchronous and never blocks: the
access log and the Zipkin exporter only queue.

- `TcpRecorder`: one TCP connection (outbound L4 on the source agent, 15006/15008 inbound on the
  destination agent): `opened()` once bytes can flow, `closed(...)` at the end (opening first if
  the connection never got that far, so opened and closed counters always pair up).
- `record_request`: one HTTP request through an `HttpProxy` (reporter "source").
- `record_inbound_request`: one HTTP request the destination agent parsed for its pod
  (reporter "destination"), with the authenticated principals and the refusal's details.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from nodeagent.snapshot.model import Service, Workload
from nodeagent.snapshot.snapshot import Snapshot
from nodeagent.telemetry.accesslog import AccessLog, AccessRecord
from nodeagent.telemetry.metrics import (
    PEER_LABELS,
    IstioMetrics,
    Labels,
    Reporter,
    SecurityPolicy,
    peer_labels,
)
from nodeagent.telemetry.tracing import ActiveSpan, Tracer


class RequestRecord(Protocol):
    """What `record_request` reads of one finished HTTP request (the HTTP proxy's
    `nodeagent.http.log.RequestLog` is one): telemetry stays below the proxy that feeds it."""

    method: str
    authority: str
    path: str
    code: int
    bytes_received: int
    bytes_sent: int
    duration: float
    upstream: str | None
    upstream_cluster: str | None
    request_id: str
    connection_id: int
    downstream_address: str
    trace_id: str
    response_code_details: str
    request_principal: str
    upstream_transport_failure_reason: str
    protocol: str  # the metrics' request_protocol: "http" or "grpc"
    grpc_status: int | None  # a gRPC request's status (trailers or trailers-only head)

    @property
    def response_flags(self) -> str: ...


class Sinks(Protocol):
    """What the data plane records into (`nodeagent.telemetry.service.Telemetry` is one)."""

    @property
    def metrics(self) -> IstioMetrics: ...
    @property
    def access_log(self) -> AccessLog: ...
    @property
    def tracer(self) -> Tracer: ...


# Envoy's response flags for what can end a TCP connection early.
TCP_FLAGS: Mapping[str, str] = {
    "ok": "-",
    "denied": "UAEX",  # refused by authorization (or PeerAuthentication STRICT)
    "refused": "NR",  # no route: REGISTRY_ONLY refused an unknown destination
    "failed": "UF",  # the upstream (or the tunnel) could not be connected
    "reset": "UR",  # the relay ended with an error after bytes flowed
}


_SOURCE_PRINCIPAL = PEER_LABELS.index("source_principal")
_DESTINATION_PRINCIPAL = PEER_LABELS.index("destination_principal")


def _labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_for(snap: Snapshot, workload: Workload, port: int) -> Service | None:
    """The Service of `workload`'s namespace that selects it and targets `port` (the
    destination service of an inbound connection); the first by name when several do."""
    found: list[Service] = []
    for svc in snap.services():
        if svc.kind != "Service" or svc.namespace != workload.namespace or not svc.selector:
            continue
        if not _labels_match(svc.selector, workload.labels):
            continue
        for p in svc.ports:
            target = p.target_port
            if isinstance(target, str):
                target = workload.ports.get(target, p.port)
            if target == port:
                found.append(svc)
                break
    return min(found, key=lambda s: s.name) if found else None


def service_of(snap: Snapshot, ref: str | None) -> Service | None:
    """A "namespace/name" service reference (as routing decisions carry it) → the Service."""
    if not ref or "/" not in ref:
        return None
    namespace, _, name = ref.partition("/")
    return snap.service(namespace, name) or snap.service(namespace, name, "ServiceEntry")


def peer_workload(
    snap: Snapshot, address: str, *, identity: str = "", name: str = "", namespace: str = ""
) -> Workload | None:
    """The workload at `address`; else the one named by the tunnel header (namespace/name)
    among those with the verified `identity` (a gateway has no pod address)."""
    found = snap.workload_by_ip(address) if address else None
    if found is not None:
        return found
    if identity:
        for w in snap.workloads_with_identity(identity):
            if (w.name, w.namespace) == (name, namespace):
                return w
    return None


class TcpRecorder:
    """Telemetry of one TCP connection; built once both peers are known."""

    def __init__(
        self,
        sinks: Sinks,
        *,
        reporter: Reporter,
        namespace: str,
        source: Workload | None,
        destination: Workload | None,
        service: Service | None,
        security_policy: SecurityPolicy,
        source_principal: str | None = None,
        destination_principal: str | None = None,
        downstream: str = "-",
        upstream: str = "-",
        connection_id: str = "-",
        span: ActiveSpan | None = None,
        start_time: float | None = None,
    ) -> None:
        self.sinks = sinks
        self.reporter: Reporter = reporter
        self.namespace = namespace
        self.security_policy: SecurityPolicy = security_policy
        self.peer = peer_labels(
            reporter=reporter,
            source=source,
            destination=destination,
            service=service,
            protocol="tcp",
            source_principal=source_principal,
            destination_principal=destination_principal,
        )
        self.downstream = downstream
        self.upstream = upstream
        self.connection_id = connection_id
        self.span = span
        self.start_time = time.time() if start_time is None else start_time
        self._labels: Labels | None = None
        self._closed = False

    def opened(self) -> None:
        if self._labels is None:
            self._labels = self.sinks.metrics.connection_opened(
                self.peer, security_policy=self.security_policy
            )

    def closed(
        self, *, to_upstream: int, to_client: int, result: str = "ok", flag: str | None = None
    ) -> None:
        """`to_upstream`: bytes the client sent; `to_client`: bytes it got back. `result` maps
        to Envoy's flag (TCP_FLAGS) unless the caller already has one (`flag`)."""
        if self._closed:
            return
        self._closed = True
        self.opened()
        assert self._labels is not None
        flags = flag or TCP_FLAGS.get(result, "-")
        self.sinks.metrics.connection_closed(
            self._labels, sent=to_client, received=to_upstream, response_flags=flags
        )
        labels = self.peer.as_dict()
        now = time.time()
        trace_id = "-"
        if self.span is not None:
            trace_id = self.span.trace_id
            self.span.finish(
                tags={
                    "response_flags": flags,
                    "upstream_cluster": labels["destination_service"],
                    "peer.address": self.downstream,
                    "request_size": str(to_upstream),
                    "response_size": str(to_client),
                }
            )
        self.sinks.access_log.log(
            AccessRecord(
                kind="connection",
                namespace=self.namespace,
                start_time=self.start_time,
                duration_ms=max(0.0, (now - self.start_time) * 1000),
                reporter=self.reporter,
                protocol="tcp",
                response_flags=flags,
                bytes_received=to_upstream,
                bytes_sent=to_client,
                upstream_host=self.upstream,
                downstream_address=self.downstream,
                source_principal=labels["source_principal"],
                destination_principal=labels["destination_principal"],
                trace_id=trace_id,
                connection_id=self.connection_id,
            )
        )


def record_request(
    sinks: Sinks,
    snap: Snapshot,
    entry: RequestRecord,
    *,
    source: Workload | None,
    namespace: str,
    source_principal: str | None = None,
    tunneled: bool = True,
) -> None:
    """Metrics and the access-log line of one request an `HttpProxy` completed (reporter
    "source": the proxy is the client's side). `entry.upstream` names the endpoint tried last,
    `entry.upstream_cluster` (`outbound|port|subset|host`) the service (set for a fault abort
    too), `entry.downstream_address` the client."""
    destination: Workload | None = None
    address = (entry.upstream or "").rpartition(":")[0]
    if address:
        destination = snap.workload_by_ip(address)
    service: Service | None = None
    if entry.upstream_cluster:
        service = snap.service_by_host(entry.upstream_cluster.rsplit("|", 1)[-1])
    mtls = tunneled and destination is not None and bool(destination.identity)
    policy: SecurityPolicy = "mutual_tls" if mtls else "none"
    _record_http(
        sinks,
        entry,
        reporter="source",
        source=source,
        destination=destination,
        service=service,
        source_principal=source_principal,
        security_policy=policy,
        namespace=namespace,
        upstream_transport_failure_reason=entry.upstream_transport_failure_reason or "-",
        default_details="-",
    )


def record_inbound_request(
    sinks: Sinks,
    entry: RequestRecord,
    *,
    source: Workload | None,
    destination: Workload,
    service: Service | None,
    source_principal: str | None,
    security_policy: SecurityPolicy,
) -> None:
    """Metrics and the access-log line of one request the destination agent parsed (reporter
    "destination", Istio's labels as on the source side: the verified peer is the source
    principal). The line carries the client's address and both principals: the peer's
    (mTLS) and the request's (JWT)."""
    _record_http(
        sinks,
        entry,
        reporter="destination",
        source=source,
        destination=destination,
        service=service,
        source_principal=source_principal,
        security_policy=security_policy,
        namespace=destination.namespace,
        upstream_transport_failure_reason="-",  # only the source side reports one
        default_details="via_upstream",
    )


def _record_http(
    sinks: Sinks,
    entry: RequestRecord,
    *,
    reporter: Reporter,
    source: Workload | None,
    destination: Workload | None,
    service: Service | None,
    source_principal: str | None,
    security_policy: SecurityPolicy,
    namespace: str,
    upstream_transport_failure_reason: str,
    default_details: str,
) -> None:
    """The metrics and the access-log line of one HTTP request, either reporter's: the two
    differ only in the labels' side, the namespace and what an unset detail reads as."""
    peer = peer_labels(
        reporter=reporter,
        source=source,
        destination=destination,
        service=service,
        protocol=entry.protocol,
        source_principal=source_principal,
    )
    flags = entry.response_flags
    sinks.metrics.record_request(
        peer,
        response_code=entry.code,
        grpc_status=entry.grpc_status,
        duration_ms=entry.duration * 1000,
        request_bytes=entry.bytes_received,
        response_bytes=entry.bytes_sent,
        response_flags=flags,
        security_policy=security_policy,
    )
    values = peer.values  # no per-request dict: the principals by position
    sinks.access_log.log(
        AccessRecord(
            kind="request",
            namespace=namespace,
            start_time=time.time() - entry.duration,
            duration_ms=entry.duration * 1000,
            reporter=reporter,
            protocol=entry.protocol,
            method=entry.method,
            authority=entry.authority or "-",
            path=entry.path,
            response_code=entry.code,
            response_flags=flags,
            bytes_received=entry.bytes_received,
            bytes_sent=entry.bytes_sent,
            upstream_host=entry.upstream or "-",
            upstream_transport_failure_reason=upstream_transport_failure_reason,
            downstream_address=entry.downstream_address or "-",
            source_principal=values[_SOURCE_PRINCIPAL],
            destination_principal=values[_DESTINATION_PRINCIPAL],
            request_principal=entry.request_principal or "-",  # the gateway's JWT check
            response_code_details=entry.response_code_details or default_details,
            request_id=entry.request_id or "-",
            trace_id=entry.trace_id or "-",
            connection_id=str(entry.connection_id),
        )
    )
