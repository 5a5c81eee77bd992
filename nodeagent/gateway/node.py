"""The ingress gateway as the node agent runs it (`nodeagent run --gateway`).

The gateway is a mesh workload of its own: `istio-system/istio-ingressgateway-<node>` with the
service account `istio-ingressgateway-service-account`, registered under the agent's node lease
(so the CA's node authorization signs its certificate) with no pod address (nothing dials it as
a pod). Its listeners live in the node's network namespace (the agent's own), and requests go
into the mesh through the same mTLS tunnel pods use, with the gateway's identity as the client
certificate and the endpoint workload's identity required from the server.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import trio

from nodeagent.authn import Authenticator
from nodeagent.balance import Registry
from nodeagent.config.kinds import WORKLOAD_API
from nodeagent.gateway.credentials import CredentialSource
from nodeagent.gateway.server import DEFAULT_LABELS, IngressGateway
from nodeagent.http import Limits, RequestLog
from nodeagent.identity.api import IdentityProvider
from nodeagent.inpod import Netns
from nodeagent.inpod.listeners import enable_request_migration
from nodeagent.log import get_logger
from nodeagent.proxy.connector import MeshConnector
from nodeagent.proxy.l7_guard import workload_guard
from nodeagent.snapshot import Snapshot, SnapshotSync, Workload
from nodeagent.store import codec, keys
from nodeagent.store.base import Store, StoreError
from nodeagent.telemetry.dataplane import Sinks, record_request
from nodeagent.tunnel import SessionCache, SourceInfo, TunnelPool

log = get_logger("gateway.node")

NAMESPACE = "istio-system"
SERVICE_ACCOUNT = "istio-ingressgateway-service-account"
REREGISTER_CHECK = 2.0  # seconds between checks that the registration's lease is current


def gateway_identity(trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/ns/{NAMESPACE}/sa/{SERVICE_ACCOUNT}"


def gateway_workload(node: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The Workload document the gateway registers for itself on `node`."""
    return {
        "apiVersion": WORKLOAD_API,
        "kind": "Workload",
        "metadata": {
            "name": f"istio-ingressgateway-{node}",
            "namespace": NAMESPACE,
            "uid": f"ingressgateway-{node}",
            "labels": {"app": "istio-ingressgateway", **labels},
            "annotations": {},
        },
        "spec": {"node": node, "addresses": [], "serviceAccount": SERVICE_ACCOUNT},
    }


class NodeGateway:
    """Registers the gateway workload, keeps its certificate, and serves `IngressGateway`."""

    def __init__(
        self,
        *,
        node: str,
        store: Store,
        lease: Callable[[], int],
        identities: IdentityProvider,
        sync: SnapshotSync,
        trust_domain: str = "cluster.local",
        labels: Mapping[str, str] = DEFAULT_LABELS,
        bind_host: str = "0.0.0.0",
        registry: Registry | None = None,
        sessions: SessionCache | None = None,
        on_request: Callable[[RequestLog], None] | None = None,
        telemetry: Sinks | None = None,
        limits: Limits | None = None,
        authenticator: Authenticator | None = None,
        credentials: CredentialSource | None = None,
        migrate_requests: bool = False,
    ) -> None:
        self.node = node
        # The agent's handover: connections queued on a closing listener move to the
        # successor's (net.ipv4.tcp_migrate_req in the node's netns, as in each pod's).
        self.migrate_requests = migrate_requests
        self.telemetry = telemetry
        self._sync = sync
        self._on_request = on_request
        self.store = store
        self.lease = lease
        self.identities = identities
        self.labels = dict(labels)
        self.identity = gateway_identity(trust_domain)
        self.document = gateway_workload(node, self.labels)
        self._registered_lease = 0
        source = SourceInfo(NAMESPACE, str(self.document["metadata"]["name"]), self.identity)
        # The agent's own netns is the node's: a plain socket there, no pod namespace involved.
        self._netns = Netns.open("/proc/self/ns/net")
        self.pool = TunnelPool(
            netns=self._netns,
            identities=identities,
            sessions=sessions if sessions is not None else SessionCache(),
        )
        self.connector = MeshConnector(
            netns=self._netns,
            identities=identities,
            source=lambda: source,
            pool=self.pool,
            label=f"gateway:{node}",
        )
        self.gateway = IngressGateway(
            snapshot=lambda: sync.current,
            wait_change=sync.wait_swap,
            connector=self.connector,
            registry=registry if registry is not None else Registry(),
            labels=self.labels,
            bind_host=bind_host,
            on_request=self._record if telemetry is not None else on_request,
            limits=limits,
            tracer=telemetry.tracer if telemetry is not None else None,
            access_logged=telemetry is not None,  # its access-log line replaces the proxy's own
            # RequestAuthentication and AuthorizationPolicy selecting the gateway's workload.
            guard=workload_guard(
                lambda: sync.current, self._workload, authenticator or Authenticator()
            ),
            credentials=credentials,
        )

    def _workload(self, snap: Snapshot) -> Workload | None:
        return snap.workload(str(self.document["metadata"]["uid"]))

    def _record(self, entry: RequestLog) -> None:
        """Istio metrics and the access log of one gateway request (reporter "source", as
        Istio's gateways report), then the caller's own hook."""
        if self.telemetry is not None:
            snap = self._sync.current
            me = snap.workload(str(self.document["metadata"]["uid"]))
            record_request(
                self.telemetry,
                snap,
                entry,
                source=me,
                namespace=NAMESPACE,
                source_principal=self.identity,
            )
        if self._on_request is not None:
            self._on_request(entry)

    def statistics(self) -> dict[str, Any]:
        return {
            "identity": self.identity,
            "node": self.node,
            **self.gateway.statistics(),
            "tunnel_pool": self.pool.statistics(),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            if self.migrate_requests:
                enable_request_migration(self._netns)
            await self._register()
            self.identities.ensure(self.identity)
            async with trio.open_nursery() as nursery:
                await nursery.start(self.pool.run)
                await nursery.start(self.gateway.run)
                nursery.start_soon(self._keep_registered)
                log.info(
                    "gateway.ready",
                    node=self.node,
                    identity=self.identity,
                    listening=self.gateway.listening(),
                )
                task_status.started()
        finally:
            self._netns.close()

    def stop_accepting(self) -> None:
        """A draining agent's handover: no new connections, the open ones go on."""
        self.gateway.stop_accepting()

    def open_connections(self) -> int:
        return self.gateway.open_connections

    async def _register(self) -> None:
        lease = self.lease()
        key = keys.workload(self.node, str(self.document["metadata"]["uid"]))
        await self.store.put(key, codec.encode(self.document), lease=lease)
        self._registered_lease = lease

    async def _keep_registered(self) -> None:
        """The agent replaces a lost lease; the registration must follow it (the CA drops a
        certificate request whose workload is gone)."""
        while True:
            await trio.sleep(REREGISTER_CHECK)
            if self.lease() != self._registered_lease:
                try:
                    await self._register()
                    log.info("gateway.reregistered", lease=self._registered_lease)
                except StoreError as exc:
                    log.warning("gateway.register_failed", error=str(exc))
