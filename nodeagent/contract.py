"""The outside contract's constants (DESIGN.md "Fixed contracts"): defined here once, imported.

Ports the agent binds in every pod netns and on the node, the mark on every socket it opens in
a pod netns, the kubelet probe source, the node-local sockets and the iptables chain prefix.
Changing one of these changes what other software (CNI chains, kubelets, Prometheus, operators'
tools, peers on other nodes) relies on: they are values of the wire, not tunables.
"""

from __future__ import annotations

from pathlib import Path

OUTBOUND_CAPTURE_PORT = 15001  # TCP in each pod netns: the app's connections, REDIRECTed
INBOUND_PLAINTEXT_PORT = 15006  # TCP in each pod netns: non-mesh clients, REDIRECTed
TUNNEL_PORT = 15008  # TCP in each pod netns: the mTLS tunnel, the only port peers connect to
DNS_CAPTURE_PORT = 15053  # UDP and TCP on 127.0.0.1 in each pod netns: the DNS proxy
METRICS_PORT = 15020  # TCP on the node: /stats/prometheus and /healthz/ready

# Every port the agent binds in a pod netns. A connection the agent would open to one of them
# on a pod's address would land on the agent itself: refused on every path (issue 21).
POD_LISTENER_PORTS = frozenset(
    {OUTBOUND_CAPTURE_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT, DNS_CAPTURE_PORT}
)

MESH_MARK = 0x539  # on every socket the agent opens in a pod netns: bypasses the capture
MARK_MASK = 0xFFF

PROBE_SOURCE = "169.254.7.127"  # kubelet probes are SNATed to it on the node; never captured

CHAIN_PREFIX = "MESH_"  # every iptables chain the agent owns, in a pod netns or on the node

RUN_DIR = Path("/run/nodeagent")
ADMIN_SOCKET_NAME = "admin.sock"  # HTTP/1.1, mode 0600
CNI_SOCKET_NAME = "cni.sock"  # msgpack request/response, one per call
ADMIN_SOCKET = RUN_DIR / ADMIN_SOCKET_NAME
CNI_SOCKET = RUN_DIR / CNI_SOCKET_NAME

READY_PATH = "/healthz/ready"  # on the admin socket and on METRICS_PORT
METRICS_PATH = "/stats/prometheus"
