"""Config health: the checks Kiali users rely on, computed from one snapshot and the issued
certificates. Each finding names the object and says in one line how to fix it. Pure.

- a VirtualService routes to a subset no DestinationRule of the host defines, or to a subset
  that matches no pod;
- a DestinationRule subset that matches no pod of its host;
- an AuthorizationPolicy whose selector matches no workload;
- a Gateway no VirtualService binds;
- a certificate that expires within `CERT_WARNING` seconds (or has expired).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from nodeagent.console.selection import backends
from nodeagent.snapshot import Snapshot, VirtualService
from nodeagent.snapshot.hosts import labels_match
from nodeagent.snapshot.model import DestinationRule
from nodeagent.snapshot.routes import HttpRoute, TcpRoute

CERT_WARNING = 6 * 3600.0
Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    kind: str
    ref: str  # namespace/name of the object (a certificate: its identity)
    check: str
    message: str
    fix: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A certificate the CA issued, as its store record says (`/mesh/v1/certs/<node>/…`)."""

    node: str
    identity: str
    serial: str
    not_after: float


def virtual_services(snap: Snapshot) -> list[VirtualService]:
    seen: dict[str, VirtualService] = {}
    for group in snap.indexes.virtual_services_by_gateway.values():
        for vs in group:
            seen.setdefault(vs.ref, vs)
    for group in snap.indexes.routes.values():
        for vs in group:
            seen.setdefault(vs.ref, vs)
    return [seen[k] for k in sorted(seen)]


def destination_rules(snap: Snapshot) -> list[DestinationRule]:
    seen = {dr.ref: dr for group in snap.indexes.destination_rules.values() for dr in group}
    return [seen[k] for k in sorted(seen)]


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(none)"


def _virtual_service_findings(snap: Snapshot) -> Iterator[Finding]:
    for vs in virtual_services(snap):
        reported: set[tuple[str, str]] = set()
        routes: list[HttpRoute | TcpRoute] = [*vs.http, *vs.tcp]
        for route in routes:
            for dest in route.destinations:
                if dest.subset is None or (dest.fqdn, dest.subset) in reported:
                    continue
                reported.add((dest.fqdn, dest.subset))
                dr = snap.destination_rule(dest.fqdn, vs.namespace)
                subset = dr.subset(dest.subset) if dr is not None else None
                if subset is None:
                    problem = (
                        f"DestinationRule {dr.ref} does not define it"
                        if dr is not None
                        else "no DestinationRule exists for that host"
                    )
                    yield Finding(
                        "error", "VirtualService", vs.ref, "undefined-subset",
                        f"routes to subset {dest.subset!r} of {dest.fqdn}, but {problem}",
                        f"add subset {dest.subset!r} to a DestinationRule for {dest.host}, "
                        "or route to a defined subset",
                    )  # fmt: skip
                    continue
                if not backends(snap, snap.service_by_host(dest.fqdn), subset.labels):
                    yield Finding(
                        "warning", "VirtualService", vs.ref, "subset-without-pods",
                        f"routes to subset {dest.subset!r} of {dest.fqdn} "
                        f"({_labels(subset.labels)}), which no pod matches",
                        f"start pods labelled {_labels(subset.labels)} or change the route's "
                        "subset",
                    )  # fmt: skip


def _destination_rule_findings(snap: Snapshot) -> Iterator[Finding]:
    for dr in destination_rules(snap):
        service = snap.service_by_host(dr.host)
        for name, subset in sorted(dr.subsets.items()):
            if not backends(snap, service, subset.labels):
                yield Finding(
                    "warning", "DestinationRule", dr.ref, "subset-without-pods",
                    f"subset {name!r} ({_labels(subset.labels)}) of {dr.host} matches no pod",
                    f"fix the labels of subset {name!r} or remove it",
                )  # fmt: skip


def _authorization_findings(snap: Snapshot) -> Iterator[Finding]:
    policies = {p.ref: p for g in snap.indexes.authorization_policies.values() for p in g}
    for ref in sorted(policies):
        policy = policies[ref]
        if policy.selector is None:
            continue
        selector = policy.selector
        scope = [
            w for w in snap.workloads() if policy.namespace in (snap.root_namespace, w.namespace)
        ]
        if not any(labels_match(selector, w.labels) for w in scope):
            yield Finding(
                "warning", "AuthorizationPolicy", ref, "selects-nothing",
                f"selector {_labels(selector)} matches no workload in "
                + ("the mesh" if policy.namespace == snap.root_namespace
                   else f"namespace {policy.namespace}"),
                "fix spec.selector.matchLabels, or delete the policy",
            )  # fmt: skip


def _gateway_findings(snap: Snapshot) -> Iterator[Finding]:
    for ref in sorted(snap.indexes.gateways):
        if not snap.virtual_services_for_gateway(ref):
            yield Finding(
                "warning", "Gateway", ref, "unbound-gateway",
                "no VirtualService binds this Gateway, so its listeners route nothing",
                f"add {ref} to spec.gateways of a VirtualService, or delete the Gateway",
            )  # fmt: skip


def _certificate_findings(certs: Iterable[IssuedCert], now: float) -> Iterator[Finding]:
    for cert in sorted(certs, key=lambda c: (c.identity, c.node)):
        left = cert.not_after - now
        if left > CERT_WARNING:
            continue
        expired = left <= 0
        yield Finding(
            "error" if expired else "warning", "Certificate", cert.identity,
            "expired" if expired else "expires-soon",
            (f"expired {-left / 3600:.1f} h ago" if expired
             else f"expires in {left / 3600:.1f} h") + f" (node {cert.node}, serial {cert.serial})",
            "check that the CA (`nodeagent ca serve`) runs and the agent of "
            f"{cert.node} renews",
        )  # fmt: skip


def config_health(snap: Snapshot, certs: Iterable[IssuedCert], now: float) -> list[Finding]:
    return [
        *_virtual_service_findings(snap),
        *_destination_rule_findings(snap),
        *_authorization_findings(snap),
        *_gateway_findings(snap),
        *_certificate_findings(certs, now),
    ]
