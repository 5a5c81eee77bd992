"""The ingress gateway: Gateway resources → listeners on the node → the mesh (see server.py)."""

from nodeagent.gateway.credentials import CredentialError, CredentialSource
from nodeagent.gateway.server import DEFAULT_LABELS, GatewayError, IngressGateway
from nodeagent.gateway.servers import ServerBinding, host_matches, servers_by_port

__all__ = [
    "DEFAULT_LABELS",
    "CredentialError",
    "CredentialSource",
    "GatewayError",
    "IngressGateway",
    "ServerBinding",
    "host_matches",
    "servers_by_port",
]
