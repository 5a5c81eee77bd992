"""What enrollment does to a pod's network namespace, behind one small interface.

`PodPlumbing` is every step of enrollment that needs a real netns (and root): open the pod's
netns, bind the agent's capture listeners and its DNS proxy there, install, remove and read back
the redirection rules. `InpodPlumbing` is the real one, over `nodeagent.inpod`. The enroller's
all-or-nothing logic is tested without root against a fault-injecting fake of this interface
(`tests/agent/fake_plumbing.py`), and the real one by the sandbox tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from nodeagent.dns import DnsProxy
from nodeagent.inpod import (
    Netns,
    PodListeners,
    RedirectionSpec,
    aapply_redirection,
    acheck_redirection,
    aremove_redirection,
    bind_listeners,
)
from nodeagent.snapshot import Snapshot


class PodPlumbing(Protocol):
    def open_netns(self, path: str) -> Netns:
        """Open the pod's netns (InpodError when it is not one); the caller closes it."""

    def bind_listeners(self, netns: Netns) -> PodListeners:
        """Bind 15001/15006/15008 in `netns`, all three or none (InpodError)."""

    def dns_proxy(
        self,
        netns: Netns,
        *,
        namespace: str,
        snapshot: Callable[[], Snapshot],
        upstreams: Sequence[str] | None,
        pod: str,
    ) -> DnsProxy:
        """The pod's DNS proxy (15053), not yet bound: `run` binds it."""

    async def apply_redirection(self, netns: Netns, spec: RedirectionSpec) -> None:
        """Install (or repair) the pod's rules, all or none (InpodError)."""

    async def remove_redirection(self, netns: Netns) -> None:
        """Remove every rule and route we install; a no-op when there are none."""

    async def check_redirection(self, netns: Netns, spec: RedirectionSpec) -> list[str]:
        """Readable differences from what `spec` wants; empty when all is in place."""


class InpodPlumbing:
    """The real pod plumbing: `nodeagent.inpod` in the pod's own netns."""

    def open_netns(self, path: str) -> Netns:
        return Netns.open(path)

    def bind_listeners(self, netns: Netns) -> PodListeners:
        return bind_listeners(netns)

    def dns_proxy(
        self,
        netns: Netns,
        *,
        namespace: str,
        snapshot: Callable[[], Snapshot],
        upstreams: Sequence[str] | None,
        pod: str,
    ) -> DnsProxy:
        return DnsProxy(netns, namespace=namespace, snapshot=snapshot, upstreams=upstreams, pod=pod)

    async def apply_redirection(self, netns: Netns, spec: RedirectionSpec) -> None:
        await aapply_redirection(netns, spec)

    async def remove_redirection(self, netns: Netns) -> None:
        await aremove_redirection(netns)

    async def check_redirection(self, netns: Netns, spec: RedirectionSpec) -> list[str]:
        return await acheck_redirection(netns, spec)
