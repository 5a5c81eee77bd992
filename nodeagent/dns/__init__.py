"""The in-pod DNS proxy (port 15053): answers mesh names from the snapshot, forwards the rest.

A pod's queries to port 53 (UDP and TCP) are REDIRECTed by the capture rules
(`nodeagent.inpod.rules`, `RedirectionSpec.dns_capture`) to `DnsProxy`, which the agent binds
inside the pod's netns. `resolve.answer` decides, purely, whether the mesh answers a question
(service names in their Kubernetes forms, ServiceEntry hosts incl. wildcards, headless services'
pod IPs) or forwards it unchanged to the node's resolvers. `message` is the sans-IO, bounded
wire format. See docs/dns.md.
"""

from __future__ import annotations

from nodeagent.dns.errors import DnsError, FramingError, MessageError, ProxyError
from nodeagent.dns.resolve import Answer, Forward, answer
from nodeagent.dns.server import DnsProxy
from nodeagent.dns.upstream import parse_upstreams, resolv_conf_nameservers, system_upstreams

__all__ = [
    "Answer",
    "DnsError",
    "DnsProxy",
    "Forward",
    "FramingError",
    "MessageError",
    "ProxyError",
    "answer",
    "parse_upstreams",
    "resolv_conf_nameservers",
    "system_upstreams",
]
