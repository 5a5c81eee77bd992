"""The CA's signer: publishes the trust bundle and the CRL, and answers certificate requests.

Agents put requests at `/mesh/v1/csr/<node>/<ns>/<sa>`; the signer lists them at start, then
watches the prefix (resuming by revision; a compaction means re-list). For each request it decides
(`decide`, pure apart from the workload lookup) whether the node may have that identity: a
Workload with that namespace and service account must be registered under
`/mesh/v1/workloads/<node>/`. It then writes either the certificate chain or an explicit
rejection to `/mesh/v1/certs/<node>/<ns>/<sa>` and deletes the request, in one transaction that
only applies if the request was not replaced meanwhile. Malformed store contents are logged by key
and answered with a rejection where possible; they never stop the signer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from cryptography import x509

from nodeagent.ca import certs
from nodeagent.log import get_logger
from nodeagent.store import codec, keys
from nodeagent.store.base import (
    CompactedError,
    Compare,
    Delete,
    Event,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    StoreError,
)

log = get_logger("ca.signer")

DEFAULT_TTL = 24 * 3600.0
# The CRL is re-signed well before its nextUpdate, so agents never hold a stale one for long.
CRL_VALIDITY = 7 * 86400.0
CRL_REPUBLISH = 86400.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
DOC_VERSION = 1


class SigningRejected(Exception):
    """A request the CA refuses; the message is written into the answer for the agent."""


@dataclass(frozen=True, slots=True)
class SigningRequest:
    key: str
    node: str
    ident: certs.SpiffeId
    csr: x509.CertificateSigningRequest
    request_id: str


def parse_request(kv: KeyValue, trust_domain: str) -> SigningRequest:
    """Check a request document against its key: the key names node and identity, the document
    must agree, and the CSR must name exactly that identity. SigningRejected says why."""
    rest = kv.key.removeprefix(keys.CSR)
    node, _, ident_key = rest.partition("/")
    if not node or ident_key.count("/") != 1:
        raise SigningRejected(f"request key {kv.key!r} is not {keys.CSR}<node>/<namespace>/<sa>")
    try:
        doc = codec.decode(kv)
    except codec.DecodeError as exc:
        raise SigningRejected(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("v") != DOC_VERSION:
        raise SigningRejected(f"request at {kv.key!r} is not a version {DOC_VERSION} document")
    if doc.get("node") != node:
        raise SigningRejected(
            f"request names node {doc.get('node')!r} but sits under node {node!r}"
        )
    try:
        ident = certs.parse_spiffe_id(doc.get("identity"), trust_domain)  # type: ignore[arg-type]
    except certs.SpiffeIdError as exc:
        raise SigningRejected(f"requested identity: {exc}") from None
    if ident.key != ident_key:
        raise SigningRejected(
            f"requested identity {ident.uri} does not match the key's {ident_key!r}"
        )
    try:
        csr = certs.check_csr(doc.get("csr"), ident)  # type: ignore[arg-type]
    except certs.CertError as exc:
        raise SigningRejected(str(exc)) from None
    request_id = doc.get("request", "")
    return SigningRequest(
        kv.key, node, ident, csr, request_id if isinstance(request_id, str) else ""
    )


def authorize(node: str, ident: certs.SpiffeId, workloads: Sequence[Any]) -> None:
    """Node authorization: some Workload registered under this node must run as `ident`."""
    for doc in workloads:
        if not isinstance(doc, dict):
            continue
        meta, spec = doc.get("metadata"), doc.get("spec")
        if not isinstance(meta, dict) or not isinstance(spec, dict):
            continue
        if (
            meta.get("namespace") == ident.namespace
            and spec.get("serviceAccount") == ident.service_account
            and spec.get("node", node) == node
        ):
            return
    raise SigningRejected(
        f"node {node!r} runs no workload with namespace {ident.namespace!r} and service "
        f"account {ident.service_account!r}; it may not have {ident.uri}"
    )


class Signer:
    def __init__(
        self,
        store: Store,
        authority: certs.SigningAuthority,
        trust_domain: str,
        *,
        ttl: float = DEFAULT_TTL,
        extra_roots: Sequence[x509.Certificate] = (),
        revoked: Callable[[], set[int]] = set,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.authority = authority
        self.trust_domain = certs.check_trust_domain(trust_domain)
        self.ttl = ttl
        self.roots = _unique([*authority.roots, *extra_roots])
        self._revoked = revoked
        self._clock = clock
        self.stats = {"signed": 0, "rejected": 0, "store_errors": 0}

    # -- publishing -------------------------------------------------------------------------

    def bundle_document(self) -> dict[str, Any]:
        return {
            "v": DOC_VERSION,
            "trust_domain": self.trust_domain,
            "roots": [certs.cert_pem([r]).decode() for r in self.roots],
        }

    def crl_document(self) -> dict[str, Any]:
        revoked = self._revoked()
        return crl_document(self.authority, revoked, now=self._clock())

    async def publish(self) -> None:
        await self.store.put(keys.CA_BUNDLE, codec.encode(self.bundle_document()))
        await self.store.put(keys.CA_CRL, codec.encode(self.crl_document()))
        log.info("ca.published", roots=len(self.roots), revoked=len(self._revoked()))

    # -- the component ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        backoff = BACKOFF_INITIAL
        while True:
            try:
                await self.publish()
                break
            except StoreError as exc:
                self.stats["store_errors"] += 1
                log.warning("ca.publish_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._republish)
            task_status.started()
            await self._serve_requests()

    async def _republish(self) -> None:
        while True:
            await trio.sleep(CRL_REPUBLISH)
            try:
                await self.publish()
            except StoreError as exc:
                log.warning("ca.publish_failed", error=str(exc))

    async def _serve_requests(self) -> None:
        backoff = BACKOFF_INITIAL
        revision = 0
        while True:
            try:
                if revision == 0:
                    kvs, revision = await self.store.range(keys.CSR)
                    for kv in kvs:
                        await self.handle(kv)
                async with self.store.watch(keys.CSR, start_revision=revision + 1) as events:
                    backoff = BACKOFF_INITIAL
                    async for batch in events:
                        for ev in batch:
                            revision = max(revision, ev.kv.mod_revision)
                            await self._on_event(ev)
            except CompactedError as exc:
                log.warning("ca.watch_compacted", error=str(exc))
                revision = 0
            except StoreError as exc:
                self.stats["store_errors"] += 1
                log.warning("ca.store_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    async def _on_event(self, ev: Event) -> None:
        if ev.type == "put":
            await self.handle(ev.kv)

    async def handle(self, kv: KeyValue) -> dict[str, Any]:
        """Answer one request (sign or reject), then remove it. Returns the answer written."""
        answer = await self._decide(kv)
        rest = kv.key.removeprefix(keys.CSR)
        target = keys.CERTS + rest
        value = codec.encode(answer)
        # Only answer the request we read: a newer one at the same key gets its own event.
        success: list[Put | Delete] = [Put(target, value, lease=kv.lease), Delete(kv.key)]
        try:
            result = await self.store.txn([Compare(kv.key, kv.mod_revision)], success)
        except LeaseNotFound:
            # The requesting node's lease is gone (the node died): drop the request.
            result = await self.store.txn([Compare(kv.key, kv.mod_revision)], [Delete(kv.key)])
            log.info("ca.request_dropped", key=kv.key, reason="the node's lease expired")
            return answer
        if not result.succeeded:
            log.info("ca.request_superseded", key=kv.key)
        return answer

    async def _decide(self, kv: KeyValue) -> dict[str, Any]:
        request_id = ""
        try:
            req = parse_request(kv, self.trust_domain)
            request_id = req.request_id
            workloads, _ = await self.store.range(keys.node_workloads(req.node))
            docs = []
            for wkv in workloads:
                try:
                    docs.append(codec.decode(wkv))
                except codec.DecodeError as exc:
                    log.warning("ca.bad_workload", key=wkv.key, error=str(exc))
            authorize(req.node, req.ident, docs)
        except SigningRejected as exc:
            self.stats["rejected"] += 1
            log.warning("ca.rejected", key=kv.key, reason=str(exc))
            return {"v": DOC_VERSION, "error": str(exc), "request": request_id or _rid(kv)}
        cert = certs.sign_svid(self.authority, req.csr, req.ident, now=self._clock(), ttl=self.ttl)
        self.stats["signed"] += 1
        chain = certs.cert_pem([cert, *self.authority.issuer_chain]).decode()
        serial = certs.serial_hex(cert.serial_number)
        log.info(
            "ca.signed",
            key=kv.key,
            identity=req.ident.uri,
            serial=serial,
            not_after=int(certs.not_after(cert)),
        )
        return {
            "v": DOC_VERSION,
            "identity": req.ident.uri,
            "chain": chain,
            "serial": serial,
            "not_after": int(certs.not_after(cert)),
            "request": request_id,
        }


def crl_document(
    authority: certs.SigningAuthority, revoked: set[int], *, now: float
) -> dict[str, Any]:
    return {
        "v": DOC_VERSION,
        "crl": certs.build_crl(authority, revoked, now=now, validity=CRL_VALIDITY),
        "issuer_chain": certs.cert_pem(authority.issuer_chain).decode(),
        "revoked": sorted(certs.serial_hex(s) for s in revoked),
    }


def _rid(kv: KeyValue) -> str:
    """The request id of an unparseable request, if it has one (so the agent sees the answer)."""
    try:
        doc = codec.decode(kv)
    except codec.DecodeError:
        return ""
    rid = doc.get("request") if isinstance(doc, dict) else None
    return rid if isinstance(rid, str) else ""


def _unique(roots: Sequence[x509.Certificate]) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out
