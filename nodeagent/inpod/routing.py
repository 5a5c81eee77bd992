"""Policy routing that returns replies of transparently delivered connections to the agent.

When the agent connects to an app in the pod with a peer's IP as source (IP_TRANSPARENT), the
app's replies are addressed to that non-local IP and would leave the pod. The rule set marks
them (connmark restored in mangle OUTPUT, rules.py); here we install, with netlink (pyroute2):

    ip rule add fwmark 0x111/0xfff lookup 100 priority 32764
    ip route add local 0.0.0.0/0 dev lo table 100

so marked packets are delivered locally, to the agent's transparent socket. Like iptables.py,
every function works on the calling thread's netns (call through `Netns.run`) and blocks briefly.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.contract import MARK_MASK
from nodeagent.inpod.errors import RedirectionError
from nodeagent.inpod.rules import CONNMARK, ROUTE_TABLE, RULE_PRIORITY

_RTN_LOCAL = 2
_SCOPE_HOST = 254
_WANT_RULE = f"fwmark {CONNMARK:#x}/{MARK_MASK:#x} lookup {ROUTE_TABLE} priority {RULE_PRIORITY}"
_WANT_ROUTE = f"local 0.0.0.0/0 dev lo table {ROUTE_TABLE}"


@dataclass(frozen=True)
class RoutingState:
    """What is live: our fwmark rules (by the mark they match) and the routes of our table."""

    rules: tuple[str, ...]
    routes: tuple[str, ...]


def _is_our_rule(r: Any) -> bool:
    return bool(r.get("fwmark") == CONNMARK and r.get("table") == ROUTE_TABLE)


def _describe_rule(r: Any) -> str:
    return (
        f"fwmark {r.get('fwmark'):#x}/{(r.get('fwmask') or 0xFFFFFFFF):#x} "
        f"lookup {r.get('table')} priority {r.get('priority') or 0}"
    )


def _describe_route(ipr: Any, r: Any) -> str:
    kinds = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable"}
    oif = r.get("oif")
    dev = ipr.get_links(oif)[0].get("ifname") if oif else "?"
    kind = kinds.get(r["type"], r["type"])
    return f"{kind} {r.get('dst') or '0.0.0.0'}/{r['dst_len']} dev {dev} table {ROUTE_TABLE}"


def _lo_index(ipr: Any, where: str) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RedirectionError(f"routing in netns {where}: no 'lo' interface")
    return int(found[0])


def _netlink(what: str, where: str, e: NetlinkError) -> RedirectionError:
    return RedirectionError(f"{what} in netns {where}: {e.args[-1]}", errno=e.code)


def read_routing() -> RoutingState:
    with IPRoute() as ipr:
        rules = tuple(
            _describe_rule(r) for r in ipr.get_rules(family=socket.AF_INET) if _is_our_rule(r)
        )
        routes = tuple(
            _describe_route(ipr, r)
            for r in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE)
            if r.get("table") == ROUTE_TABLE
        )
    return RoutingState(rules=rules, routes=routes)


def check_routing() -> list[str]:
    """Problems with the live policy routing, as readable lines (empty when correct)."""
    state = read_routing()
    problems = []
    if _WANT_RULE not in state.rules:
        problems.append(f"missing ip rule: {_WANT_RULE}")
    problems += [f"unexpected ip rule: {r}" for r in state.rules if r != _WANT_RULE]
    if _WANT_ROUTE not in state.routes:
        problems.append(f"missing route: {_WANT_ROUTE}")
    problems += [f"unexpected route: {r}" for r in state.routes if r != _WANT_ROUTE]
    return problems


def apply_routing(*, where: str = "current") -> None:
    """Install the fwmark rule and the local route; idempotent (one copy however often run)."""
    with IPRoute() as ipr:
        lo = _lo_index(ipr, where)
        have = [r for r in ipr.get_rules(family=socket.AF_INET) if _is_our_rule(r)]
        keep = next((r for r in have if _describe_rule(r) == _WANT_RULE), None)
        try:
            for r in have:
                if r is not keep:
                    _del_rule(ipr, r)  # a stale variant (other mask/priority) or a duplicate
            if keep is None:
                ipr.rule("add", family=socket.AF_INET, fwmark=CONNMARK, fwmask=MARK_MASK,
                         table=ROUTE_TABLE, priority=RULE_PRIORITY)  # fmt: skip
        except NetlinkError as e:
            raise _netlink(f"ip rule add {_WANT_RULE}", where, e) from None
        try:
            ipr.route("replace", dst="0.0.0.0/0", table=ROUTE_TABLE, type=_RTN_LOCAL,
                      scope=_SCOPE_HOST, oif=lo)  # fmt: skip
        except NetlinkError as e:
            raise _netlink(f"ip route add {_WANT_ROUTE}", where, e) from None


def _del_rule(ipr: Any, r: Any) -> None:
    kwargs: dict[str, Any] = {
        "family": socket.AF_INET,
        "fwmark": r.get("fwmark"),
        "table": r.get("table"),
        "priority": r.get("priority") or 0,
    }
    if r.get("fwmask") is not None:
        kwargs["fwmask"] = r.get("fwmask")
    ipr.rule("del", **kwargs)


def remove_routing(*, where: str = "current") -> None:
    """Delete our fwmark rules and every route of our table; no-op when absent."""
    with IPRoute() as ipr:
        try:
            for r in ipr.get_rules(family=socket.AF_INET):
                if _is_our_rule(r):
                    _del_rule(ipr, r)
            for r in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE):
                if r.get("table") != ROUTE_TABLE:
                    continue
                try:
                    ipr.route("del", dst=f"{r.get('dst') or '0.0.0.0'}/{r['dst_len']}",
                              table=ROUTE_TABLE, type=r["type"], scope=r["scope"],
                              oif=r.get("oif"))  # fmt: skip
                except NetlinkError as e:
                    if e.code not in (errno.ESRCH, errno.ENOENT):
                        raise
        except NetlinkError as e:
            raise _netlink("remove policy routing", where, e) from None
