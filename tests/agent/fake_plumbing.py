"""A fault-injecting fake of everything enrollment touches, for the all-or-nothing tests.

- `FakePlumbing` implements `PodPlumbing` without root: a "pod netns" is a handle on the test's
  own namespace whose sockets are plain loopback sockets (real ones: the real PodProxy and
  DnsProxy serve them), and "rules" are a set of applied netns names.
- `FaultyStore` is the real memory store, with faults on Workload writes.
- `FakeIdentities` records ensure/release (and answers `can_serve` as told).
- `FaultyState` is the real on-disk state, with a fault on `save`.

`Faults` arms one step with a mode: "raise" fails the step (a store write fails *after* it
reached the store: the ambiguous case), "cancel" lets the step take effect and then cancels
the caller's scope (an async step sees the Cancelled inside itself, a sync one at the caller's
next checkpoint). The real pieces are covered by the sandbox tests (tests/integration/).
"""

from __future__ import annotations

import os
import socket as _socket
import ssl
from collections.abc import Callable, Sequence

import trio

from nodeagent.agent.state import AgentState
from nodeagent.cni.protocol import CniRequest, Command, PodRef
from nodeagent.dns import DnsProxy
from nodeagent.dns.errors import ProxyError
from nodeagent.identity.api import IdentityUnavailable
from nodeagent.inpod import Netns, NetnsError, PodListeners, RedirectionError, RedirectionSpec
from nodeagent.inpod import bind_listeners as real_bind_listeners
from nodeagent.snapshot import Snapshot
from nodeagent.store import keys
from nodeagent.store.base import StoreError
from nodeagent.store.memory import MemoryStore

NODE = "n1"


def request(command: Command = Command.ADD, uid: str = "u1", container: str = "c1") -> CniRequest:
    """A CNI call for pod default/web (uid `uid`), as the plugin forwards it."""
    return CniRequest(
        command=command,
        container_id=container,
        netns=f"/run/netns/{uid}",
        ifname="eth0",
        pod=PodRef("default", "web", uid),
        prev_result={"ips": [{"address": "10.201.1.5/24"}]},
    )


class Faults:
    def __init__(self) -> None:
        self.step: str | None = None
        self.mode: str | None = None
        self.scope: trio.CancelScope | None = None
        self.steps: list[str] = []  # every step reached, in order

    def arm(self, step: str, mode: str, scope: trio.CancelScope | None = None) -> None:
        assert mode in ("raise", "cancel")
        self.step, self.mode, self.scope = step, mode, scope

    def _fires(self, step: str, mode: str) -> bool:
        if self.step != step or self.mode != mode:
            return False
        self.step = None  # once
        return True

    def check_raise(self, step: str, error: Callable[[], BaseException]) -> None:
        self.steps.append(step)
        if self._fires(step, "raise"):
            raise error()

    def check_cancel(self, step: str) -> None:
        """After the step took effect: cancel the caller (delivered at its next checkpoint)."""
        if self._fires(step, "cancel"):
            assert self.scope is not None, "arm(..., 'cancel', scope)"
            self.scope.cancel()

    async def acheck_cancel(self, step: str) -> None:
        if self.step == step and self.mode == "cancel":
            self.check_cancel(step)
            await trio.lowlevel.checkpoint()  # raises Cancelled here, inside the step


class LocalNetns(Netns):
    """The test's own namespace standing in for a pod's: sockets are created here, unmarked,
    and every one is remembered so a test can check that none is left open."""

    def __init__(self, path: str, sockets: list[_socket.socket]) -> None:
        super().__init__(os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC), path, path)
        self._sockets = sockets

    def path_matches(self) -> bool:
        return not self.closed

    def socket(
        self,
        family: int = _socket.AF_INET,
        type: int = _socket.SOCK_STREAM,
        *,
        mark: int = 0,
        transparent: bool = False,
    ) -> _socket.socket:
        if self.closed:
            raise NetnsError(f"netns {self.name}: handle is closed")
        sock = _socket.socket(family, type | _socket.SOCK_NONBLOCK | _socket.SOCK_CLOEXEC)
        self._sockets.append(sock)
        return sock


class _FaultyDns(DnsProxy):
    faults: Faults

    def _bind(self, kind: int) -> trio.socket.SocketType:
        self.faults.check_raise("bind_dns", lambda: ProxyError(f"bind 15053 in {self.pod}: boom"))
        sock = super()._bind(kind)
        if kind == _socket.SOCK_STREAM:
            self.faults.check_cancel("bind_dns")
        return sock


