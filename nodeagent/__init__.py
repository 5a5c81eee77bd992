"""nodeagent: a sidecar-less service mesh agent, one per node."""

__version__ = "0.1.0"
