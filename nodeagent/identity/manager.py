"""The agent's identity manager: one key and SPIFFE certificate per service account on the node.

For each identity the agent `ensure`s, a task generates (or reloads) a P-256 key that never leaves
the node, puts a CSR at `/mesh/v1/csr/<node>/<ns>/<sa>` under the node's lease, waits (bounded) for
the CA's answer at `/mesh/v1/certs/<node>/<ns>/<sa>`, and renews at half the certificate's
lifetime; a failure or rejection is retried with exponential backoff while the current certificate
(if still valid) keeps serving. A second task follows the trust bundle and the CRL under
`/mesh/v1/ca/`. TLS contexts are built on first use and cached until the certificate or the bundle
changes, so the data plane pays a dict lookup per connection.

With a `state_dir`, keys and chains (mode 0600) and the last bundle and CRL are kept on disk, so a
restarted agent serves a still-valid certificate before the CA or the store answers.
"""

from __future__ import annotations

import datetime
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ca import certs
from nodeagent.identity import mtls
from nodeagent.identity.api import IdentityUnavailable
from nodeagent.log import get_logger
from nodeagent.store import codec, keys
from nodeagent.store.base import CompactedError, KeyValue, Store, StoreError

log = get_logger("identity")

CA_PREFIX = keys.ROOT + "ca/"
BUNDLE_CACHE = "bundle.msgpack"
CRL_CACHE = "crl.msgpack"


class RequestFailed(Exception):
    """One attempt to obtain a certificate failed; the message says why (shown on /certs)."""


@dataclass(slots=True)
class _Identity:
    ident: certs.SpiffeId
    key: ec.EllipticCurvePrivateKey | None = None
    chain: list[x509.Certificate] = field(default_factory=list)  # leaf first, no root
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wake: trio.Event = field(default_factory=trio.Event)
    server_ctx: ssl.SSLContext | None = None
    client_ctx: ssl.SSLContext | None = None
    requesting: bool = False
    failures: int = 0
    last_error: str | None = None
    renewals: int = 0

    @property
    def leaf(self) -> x509.Certificate | None:
        return self.chain[0] if self.chain else None

    def renew_at(self) -> float:
        leaf = self.leaf
        if leaf is None:
            return 0.0
        nb, na = certs.not_before(leaf), certs.not_after(leaf)
        return nb + (na - nb) / 2


