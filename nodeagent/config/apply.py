"""Write a validated batch to the store in ONE transaction (all or nothing), delete documents,
and read them back. The only part of the config package that does I/O.

Services get their virtual IP here: a Service without clusterIP takes the lowest free address of
the VIP range, an explicit clusterIP is claimed as given, a re-applied Service keeps its VIP
(clusterIP is immutable, as in Kubernetes), a headless one (`None`) gets none. The claim is the
key `keys.vip(ip)`, written in the same transaction under `Compare(key, 0)`, and every document
key is compared with the revision it was read at: two concurrent applies can never both win the
same VIP or overwrite each other's reads; the loser re-reads and retries (bounded).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from nodeagent.config.batch import Document, check_references, dedupe
from nodeagent.config.errors import ConfigError, ConfigInvalid, FieldError
from nodeagent.config.kinds import KINDS, Kind
from nodeagent.log import get_logger
from nodeagent.store import keys
from nodeagent.store.base import Compare, Delete, KeyValue, Op, Put, Store, StoreError
from nodeagent.store.codec import DecodeError, decode, encode

DEFAULT_VIP_RANGE = "10.96.0.0/16"
VIP_RANGE_ENV = "MESH_VIP_RANGE"
MAX_ATTEMPTS = 8

log = get_logger("config.apply")

Action = Literal["created", "configured", "unchanged", "deleted"]


class ConflictError(StoreError):
    """The store kept changing under a batch; nothing was written."""


def parse_vip_range(text: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ValueError(f"VIP range {text!r} is not an IPv4 network: {exc}") from None
    if net.num_addresses < 4:
        raise ValueError(f"VIP range {text} is too small (need at least a /30)")
    return net


@dataclass(frozen=True, slots=True)
class Outcome:
    doc: Document
    action: Action


@dataclass(frozen=True, slots=True)
class ApplyResult:
    outcomes: list[Outcome]
    revision: int


def _owner(doc: Document) -> dict[str, str]:
    return {"namespace": doc.namespace, "name": doc.name}


def _decode(kv: KeyValue) -> Any:
    try:
        return decode(kv)
    except DecodeError:
        return None


def _error(doc: Document, path: str, message: str) -> ConfigError:
    return ConfigError(doc.source, doc.ref, FieldError(path, message))


async def _stored_rules(store: Store) -> dict[str, dict[str, Any]]:
    kvs, _ = await store.range(KINDS["DestinationRule"].config_prefix)
    out: dict[str, dict[str, Any]] = {}
    for kv in kvs:
        body = _decode(kv)
        if isinstance(body, dict) and isinstance(body.get("spec"), dict):
            out[kv.key] = body
    return out


def _free_vips(net: ipaddress.IPv4Network, taken: set[str]) -> Iterator[str]:
    # The range's first host is the Kubernetes API service (kubernetes.default): never hand it out.
    for host in itertools.islice(net.hosts(), 1, None):
        text = str(host)
        if text not in taken:
            yield text


async def _plan(
    store: Store, docs: list[Document], vip_range: ipaddress.IPv4Network
) -> tuple[list[Compare], list[Op], list[Outcome], list[ConfigError]]:
    compares: list[Compare] = []
    ops: list[Op] = []
    outcomes: list[Outcome] = []
    errors: list[ConfigError] = []
    claims_kvs, _ = await store.range(keys.VIPS)
    claims = {kv.key[len(keys.VIPS) :]: kv for kv in claims_kvs}
    taken = set(claims)
    # explicit addresses later in the batch must not be handed out to earlier Services
    taken.update(
        d.body["spec"]["clusterIP"]
        for d in docs
        if d.kind == "Service" and d.body["spec"].get("clusterIP")
    )
    free = _free_vips(vip_range, taken)
    for doc in docs:
        current = await store.get(doc.key)
        compares.append(Compare(doc.key, current.mod_revision if current else 0))
        body = doc.body
        if doc.kind == "Service":
            old = _decode(current) if current else None
            old_ip = old.get("spec", {}).get("clusterIP") if isinstance(old, dict) else None
            want = body["spec"].get("clusterIP")
            if old_ip is not None and want is not None and want != old_ip:
                errors.append(
                    _error(doc, "spec.clusterIP", f"field is immutable (is {old_ip}, not {want})")
                )
                continue
            ip = want or old_ip
            if ip is None:
                ip = next(free, None)
                if ip is None:
                    errors.append(_error(doc, "spec.clusterIP", f"no free VIP left in {vip_range}"))
                    continue
                taken.add(ip)
            if ip != "None":
                claim = claims.get(ip)
                owner = _decode(claim) if claim else None
                if claim is None:
                    compares.append(Compare(keys.vip(ip), 0))
                    ops.append(Put(keys.vip(ip), encode(_owner(doc))))
                    claims[ip] = KeyValue(keys.vip(ip), b"", 0, 0, 0)
                elif owner != _owner(doc):
                    if owner is None and claim.mod_revision == 0:
                        who = "another Service in this batch"
                    elif isinstance(owner, dict):
                        who = f"Service {owner.get('namespace')}/{owner.get('name')}"
                    else:
                        who = "another owner"
                    errors.append(
                        _error(doc, "spec.clusterIP", f"{ip} is already allocated to {who}")
                    )
                    continue
                else:
                    compares.append(Compare(keys.vip(ip), claim.mod_revision))
            body = {**body, "spec": {**body["spec"], "clusterIP": ip}}
            doc = replace(doc, body=body)
        value = encode(body)
        if current is not None and current.value == value:
            outcomes.append(Outcome(doc, "unchanged"))
            continue
        ops.append(Put(doc.key, value))
        outcomes.append(Outcome(doc, "configured" if current else "created"))
    return compares, ops, outcomes, errors


async def apply_documents(
    store: Store,
    docs: Sequence[Document],
    *,
    vip_range: ipaddress.IPv4Network | None = None,
    max_attempts: int = MAX_ATTEMPTS,
) -> ApplyResult:
    """Apply `docs` atomically. Raises ConfigInvalid (nothing written) for reference errors,
    VIP conflicts or immutable fields, ConflictError if the store kept changing."""
    net = vip_range or parse_vip_range(DEFAULT_VIP_RANGE)
    batch = dedupe(docs)
    for attempt in range(1, max_attempts + 1):
        errors = check_references(batch, await _stored_rules(store))
        compares, ops, outcomes, plan_errors = await _plan(store, batch, net)
        errors.extend(plan_errors)
        if errors:
            log.info("apply.failed", documents=len(batch), errors=len(errors))
            raise ConfigInvalid(errors)
        result = await store.txn(compares, ops)
        if result.succeeded:
            log.info(
                "apply.complete",
                documents=len(batch),
                written=len(ops),
                revision=result.revision,
                attempt=attempt,
            )
            return ApplyResult(outcomes, result.revision)
        log.info("apply.conflict", attempt=attempt)
    raise ConflictError(
        f"apply of {len(batch)} documents: the store changed under it {max_attempts} times; "
        "nothing was written, try again"
    )


@dataclass(frozen=True, slots=True)
class Target:
    """What to delete: a kind and name in a namespace."""

    kind: Kind
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        return f"{self.kind.name} {self.namespace}/{self.name}"


async def find(
    store: Store, kind: Kind, namespace: str | None, name: str | None = None
) -> list[tuple[KeyValue, dict[str, Any]]]:
    """Stored documents of `kind` (all namespaces when `namespace` is None), sorted."""
    if kind.name == "Workload":
        kvs, _ = await store.range(keys.WORKLOADS)
    elif namespace is not None and name is not None:
        kv = await store.get(keys.config(kind.name, namespace, name))
        kvs = [kv] if kv is not None else []
    elif namespace is not None:
        kvs, _ = await store.range(f"{kind.config_prefix}{namespace}/")
    else:
        kvs, _ = await store.range(kind.config_prefix)
    out: list[tuple[KeyValue, dict[str, Any]]] = []
    for kv in kvs:
        body = _decode(kv)
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            log.warning("get.undecodable", key=kv.key)
            continue
        meta = body["metadata"]
        if namespace is not None and meta.get("namespace") != namespace:
            continue
        if name is not None and meta.get("name") != name:
            continue
        out.append((kv, body))
    out.sort(
        key=lambda item: (
            item[1]["metadata"].get("namespace", ""),
            item[1]["metadata"].get("name", ""),
        )
    )
    return out


async def delete_documents(
    store: Store,
    targets: Sequence[Target],
    *,
    ignore_not_found: bool = False,
    max_attempts: int = MAX_ATTEMPTS,
) -> tuple[list[str], list[str]]:
    """Delete `targets` in one transaction, freeing Service VIP claims.

    Returns (deleted refs, not-found refs). A missing target is an error (ConfigInvalid-like
    LookupError, nothing deleted) unless `ignore_not_found`.
    """
    for _attempt in range(max_attempts):
        compares: list[Compare] = []
        ops: list[Op] = []
        deleted: list[str] = []
        missing: list[str] = []
        seen: set[str] = set()
        for target in targets:
            found = await find(store, target.kind, target.namespace, target.name)
            if not found:
                missing.append(target.ref)
                continue
            for kv, body in found:
                if kv.key in seen:
                    continue
                seen.add(kv.key)
                compares.append(Compare(kv.key, kv.mod_revision))
                ops.append(Delete(kv.key))
                deleted.append(target.ref)
                ip = (
                    body.get("spec", {}).get("clusterIP") if target.kind.name == "Service" else None
                )
                if isinstance(ip, str) and ip != "None":
                    claim = await store.get(keys.vip(ip))
                    if claim is not None and _decode(claim) == {
                        "namespace": target.namespace,
                        "name": target.name,
                    }:
                        compares.append(Compare(claim.key, claim.mod_revision))
                        ops.append(Delete(claim.key))
        if missing and not ignore_not_found:
            raise LookupError("; ".join(f"{ref} not found" for ref in missing))
        if not ops:
            return deleted, missing
        result = await store.txn(compares, ops)
        if result.succeeded:
            log.info("delete.complete", deleted=len(deleted), revision=result.revision)
            return deleted, missing
    raise ConflictError(
        f"delete of {len(targets)} documents: the store changed under it {max_attempts} times; "
        "nothing was deleted, try again"
    )
