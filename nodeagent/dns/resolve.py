"""Which DNS questions the mesh answers itself, and with what: a pure function of the snapshot.

`answer(snapshot, namespace, question)` → `Answer` (records we are authoritative for) or
`Forward` (send the query upstream unchanged). It follows ztunnel's DNS proxy (src/dns/server.rs):

- Only A and AAAA questions of class IN are ours; everything else is forwarded.
- The name is tried as asked, then in its Kubernetes forms as seen from the client's namespace
  (`svc` → `svc.<ns>.svc.<cd>`, `svc.ns` → `svc.ns.svc.<cd>`, `svc.ns.svc` → `+.<cd>`), then with
  a search domain (`<ns>.svc.<cd>`, `svc.<cd>`, `<cd>`) stripped, which is what a resolver with
  the usual `ndots:5` search path sends first (`reviews.default.svc.cluster.local.default.svc…`,
  `example.com.default.svc.cluster.local`); the stripped name's Kubernetes forms follow.
- Each of those candidates is looked up as a host, then as wildcard hosts of decreasing
  specificity (`a.b.example.com` → `*.b.example.com` → `*.example.com` → `*.com`), so a
  ServiceEntry `*.example.com` matches any depth below example.com, as in Istio.
- A host counts only if its service has VIPs, or is a Kubernetes Service without one (headless or
  not yet allocated: we answer its endpoints' pod IPs). A ServiceEntry without addresses is
  forwarded: the real DNS knows its name. Several services on one host: the client's namespace
  first, then the snapshot's precedence.
- A match found by stripping a search domain is answered as a CNAME from the asked name to the
  stripped one plus the A records of the stripped name (not for wildcard matches), as ztunnel.
- The mesh is IPv4-only: AAAA for a mesh name is NOERROR with no records (never NXDOMAIN: the
  name exists), and so is A for a service without addresses (a headless service with no pods).

Endpoint order is the snapshot's; the server shuffles before sending (ztunnel does too).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nodeagent.dns.message import (
    CLASS_IN,
    RCODE_NOERROR,
    TYPE_A,
    TYPE_AAAA,
    Name,
    Question,
    Record,
    a_record,
    cname_record,
    name_text,
)
from nodeagent.snapshot import Service, Snapshot

TTL = 30  # seconds; short, so that a moved VIP or a scaled headless service shows up soon


@dataclass(frozen=True, slots=True)
class Answer:
    """We answer: `records` (possibly none) with `rcode`, authoritatively."""

    rcode: int
    records: tuple[Record, ...]
    service: str  # "kind/namespace/name" of the matched service, for the log line
    reason: str  # "vip", "headless", "ipv4-only", "no-endpoints"


@dataclass(frozen=True, slots=True)
class Forward:
    """Not a mesh name (or not a question we answer): forward the query unchanged."""

    reason: str


@dataclass(frozen=True, slots=True)
class _Match:
    service: Service
    host: str  # the host (or wildcard host) that matched
    stripped: Name | None  # the asked name without the search domain it matched under


def answer(snapshot: Snapshot, namespace: str, question: Question) -> Answer | Forward:
    """What to reply to `question` asked by a pod of `namespace`. Pure and synchronous."""
    if question.qclass != CLASS_IN:
        return Forward("class")
    if question.qtype not in (TYPE_A, TYPE_AAAA):
        return Forward("type")
    if not question.name:
        return Forward("root")
    match = find_service(snapshot, namespace, question.name)
    if match is None:
        return Forward("not-mesh")
    ref = f"{match.service.kind}/{match.service.namespace}/{match.service.name}"
    if question.qtype == TYPE_AAAA:
        return Answer(RCODE_NOERROR, (), ref, "ipv4-only")
    addresses = [a for a in snapshot.dns_addresses(match.service) if _is_ipv4(a)]
    if not addresses:
        return Answer(RCODE_NOERROR, (), ref, "no-endpoints")
    records: list[Record] = []
    owner = question.name
    if match.stripped is not None and not match.host.startswith("*"):
        records.append(cname_record(question.name, match.stripped, TTL))
        owner = match.stripped
    records += [a_record(owner, a, TTL) for a in addresses]
    reason = "vip" if match.service.addresses else "headless"
    return Answer(RCODE_NOERROR, tuple(records), ref, reason)


def find_service(snapshot: Snapshot, namespace: str, name: Name) -> _Match | None:
    """The service a client in `namespace` means by `name`, trying ztunnel's aliases in order."""
    cd = snapshot.cluster_domain
    for candidate, stripped in _aliases(name, namespace, cd):
        for host in _wildcards(candidate):
            service = _pick(snapshot, host, namespace)
            if service is not None:
                return _Match(service, host, stripped)
    return None


def _aliases(name: Name, namespace: str, cluster_domain: str) -> list[tuple[str, Name | None]]:
    text = name_text(name)
    out: dict[str, Name | None] = {text: None}
    for form in _kube_forms(text, namespace, cluster_domain):
        out.setdefault(form, None)
    for domain in (f"{namespace}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain):
        n = domain.count(".") + 1
        if len(name) > n and text.endswith("." + domain):
            stripped = name[:-n]
            stripped_text = name_text(stripped)
            out.setdefault(stripped_text, stripped)
            for form in _kube_forms(stripped_text, namespace, cluster_domain):
                out.setdefault(form, stripped)
    return list(out.items())


def _kube_forms(text: str, namespace: str, cluster_domain: str) -> list[str]:
    labels = text.split(".")
    if len(labels) == 1:
        return [f"{text}.{namespace}.svc.{cluster_domain}"]
    if len(labels) == 2:
        return [f"{text}.svc.{cluster_domain}"]
    if len(labels) == 3 and labels[2] == "svc":
        return [f"{text}.{cluster_domain}"]
    return []


def _wildcards(host: str) -> list[str]:
    labels = host.split(".")
    return [host] + ["*." + ".".join(labels[i:]) for i in range(1, len(labels))]


def _pick(snapshot: Snapshot, host: str, namespace: str) -> Service | None:
    found = snapshot.indexes.services_by_host.get(host, ())
    usable = [s for s in found if s.addresses or s.kind == "Service"]
    for s in usable:
        if s.namespace == namespace:
            return s
    return usable[0] if usable else None


def _is_ipv4(address: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(address), ipaddress.IPv4Address)
    except ValueError:
        return False
