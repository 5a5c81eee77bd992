"""The multi-node sandbox: a small cluster made of network namespaces on one Linux machine.

Each node is a namespace on an underlay bridge (itself in a namespace) with a pod CIDR and routes
to the other nodes' pod CIDRs; pods are namespaces wired by the real CNI plugins (loopback, bridge
with host-local IPAM, then mesh-cni), called exactly as a container runtime calls them; one agent
runs inside each node's namespace. Nothing is added to the machine's own network namespace, and
`down` leaves nothing behind. Used by the CLI (`nodeagent sandbox …`), the integration tests and
the demo:

    with sandbox("t1", nodes=2) as sb:
        pod = sb.pod_add("n1", "default", "web", ["python3", "-m", "http.server", "8080"])
        sb.exec("outside", ["curl", "-s", f"http://{pod.ip}:8080/"])
"""

from nodeagent.sandbox.errors import CniError, SandboxError
from nodeagent.sandbox.sandbox import AgentRestart, Node, Pod, Sandbox, sandbox

__all__ = ["AgentRestart", "CniError", "Node", "Pod", "Sandbox", "SandboxError", "sandbox"]
