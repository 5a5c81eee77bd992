"""Leader election on a coordination.k8s.io/v1 Lease, so several kube-sync replicas can run.

The protocol is client-go's: the holder renews `spec.renewTime` every `retry_period`; a
candidate takes the Lease over when `renewTime + leaseDurationSeconds` has passed, with a PUT
carrying the resourceVersion it read (a 409 Conflict means another candidate won the race).
A leader that cannot renew within `renew_deadline` stops leading (its work is cancelled)
before the Lease can expire for others; a leader that stops cleanly releases the Lease
(empty holder), so a successor takes over at its next try instead of after the duration.

`lease_action` is the pure part: given the Lease as read, what this candidate does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import trio

from nodeagent.kube.client import ApiStatus, KubeClient, KubeError
from nodeagent.kube.resources import LEASE
from nodeagent.log import get_logger

log = get_logger("kube.leader")

Clock = Callable[[], datetime]
LeaseAction = Literal["create", "renew", "takeover", "wait"]


def format_time(t: datetime) -> str:
    """MicroTime as the API server writes it: RFC 3339 with microseconds, UTC."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def lease_action(lease: dict[str, Any] | None, identity: str, now: datetime) -> LeaseAction:
    if lease is None:
        return "create"
    spec = lease.get("spec") if isinstance(lease.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return "renew"
    if not holder:
        return "takeover"
    renewed = parse_time(spec.get("renewTime")) or parse_time(spec.get("acquireTime"))
    duration = spec.get("leaseDurationSeconds")
    if renewed is None or not isinstance(duration, int):
        return "takeover"  # a Lease nobody can be holding validly
    if now >= renewed + timedelta(seconds=duration):
        return "takeover"
    return "wait"


def _now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        client: KubeClient,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: int = 15,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Clock = _now,
    ) -> None:
        if not retry_period < renew_deadline < lease_duration:
            raise ValueError("need retry_period < renew_deadline < lease_duration")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self.leading = False
        self.transitions_seen = 0

    @property
    def _path(self) -> str:
        return f"{LEASE.collection_path(self.namespace)}/{self.name}"

    async def _get(self) -> dict[str, Any] | None:
        try:
            return await self.client.request("GET", self._path)
        except ApiStatus as exc:
            if exc.code == 404:
                return None
            raise

    def _spec(self, previous: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        old = (previous or {}).get("spec") or {}
        same_holder = old.get("holderIdentity") == self.identity
        transitions = int(old.get("leaseTransitions") or 0)
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_duration,
            "acquireTime": old.get("acquireTime") if same_holder else format_time(now),
            "renewTime": format_time(now),
            "leaseTransitions": transitions if same_holder or previous is None else transitions + 1,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One round: True when this candidate holds the Lease afterwards."""
        now = self.clock()
        lease = await self._get()
        decision = lease_action(lease, self.identity, now)
        if decision == "wait":
            return False
        body: dict[str, Any] = {
            "apiVersion": LEASE.api_version,
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(lease, now),
        }
        try:
            if decision == "create":
                await self.client.request("POST", LEASE.collection_path(self.namespace), body)
            else:
                assert lease is not None
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]
                await self.client.request("PUT", self._path, body)
        except ApiStatus as exc:
            if exc.code in (409, 422) or exc.reason == "AlreadyExists":
                return False  # another candidate wrote first
            raise
        if decision != "renew":
            log.info(
                "kube.leader.acquired", lease=f"{self.namespace}/{self.name}", me=self.identity
            )
        return True

    async def release(self) -> None:
        """Give the Lease up (best effort) so a successor does not wait for it to expire."""
        lease = await self._get()
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        spec = dict(lease["spec"])
        spec["holderIdentity"] = ""
        spec["leaseDurationSeconds"] = 1
        body = {**lease, "spec": spec}
        await self.client.request("PUT", self._path, body)
        log.info("kube.leader.released", lease=f"{self.namespace}/{self.name}", me=self.identity)

    async def _renew_until_lost(self) -> None:
        last_ok = trio.current_time()
        while True:
            await trio.sleep(self.retry_period)
            try:
                with trio.move_on_after(self.renew_deadline):
                    if await self.try_acquire_or_renew():
                        last_ok = trio.current_time()
                        continue
                    log.warning("kube.leader.lost", me=self.identity, why="another holder")
                    return
            except KubeError as exc:
                log.warning("kube.leader.renew_failed", me=self.identity, error=str(exc))
            if trio.current_time() - last_ok >= self.renew_deadline:
                log.warning("kube.leader.lost", me=self.identity, why="renew deadline passed")
                return

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Forever: wait to become leader, run `lead()` while leading, cancel it when not."""
        while True:
            try:
                acquired = await self.try_acquire_or_renew()
            except KubeError as exc:
                log.warning("kube.leader.acquire_failed", me=self.identity, error=str(exc))
                acquired = False
            if not acquired:
                await trio.sleep(self.retry_period)
                continue
            self.leading = True
            self.transitions_seen += 1
            try:
                async with trio.open_nursery() as nursery:

                    async def leading() -> None:
                        await lead()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(leading)
                    await self._renew_until_lost()
                    nursery.cancel_scope.cancel()
            finally:
                self.leading = False
                with trio.CancelScope(shield=True), trio.move_on_after(self.retry_period):
                    try:
                        await self.release()
                    except KubeError as exc:
                        log.warning("kube.leader.release_failed", me=self.identity, error=str(exc))
