"""In-pod traffic redirection: capture a pod's TCP into the agent without touching the app.

For each pod the agent (1) opens the pod's network namespace (`Netns`), (2) applies the rule set
decided from the pod's annotations (`RedirectionSpec` → iptables chains `MESH_*` + an fwmark
`ip rule` and a local route) and (3) binds its listeners 15001/15006/15008 inside that netns
(`bind_listeners`); `original_dst` recovers where a captured connection was going.

Blocking: `apply_redirection`, `remove_redirection` and `check_redirection` make libiptc and
netlink round trips (milliseconds): from trio call them as `await netns.arun(apply_redirection,
netns, spec)`, or through the `a*` variants here. `bind_listeners`, `Netns.socket` and
`original_dst` are plain non-blocking system calls and can run in the trio thread.
See docs/redirection.md.
"""

from __future__ import annotations

import time

import trio

from nodeagent.inpod import iptables, routing
from nodeagent.inpod.errors import (
    AnnotationError,
    InpodError,
    ListenerError,
    NetnsError,
    RedirectionError,
)
from nodeagent.inpod.listeners import PodListeners, bind_listeners
from nodeagent.inpod.netns import Netns
from nodeagent.inpod.rules import RedirectionSpec, RuleSet, build_rules, diff_rules
from nodeagent.inpod.sockopt import original_dst
from nodeagent.log import get_logger

__all__ = [
    "AnnotationError",
    "InpodError",
    "ListenerError",
    "Netns",
    "NetnsError",
    "PodListeners",
    "RedirectionError",
    "RedirectionSpec",
    "RuleSet",
    "aapply_redirection",
    "acheck_redirection",
    "apply_redirection",
    "aremove_redirection",
    "bind_listeners",
    "build_rules",
    "check_redirection",
    "original_dst",
    "remove_redirection",
]

_log = get_logger("inpod")


def _apply_here(spec: RedirectionSpec, where: str) -> None:
    ruleset = build_rules(spec)
    routing.apply_routing(where=where)
    try:
        iptables.apply_rules(ruleset, where=where)
    except BaseException:
        # Rules and routing go together: without the rules the ip rule is harmless, but an
        # operator reading `ip rule` should not find a half-installed pod.
        try:
            routing.remove_routing(where=where)
        except RedirectionError as e:
            _log.warning("redirection.rollback.failed", netns=where, error=str(e))
        raise


def apply_redirection(netns: Netns, spec: RedirectionSpec) -> None:
    """Install (or repair) the pod's redirection; all of it or none of it. Blocks."""
    start = time.perf_counter()
    try:
        netns.run(_apply_here, spec, netns.name)
    except InpodError as e:
        _log.warning("redirection.apply.failed", netns=netns.name, error=str(e))
        raise
    _log.info(
        "redirection.apply.complete",
        netns=netns.name,
        rules=build_rules(spec).rule_count(),
        ms=round((time.perf_counter() - start) * 1000, 2),
    )


def _remove_here(where: str) -> None:
    iptables.remove_rules(where=where)
    routing.remove_routing(where=where)


def remove_redirection(netns: Netns) -> None:
    """Remove every jump, owned chain, ip rule and route we install; no-op when absent. Blocks."""
    netns.run(_remove_here, netns.name)
    _log.info("redirection.remove.complete", netns=netns.name)


def _check_here(spec: RedirectionSpec, where: str) -> list[str]:
    problems = diff_rules(build_rules(spec), iptables.read_back(where=where))
    return problems + routing.check_routing()


def check_redirection(netns: Netns, spec: RedirectionSpec) -> list[str]:
    """Readable problems (missing/extra rules, jumps, ip rule, route); empty when all is in
    place. Blocks."""
    return netns.run(_check_here, spec, netns.name)


async def aapply_redirection(netns: Netns, spec: RedirectionSpec) -> None:
    await trio.to_thread.run_sync(apply_redirection, netns, spec)


async def aremove_redirection(netns: Netns) -> None:
    await trio.to_thread.run_sync(remove_redirection, netns)


async def acheck_redirection(netns: Netns, spec: RedirectionSpec) -> list[str]:
    return await trio.to_thread.run_sync(check_redirection, netns, spec)