class FakePlumbing:
    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.netns: list[LocalNetns] = []
        self.sockets: list[_socket.socket] = []
        self.rules: set[str] = set()  # names of the netns whose redirection is installed
        self.missing: set[str] = set()  # netns paths that do not exist
        self.apply_time = 0.0  # how long applying rules takes (a real apply: a thread hop)

    # -- what is left ---------------------------------------------------------------------

    def open_sockets(self) -> list[_socket.socket]:
        return [s for s in self.sockets if s.fileno() != -1]

    def open_netns_handles(self) -> list[str]:
        return [n.name for n in self.netns if not n.closed]

    # -- PodPlumbing ------------------------------------------------------------------------

    def open_netns(self, path: str) -> Netns:
        if path in self.missing:
            raise NetnsError(f"enter netns {path}: No such file or directory")
        self.faults.check_raise("open_netns", lambda: NetnsError(f"enter netns {path}: boom"))
        ns = LocalNetns(path, self.sockets)
        self.netns.append(ns)
        self.faults.check_cancel("open_netns")
        return ns

    def bind_listeners(self, netns: Netns) -> PodListeners:
        self.faults.check_raise(
            "bind_listeners", lambda: NetnsError(f"bind 15001 in netns {netns.name}: boom")
        )
        listeners = real_bind_listeners(netns, host="127.0.0.1", mark=0, ports=(0, 0, 0))
        self.faults.check_cancel("bind_listeners")
        return listeners

    def dns_proxy(
        self,
        netns: Netns,
        *,
        namespace: str,
        snapshot: Callable[[], Snapshot],
        upstreams: Sequence[str] | None,
        pod: str,
    ) -> DnsProxy:
        self.faults.check_raise("make_dns", lambda: ValueError("upstream DNS server 'x': boom"))
        dns = _FaultyDns(
            netns, namespace=namespace, snapshot=snapshot, upstreams=[], pod=pod, port=0, mark=0
        )
        dns.faults = self.faults
        self.faults.check_cancel("make_dns")
        return dns

    async def apply_redirection(self, netns: Netns, spec: RedirectionSpec) -> None:
        await trio.sleep(self.apply_time)
        self.faults.check_raise(
            "apply_redirection", lambda: RedirectionError(f"apply in {netns.name}: boom")
        )
        self.rules.add(netns.name)
        await self.faults.acheck_cancel("apply_redirection")

    async def remove_redirection(self, netns: Netns) -> None:
        await trio.lowlevel.checkpoint()
        self.faults.check_raise(
            "remove_redirection", lambda: RedirectionError(f"remove in {netns.name}: boom")
        )
        self.rules.discard(netns.name)
        await self.faults.acheck_cancel("remove_redirection")

    async def check_redirection(self, netns: Netns, spec: RedirectionSpec) -> list[str]:
        await trio.lowlevel.checkpoint()
        return [] if netns.name in self.rules else ["no rules"]


class FaultyStore(MemoryStore):
    """The memory store; Workload puts ("register") and deletes ("unregister") can fail."""

    def __init__(self, faults: Faults) -> None:
        super().__init__()
        self.faults = faults

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        if not key.startswith(keys.WORKLOADS):
            return await super().put(key, value, lease=lease)
        revision = await super().put(key, value, lease=lease)
        # The write reached the store, but the caller hears a failure (a timed-out answer).
        self.faults.check_raise("register", lambda: StoreError(f"{self.url}: put {key}: boom"))
        await self.faults.acheck_cancel("register")
        return revision

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        if not key.startswith(keys.WORKLOADS):
            return await super().delete(key, prefix=prefix)
        self.faults.check_raise("unregister", lambda: StoreError(f"{self.url}: delete: boom"))
        n = await super().delete(key, prefix=prefix)
        await self.faults.acheck_cancel("unregister")
        return n


class FaultyState(AgentState):
    faults: Faults

    def save(self) -> None:
        self.faults.check_raise("save_state", lambda: OSError(28, "No space left on device"))
        super().save()
        self.faults.check_cancel("save_state")


class FakeIdentities:
    """An identity provider that holds certificates for the identities in `valid`."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self.ensured: set[str] = set()
        self.valid: set[str] = set()
        self._changed = trio.Event()

    def ensure(self, identity: str) -> None:
        self.faults.check_raise("ensure_identity", lambda: RuntimeError("ensure: boom"))
        self.ensured.add(identity)
        self.faults.check_cancel("ensure_identity")

    def release(self, identity: str) -> None:
        self.faults.check_raise("release_identity", lambda: RuntimeError("release: boom"))
        self.ensured.discard(identity)
        self.faults.check_cancel("release_identity")

    def can_serve(self, identity: str) -> bool:
        return identity in self.valid

    def set_valid(self, identity: str, valid: bool) -> None:
        (self.valid.add if valid else self.valid.discard)(identity)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_ready(self, identity: str, within: float) -> None:
        raise IdentityUnavailable(identity)

    def server_context(self, identity: str) -> ssl.SSLContext:
        raise IdentityUnavailable(identity)

    def client_context(self, identity: str) -> ssl.SSLContext:
        raise IdentityUnavailable(identity)

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def peer_identity(self, cert_der: bytes) -> str:
        raise IdentityUnavailable("no peers in this test")
