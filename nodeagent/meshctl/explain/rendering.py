"""`render(report)`: the report as text for people (tables of destinations and endpoints)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    cells = [list(head), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(head))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in cells
    ]


def _labels(labels: Mapping[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items()) if labels else "-"


def _jwt_line(jwt: dict[str, Any]) -> str:
    issuers = ", ".join(f"{r['issuer']} ({r['policy']})" for r in jwt["rules"])
    accepted = f"accepted issuers {issuers}" if issuers else "no RequestAuthentication"
    if jwt["required"]:
        need = "JWT required"
    elif jwt["rules"]:
        need = "JWT optional (a bad one is refused with 401)"
    else:
        need = "JWT not checked"
    return f"{need}; {accepted}; without a token: {jwt['without_token']}"


def render(report: Mapping[str, Any]) -> str:
    """The report for people: plain sentences and small tables."""
    lines: list[str] = []
    src = report["source"]
    where = f" ({src['ip']}, node {src['node']})" if src["ip"] else ""
    assumed = " (assumed: no gateway workload registered)" if src["assumed"] else ""
    lines.append(f"Source:      {src['kind']} {src['ref']}{where}{assumed}")
    lines.append(f"             principal {src['principal']}")
    req = report["request"]
    what = f"{req['method']} " if req["method"] else ""
    lines.append(f"Request:     {what}{req['url']} (authority {req['authority']})")
    res = report["resolved"] or {}
    if res.get("via") == "gateway":
        gw = res.get("gateway") or "none"
        lines.append(f"Gateway:     {gw} on port {res['port']} for host {res['host']}")
    elif res:
        svc = res.get("service")
        if svc:
            vip = res.get("address") or "no VIP"
            lines.append(
                f"Resolved:    {res.get('name', res.get('address'))} → {svc['kind']} {svc['ref']} "
                f"({svc['host']}), {vip} port {res.get('port')}"
            )
        else:
            lines.append(f"Resolved:    {res.get('address')}:{res.get('port')}")
        if res.get("protocol"):
            lines.append(
                f"Port:        {res['port']} name {res['port_name'] or '-'}, "
                f"protocol {res['protocol']}, target port {res['target_port']}"
            )
        if res.get("workload"):
            lines.append(f"             the address of pod {res['workload']}")
    if report.get("protocol"):
        layer = "HTTP (L7 routing)" if report["protocol"] == "http" else "TCP (L4 routing)"
        lines.append(f"Handled as:  {layer}")
    if report.get("note"):
        lines.append(f"Note:        {report['note']}")
    route = report.get("route")
    if route:
        rule = route.get("rule")
        if rule:
            name = f" ({rule['rule_name']})" if rule["rule_name"] else ""
            lines.append(
                f"Matched:     VirtualService {rule['virtual_service']} rule "
                f"{rule['rule_index']}{name}, route name {route['route_name']}"
            )
            if rule["match_index"] is None:
                lines.append("             the rule has no match: it takes every request")
            else:
                conditions = "; ".join(rule["conditions"]) or "(empty match: everything)"
                lines.append(f"             match clause {rule['match_index']}: {conditions}")
        elif route["default"]:
            lines.append("Matched:     no VirtualService: default route to the service")
        if route.get("redirect"):
            r = route["redirect"]
            lines.append(f"Redirect:    {r['status']} Location: {r['location']}")
        if route.get("direct_response"):
            d = route["direct_response"]
            lines.append(f"Direct:      {d['status']} {d['body']!r}")
        if route.get("upstream_path") is not None and route["kind"] == "route":
            rewrite = " (rewritten)" if route.get("rewrite") else ""
            lines.append(
                f"Upstream:    path {route['upstream_path']}, authority "
                f"{route['upstream_authority']}{rewrite}"
            )
            timeout = route.get("timeout")
            lines.append(f"Timeout:     {f'{timeout:g}s' if timeout else 'none'}")
            rt = route["retries"]
            if rt["attempts"]:
                default = " (Istio default)" if rt["default"] else ""
                per_try = f", per try {rt['per_try_timeout']:g}s" if rt["per_try_timeout"] else ""
                lines.append(
                    f"Retries:     {rt['attempts']} on {','.join(rt['retry_on'])}{per_try}{default}"
                )
            else:
                lines.append("Retries:     none")
            fault = route.get("fault")
            if fault:
                if "delay" in fault:
                    fd = fault["delay"]
                    lines.append(
                        f"Fault:       delay {fd['seconds']:g}s for {fd['percent']:g}% of requests"
                    )
                if "abort" in fault:
                    fa = fault["abort"]
                    lines.append(
                        f"Fault:       abort {fa['http_status']} for {fa['percent']:g}% of requests"
                    )
            if route.get("mirror"):
                lines.append(f"Mirror:      {route['mirror'].get('host')}")
    if report.get("tcp_route"):
        lines.append(f"TCP route:   {report['tcp_route']['route_name']}")
    dests = report.get("destinations") or []
    if dests and report.get("outcome") == "route":
        lines.append("")
        lines.append("Destinations (each request picks one by weight):")
        rows = [
            [
                str(d["weight"]),
                d["host"],
                str(d["port"]),
                d["subset"] or "-",
                _labels(d["subset_labels"]),
                str(len(d["endpoints"])),
            ]
            for d in dests
        ]
        lines.extend(_table(["WEIGHT", "HOST", "PORT", "SUBSET", "LABELS", "ENDPOINTS"], rows))
    for d in dests:
        lines.append("")
        subset = f" subset {d['subset']}" if d["subset"] else ""
        lines.append(f"Endpoints of {d['host']}{subset}:")
        if d.get("endpoint_slices"):
            lines.append(
                f"  from the EndpointSlices of {d['service']} (a Service without selector)"
            )
        if d["error"]:
            lines.append(f"  {d['error']}")
        for w in d.get("unhealthy", ()):
            lines.append(f"  not an endpoint: {w['workload']} ({w['address']}) is {w['status']}")
        if not d["endpoints"]:
            continue
        rows = []
        for ep in d["endpoints"]:
            authz = ep["authorization"]
            verdict = "-"
            if authz:
                by = f" by {authz['policy']}" if authz["policy"] else ""
                verdict = f"{authz['decision']}{by}"
            rows.append(
                [
                    ep["pod"] or "-",
                    f"{ep['ip']}:{ep['port']}",
                    ep["node"] or "-",
                    ep["identity"] or "-",
                    ep["mtls_mode"] or "-",
                    "yes" if ep["tunnel"] else "no (plaintext)",
                    verdict,
                ]
            )
        lines.extend(
            _table(["POD", "ADDRESS", "NODE", "IDENTITY", "MTLS", "TUNNEL", "AUTHZ"], rows)
        )
        for ep in d["endpoints"]:
            authz = ep["authorization"]
            if authz:
                lines.append(f"  {ep['pod']}: {authz['decision']}: {authz['reason']}")
            if ep.get("jwt"):
                lines.append(f"  {ep['pod']}: {_jwt_line(ep['jwt'])}")
    checks = report.get("gateway_checks")
    if checks:
        authz = checks["authorization"]
        by = f" by {authz['policy']}" if authz["policy"] else ""
        lines.append("")
        lines.append(f"At the gateway: {authz['decision']}{by}: {authz['reason']}")
        lines.append(f"                {_jwt_line(checks['jwt'])}")
    if report.get("passthrough"):
        p = report["passthrough"]
        lines.append(f"Passthrough: {p['address']}:{p['port']} ({p['reason']})")
    lines.append("")
    lines.append(f"Verdict:     {report['summary']}")
    return "\n".join(lines) + "\n"
