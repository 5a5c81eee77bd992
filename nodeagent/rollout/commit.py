"""Reading a rollout's documents, and committing a move as one store transaction.

`load` reads the Rollout, its status, VirtualService and DestinationRule; `commit` writes the
move's status together with the route change (and the analysed window) in one transaction that
compares the mod revision of every document it read: a concurrent change of any of them (a user
re-applying the VirtualService, `meshctl rollout pause` while the controller analyses) makes
it fail whole, and the caller reads again. A store outage raises StoreError before anything
is written: a rollout never lands half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nodeagent.config.kinds import KINDS
from nodeagent.rollout.analysis import Move
from nodeagent.rollout.model import Rollout, compile_rollout
from nodeagent.rollout.routes import RouteError, change
from nodeagent.rollout.status import Status, from_kv, status_key
from nodeagent.rollout.windows import Window, read_windows
from nodeagent.store import keys
from nodeagent.store.base import Compare, KeyValue, Op, Put, Store
from nodeagent.store.codec import DecodeError, decode, encode


class RolloutNotFound(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Loaded:
    rollout: Rollout
    revision: int  # the Rollout document's mod revision
    status: Status | None
    status_revision: int
    vs: KeyValue | None
    dr: KeyValue | None

    def vs_body(self) -> dict[str, Any]:
        return _body(
            self.vs, "VirtualService", self.rollout.namespace, self.rollout.virtual_service
        )

    def dr_body(self) -> dict[str, Any]:
        return _body(
            self.dr, "DestinationRule", self.rollout.namespace, self.rollout.destination_rule
        )


def _body(kv: KeyValue | None, kind: str, namespace: str, name: str) -> dict[str, Any]:
    if kv is None:
        raise RouteError(f"{kind} {namespace}/{name} does not exist")
    try:
        body = decode(kv)
    except DecodeError as exc:
        raise RouteError(f"{kind} {namespace}/{name}: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
        raise RouteError(f"{kind} {namespace}/{name} is not a document")
    return body


def rollout_key(namespace: str, name: str) -> str:
    return keys.config("Rollout", namespace, name)


def rollout_prefix() -> str:
    return KINDS["Rollout"].config_prefix


async def load_kv(store: Store, kv: KeyValue) -> Loaded:
    body = decode(kv)
    rollout = compile_rollout(body)
    status_kv = await store.get(status_key(rollout.namespace, rollout.name))
    vs = await store.get(keys.config("VirtualService", rollout.namespace, rollout.virtual_service))
    dr = await store.get(
        keys.config("DestinationRule", rollout.namespace, rollout.destination_rule)
    )
    return Loaded(
        rollout,
        kv.mod_revision,
        from_kv(status_kv) if status_kv is not None else None,
        status_kv.mod_revision if status_kv is not None else 0,
        vs,
        dr,
    )


async def load(store: Store, namespace: str, name: str) -> Loaded:
    kv = await store.get(rollout_key(namespace, name))
    if kv is None:
        raise RolloutNotFound(f"rollout {namespace}/{name} not found")
    return await load_kv(store, kv)


async def commit(
    store: Store,
    loaded: Loaded,
    move: Move,
    window: Window | None = None,
    *,
    fence: Compare | None = None,
) -> bool:
    """Write `move` (status + route change [+ window]) in one transaction; False on a conflict.

    `fence`: one more compare (the controller's leader key). Raises RouteError when the
    documents cannot take the change (nothing is written then)."""
    r = loaded.rollout
    compares = [Compare(status_key(r.namespace, r.name), loaded.status_revision)]
    if fence is not None:
        compares.append(fence)
    ops: list[Op] = []
    if move.route != "none":
        vs, dr = loaded.vs_body(), loaded.dr_body()
        new_vs, new_dr = change(loaded.rollout, move.route, move.status.weight, vs, dr)
        assert loaded.vs is not None  # vs_body() raised otherwise
        assert loaded.dr is not None
        compares.append(Compare(loaded.vs.key, loaded.vs.mod_revision))
        ops.append(_put(loaded.vs.key, new_vs))
        if new_dr is not None:
            compares.append(Compare(loaded.dr.key, loaded.dr.mod_revision))
            ops.append(_put(loaded.dr.key, new_dr))
    ops.append(move.status.put())
    if window is not None:
        r = loaded.rollout
        windows = await read_windows(store, r.namespace, r.name, r.host)
        compares.append(Compare(windows.put().key, windows.mod_revision))
        ops.append(windows.appended(window).put())
    result = await store.txn(compares, ops)
    return result.succeeded


def _put(key: str, body: dict[str, Any]) -> Put:
    return Put(key, encode(body))