class IdentityManager:
    """Implements `nodeagent.identity.api.IdentityProvider`; run it with `nursery.start(m.run)`."""

    def __init__(
        self,
        store: Store,
        node: str,
        trust_domain: str,
        *,
        lease: Callable[[], int] = lambda: 0,
        state_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        request_timeout: float = 30.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
    ) -> None:
        self.store = store
        self.node = node
        self.trust_domain = certs.check_trust_domain(trust_domain)
        self._lease = lease
        self._state_dir = state_dir
        self._clock = clock
        self._request_timeout = request_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._identities: dict[str, _Identity] = {}
        self._nursery: trio.Nursery | None = None
        self._roots: list[x509.Certificate] = []
        self._bundle_pem = ""
        self._crl_doc: dict[str, Any] | None = None
        self._revoked: frozenset[int] = frozenset()
        # Bundle/CRL documents refused (bad version, stranger's signature, garbage): each one
        # leaves the previous trust state in place, so only this counter shows it arrived.
        self._rejected_ca_documents = 0
        self._progress = trio.Event()

    # -- IdentityProvider ---------------------------------------------------------------------

    def ensure(self, identity: str) -> None:
        if identity in self._identities:
            return
        try:
            ident = certs.parse_spiffe_id(identity, self.trust_domain)
        except certs.SpiffeIdError as exc:
            log.error("identity.ensure_failed", identity=identity, error=str(exc))
            return
        entry = _Identity(ident)
        self._load_persisted(entry)
        self._identities[identity] = entry
        log.info("identity.ensure", identity=identity, cached=entry.leaf is not None)
        if self._nursery is not None:
            self._nursery.start_soon(self._maintain, entry)
        self._bump()

    def release(self, identity: str) -> None:
        entry = self._identities.pop(identity, None)
        if entry is None:
            return
        entry.scope.cancel()
        if self._state_dir is not None:
            d = self._identity_dir(entry.ident)
            for name in ("key.pem", "chain.pem"):
                (d / name).unlink(missing_ok=True)
        log.info("identity.released", identity=identity)
        self._bump()

    def can_serve(self, identity: str) -> bool:
        """Whether `identity` has a valid certificate and a trust bundle now: the agent can
        terminate mTLS for its workloads (their Workload status is Healthy)."""
        return self._unavailable(identity) is None

    async def wait_ready(self, identity: str, within: float) -> None:
        with trio.move_on_after(within):
            while self._unavailable(identity) is not None:
                await self._progress.wait()
            return
        raise IdentityUnavailable(
            f"{identity}: no valid certificate after {within}s ({self._unavailable(identity)})"
        )

    def server_context(self, identity: str) -> ssl.SSLContext:
        entry = self._ready(identity)
        if entry.server_ctx is None:
            entry.server_ctx = self._context(entry, server=True)
        return entry.server_ctx

    def client_context(self, identity: str) -> ssl.SSLContext:
        entry = self._ready(identity)
        if entry.client_ctx is None:
            entry.client_ctx = self._context(entry, server=False)
        return entry.client_ctx

    def peer_identity(self, cert_der: bytes) -> str:
        return mtls.peer_identity(cert_der, self.trust_domain, self._revoked)

    # -- for the admin socket -----------------------------------------------------------------

    def certificates(self) -> list[dict[str, Any]]:
        out = []
        for identity, entry in sorted(self._identities.items()):
            leaf = entry.leaf
            row: dict[str, Any] = {
                "identity": identity,
                "state": self._state(entry),
                "serial": None,
                "not_before": None,
                "not_after": None,
                "renew_at": None,
                "renewals": entry.renewals,
                "failures": entry.failures,
                "last_error": entry.last_error,
            }
            if leaf is not None:
                row["serial"] = certs.serial_hex(leaf.serial_number)
                row["not_before"] = leaf.not_valid_before_utc.isoformat()
                row["not_after"] = leaf.not_valid_after_utc.isoformat()
                row["renew_at"] = _iso(entry.renew_at())
            out.append(row)
        return out

    async def wait_changed(self) -> None:
        """Wait for the next change: a certificate issued, a failure, the bundle or CRL (or a
        bundle or CRL document refused)."""
        await self._progress.wait()

    def material(self) -> dict[str, Any]:
        """What a data-plane worker process needs to terminate and originate mTLS for this
        node's identities (nodeagent.workers.identity): the bundle, the revoked serials, and
        each identity's key and chain that `can_serve` now. Keys stay on the node: they go to
        the agent's own worker processes only, over a socketpair."""
        ids = {}
        for identity, entry in self._identities.items():
            if entry.key is not None and entry.chain and self._unavailable(identity) is None:
                ids[identity] = {
                    "chain": certs.cert_pem(entry.chain).decode(),
                    "key": certs.key_pem(entry.key).decode(),
                }
        return {
            "trust_domain": self.trust_domain,
            "bundle": self._bundle_pem,
            "revoked": sorted(format(s, "x") for s in self._revoked),
            "identities": ids,
        }

    def statistics(self) -> dict[str, Any]:
        return {
            "trust_domain": self.trust_domain,
            "roots": len(self._roots),
            "revoked": len(self._revoked),
            "rejected_ca_documents": self._rejected_ca_documents,
            "identities": len(self._identities),
            "ready": sum(1 for i in self._identities if self._unavailable(i) is None),
        }

    # -- the component ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._load_ca_cache()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for entry in self._identities.values():
                    nursery.start_soon(self._maintain, entry)
                nursery.start_soon(self._watch_ca)
                task_status.started()
        finally:
            self._nursery = None

    # -- one identity -------------------------------------------------------------------------

    async def _maintain(self, entry: _Identity) -> None:
        backoff = self._backoff_initial
        with entry.scope:
            while True:
                if entry.leaf is not None and self._wants(entry) is None:
                    await self._sleep_or_wake(entry, entry.renew_at() - self._clock())
                    continue
                entry.requesting = True
                try:
                    await self._request(entry)
                except RequestFailed as exc:
                    entry.failures += 1
                    entry.last_error = str(exc)
                    log.warning(
                        "identity.request_failed",
                        identity=entry.ident.uri,
                        error=str(exc),
                        failures=entry.failures,
                        retry_in=backoff,
                        serving=self._unavailable(entry.ident.uri) is None,
                    )
                    self._bump()
                    await self._sleep_or_backoff(entry, backoff)
                    backoff = min(backoff * 2, self._backoff_max)
                    continue
                finally:
                    entry.requesting = False
                backoff = self._backoff_initial

    def _wants(self, entry: _Identity) -> str | None:
        """Why `entry` needs a new certificate now, or None."""
        leaf = entry.leaf
        if leaf is None:
            return "no certificate"
        if self._clock() >= entry.renew_at():
            return "half its lifetime passed"
        if leaf.serial_number in self._revoked:
            return "revoked"
        if self._roots:
            return self._chain_problem(entry.chain)
        return None

    async def _sleep_or_backoff(self, entry: _Identity, delay: float) -> None:
        """Back off after a failure, but wake when the current certificate expires meanwhile,
        to say so (`can_serve` turns False: its workloads become Unhealthy) and to retry."""
        expiry = certs.not_after(entry.leaf) if entry.leaf is not None else 0.0
        left = expiry - self._clock()
        if 0 < left < delay:
            await self._sleep_or_wake(entry, left)
            if self._clock() >= expiry:
                log.warning("identity.expired", identity=entry.ident.uri)
                self._bump()
            return
        await self._sleep_or_wake(entry, delay)

    async def _sleep_or_wake(self, entry: _Identity, delay: float) -> None:
        if delay > 0:
            with trio.move_on_after(delay):
                await entry.wake.wait()
        entry.wake = trio.Event()

    async def _request(self, entry: _Identity) -> None:
        ident = entry.ident
        key = entry.key
        if key is None:
            key = certs.new_key()
        request_id = secrets.token_hex(8)
        doc = {
            "v": 1,
            "node": self.node,
            "identity": ident.uri,
            "csr": certs.build_csr(key, ident),
            "request": request_id,
        }
        csr_key, cert_key = keys.csr(self.node, ident.key), keys.cert(self.node, ident.key)
        try:
            revision = await self.store.put(csr_key, codec.encode(doc), lease=self._lease())
            with trio.fail_after(self._request_timeout):
                answer = await self._await_answer(cert_key, request_id, revision)
        except trio.TooSlowError:
            raise RequestFailed(f"no answer from the CA within {self._request_timeout}s") from None
        except StoreError as exc:
            raise RequestFailed(f"store: {exc}") from None
        if "error" in answer:
            raise RequestFailed(f"the CA rejected the request: {answer['error']}")
        chain = self._check_answer(answer, key, ident, cert_key)
        first = entry.leaf is None
        entry.key, entry.chain = key, chain
        entry.server_ctx = entry.client_ctx = None
        entry.failures, entry.last_error = 0, None
        entry.renewals += 0 if first else 1
        self._persist(entry)
        leaf = chain[0]
        log.info(
            "identity.issued",
            identity=ident.uri,
            serial=certs.serial_hex(leaf.serial_number),
            not_after=leaf.not_valid_after_utc.isoformat(),
            renewal=not first,
        )
        self._bump()

    async def _await_answer(self, cert_key: str, request_id: str, revision: int) -> dict[str, Any]:
        async with self.store.watch(cert_key, start_revision=revision + 1) as events:
            async for batch in events:
                for ev in batch:
                    if ev.type != "put" or ev.kv.key != cert_key:
                        continue
                    try:
                        answer = codec.decode(ev.kv)
                    except codec.DecodeError as exc:
                        log.warning("identity.bad_answer", key=cert_key, error=str(exc))
                        continue
                    if isinstance(answer, dict) and answer.get("request") == request_id:
                        return answer
        raise RequestFailed(f"the watch on {cert_key} ended without an answer")

    def _check_answer(
        self,
        answer: dict[str, Any],
        key: ec.EllipticCurvePrivateKey,
        ident: certs.SpiffeId,
        at: str,
    ) -> list[x509.Certificate]:
        try:
            chain = certs.load_certs(str(answer.get("chain", "")).encode(), at)
            leaf = chain[0]
            if leaf.public_key() != key.public_key():
                raise certs.CertError("the certificate is not for our key")
            got = certs.spiffe_id_of(leaf, self.trust_domain)
            if got != ident:
                raise certs.CertError(f"the certificate names {got.uri}, not {ident.uri}")
            if self._roots:
                certs.verify_svid(
                    chain, self._roots, trust_domain=self.trust_domain, now=self._clock(), where=at
                )
        except certs.CertError as exc:
            raise RequestFailed(f"unusable answer at {at}: {exc}") from None
        return chain

    def _chain_problem(self, chain: list[x509.Certificate]) -> str | None:
        """Why `chain` does not validate against the bundle now (expired, foreign root, …)."""
        try:
            certs.verify_svid(
                chain, self._roots, trust_domain=self.trust_domain, now=self._clock(), where="chain"
            )
        except certs.CertError as exc:
            return str(exc)
        return None

    # -- readiness and contexts ---------------------------------------------------------------

    def _unavailable(self, identity: str) -> str | None:
        """Why `identity` cannot be served now, or None when it can."""
        entry = self._identities.get(identity)
        if entry is None:
            return "not ensured on this node"
        leaf = entry.leaf
        if leaf is None or entry.key is None:
            return entry.last_error or "no certificate yet"
        if self._clock() >= certs.not_after(leaf):
            return f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}"
        if not self._roots:
            return "no trust bundle yet"
        return None

    def _ready(self, identity: str) -> _Identity:
        why = self._unavailable(identity)
        if why is not None:
            raise IdentityUnavailable(f"{identity}: {why}")
        return self._identities[identity]

    def _state(self, entry: _Identity) -> str:
        why = self._unavailable(entry.ident.uri)
        if entry.leaf is None:
            return "pending"
        if why is not None and self._clock() >= certs.not_after(entry.leaf):
            return "expired"
        if entry.requesting or entry.failures or self._wants(entry) is not None:
            return "renewing"
        return "valid"

    def _context(self, entry: _Identity, *, server: bool) -> ssl.SSLContext:
        assert entry.key is not None
        return mtls.mtls_context(
            certs.cert_pem(entry.chain), certs.key_pem(entry.key), self._bundle_pem, server=server
        )

    def _bump(self) -> None:
        progress, self._progress = self._progress, trio.Event()
        progress.set()

    # -- the trust bundle and the CRL ---------------------------------------------------------

    async def _watch_ca(self) -> None:
        backoff = self._backoff_initial
        revision = 0
        while True:
            try:
                if revision == 0:
                    kvs, revision = await self.store.range(CA_PREFIX)
                    for kv in kvs:
                        self._apply_ca(kv)
                async with self.store.watch(CA_PREFIX, start_revision=revision + 1) as events:
                    backoff = self._backoff_initial
                    async for batch in events:
                        for ev in batch:
                            revision = max(revision, ev.kv.mod_revision)
                            if ev.type == "put":
                                self._apply_ca(ev.kv)
            except CompactedError:
                revision = 0
            except StoreError as exc:
                log.warning("identity.ca_watch_failed", error=str(exc), retry_in=backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    def _apply_ca(self, kv: KeyValue) -> None:
        try:
            doc = codec.decode(kv)
            if not isinstance(doc, dict) or doc.get("v") != 1:
                raise certs.CertError("not a version 1 document")
            if kv.key == keys.CA_BUNDLE:
                self._set_bundle(doc)
            elif kv.key == keys.CA_CRL:
                self._set_crl(doc)
            else:
                return
        except (codec.DecodeError, certs.CertError) as exc:
            log.warning("identity.bad_ca_document", key=kv.key, error=str(exc))
            self._rejected_ca_documents += 1
            self._bump()
            return
        self._save_cache(BUNDLE_CACHE if kv.key == keys.CA_BUNDLE else CRL_CACHE, doc)

    def _set_bundle(self, doc: dict[str, Any]) -> None:
        if doc.get("trust_domain") != self.trust_domain:
            raise certs.CertError(
                f"bundle of trust domain {doc.get('trust_domain')!r}, ours is {self.trust_domain!r}"
            )
        pems = doc.get("roots")
        if not isinstance(pems, list) or not pems:
            raise certs.CertError("the bundle has no roots")
        roots = [certs.load_certs(str(p).encode(), keys.CA_BUNDLE, limit=1)[0] for p in pems]
        if roots == self._roots:
            return
        self._roots = roots
        self._bundle_pem = certs.cert_pem(roots).decode()
        for entry in self._identities.values():
            entry.server_ctx = entry.client_ctx = None
            if entry.chain and self._chain_problem(entry.chain) is not None:
                entry.wake.set()
        self._recompute_revoked()
        log.info("identity.bundle", roots=len(roots))
        self._bump()

    def _set_crl(self, doc: dict[str, Any]) -> None:
        self._crl_doc = doc
        self._recompute_revoked(strict=True)

    def _recompute_revoked(self, *, strict: bool = False) -> None:
        doc = self._crl_doc
        if doc is None or not self._roots:
            return
        try:
            chain_pem = str(doc.get("issuer_chain") or "")
            chain = certs.load_certs(chain_pem.encode(), keys.CA_CRL) if chain_pem else []
            revoked = certs.verify_crl(
                doc.get("crl"),  # type: ignore[arg-type]
                chain,
                self._roots,
                now=self._clock(),
            )
        except certs.CertError as exc:
            if strict:
                raise
            log.warning("identity.bad_crl", error=str(exc))
            return
        if revoked == self._revoked:
            return
        self._revoked = revoked
        for entry in self._identities.values():
            if entry.leaf is not None and entry.leaf.serial_number in revoked:
                entry.wake.set()
        log.info("identity.crl", revoked=len(revoked))
        self._bump()

    # -- persistence --------------------------------------------------------------------------

    def _identity_dir(self, ident: certs.SpiffeId) -> Path:
        assert self._state_dir is not None
        return self._state_dir / ident.namespace / ident.service_account

    def _persist(self, entry: _Identity) -> None:
        if self._state_dir is None or entry.key is None:
            return
        d = self._identity_dir(entry.ident)
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            mtls.write_private(d / "key.pem", certs.key_pem(entry.key))
            mtls.write_private(d / "chain.pem", certs.cert_pem(entry.chain))
        except OSError as exc:
            log.warning("identity.persist_failed", identity=entry.ident.uri, error=str(exc))

    def _load_persisted(self, entry: _Identity) -> None:
        if self._state_dir is None:
            return
        d = self._identity_dir(entry.ident)
        try:
            key = certs.load_key((d / "key.pem").read_bytes(), str(d / "key.pem"))
        except FileNotFoundError:
            return
        except (OSError, certs.CertError) as exc:
            log.warning("identity.cache_unusable", identity=entry.ident.uri, error=str(exc))
            return
        entry.key = key
        try:
            chain = certs.load_certs((d / "chain.pem").read_bytes(), str(d / "chain.pem"))
            if chain[0].public_key() != key.public_key():
                raise certs.CertError("the cached certificate is not for the cached key")
            if certs.spiffe_id_of(chain[0], self.trust_domain) != entry.ident:
                raise certs.CertError("the cached certificate names another identity")
        except FileNotFoundError:
            return
        except (OSError, certs.CertError) as exc:
            log.warning("identity.cache_unusable", identity=entry.ident.uri, error=str(exc))
            return
        if self._clock() < certs.not_after(chain[0]):
            entry.chain = chain

    def _save_cache(self, name: str, doc: dict[str, Any]) -> None:
        if self._state_dir is None:
            return
        try:
            self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            mtls.write_private(self._state_dir / name, codec.encode(doc))
        except OSError as exc:
            log.warning("identity.persist_failed", file=name, error=str(exc))

    def _load_ca_cache(self) -> None:
        if self._state_dir is None:
            return
        for name, key in ((BUNDLE_CACHE, keys.CA_BUNDLE), (CRL_CACHE, keys.CA_CRL)):
            path = self._state_dir / name
            try:
                value = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("identity.cache_unusable", file=str(path), error=str(exc))
                continue
            self._apply_ca(KeyValue(key, value, 0, 0, 0))


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).isoformat()
