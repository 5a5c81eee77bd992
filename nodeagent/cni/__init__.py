"""The agent's CNI endpoint: the plugin's wire protocol, the socket server, the handler
protocol the agent implements, pod metadata sources, and `install-cni`.

The plugin executable itself lives in cni-plugin/mesh-cni (self-contained; see docs/cni.md).
"""

from nodeagent.cni.errors import EnrollError, ErrorCode, ProtocolError
from nodeagent.cni.handler import CniHandler
from nodeagent.cni.metadata import PodMetadata, PodMetadataSource, RuntimeArgsMetadataSource
from nodeagent.cni.protocol import CniReply, CniRequest, Command, PodRef
from nodeagent.cni.server import CniServer

__all__ = [
    "CniHandler",
    "CniReply",
    "CniRequest",
    "CniServer",
    "Command",
    "EnrollError",
    "ErrorCode",
    "PodMetadata",
    "PodMetadataSource",
    "PodRef",
    "ProtocolError",
    "RuntimeArgsMetadataSource",
]
