"""`nodeagent sandbox …` / `scripts/sandbox …`: the command line of the multi-node sandbox.

The sandbox's own name is `--name` before the subcommand (or `--sandbox` anywhere, or
$NODEAGENT_SANDBOX); inside `pod add`, `--name` is the pod's name, as the issue spells it.
A command to run goes after `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from nodeagent.sandbox import layout
from nodeagent.sandbox.errors import SandboxError
from nodeagent.sandbox.sandbox import Sandbox

ENV_NAME = "NODEAGENT_SANDBOX"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sandbox",
        description="A multi-node mesh sandbox made of network namespaces on this machine.",
    )
    default = os.environ.get(ENV_NAME, layout.DEFAULT_NAME)
    p.add_argument(
        "--name",
        "--sandbox",
        dest="sandbox",
        default=default,
        help=f"sandbox name (default ${ENV_NAME} or {layout.DEFAULT_NAME!r})",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def named(parser: argparse.ArgumentParser, flags: tuple[str, ...]) -> None:
        parser.add_argument(*flags, dest="sandbox", default=argparse.SUPPRESS, help="sandbox name")

    up = sub.add_parser(
        "up", help="create the underlay, nodes, outside host (and etcd); start the agents"
    )
    named(up, ("--name", "--sandbox"))
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--store", choices=["sqlite", "etcd"], default="sqlite")
    up.add_argument("--no-agents", action="store_true", help="do not start node agents")
    up.add_argument(
        "--no-mesh-cni",
        action="store_true",
        help="leave mesh-cni out of the CNI chain (plain loopback + bridge)",
    )
    up.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the agents to be ready",
    )
    up.add_argument(
        "--gateway",
        metavar="NODE",
        default=None,
        help="run the ingress gateway in this node's agent (e.g. n1)",
    )
    up.add_argument(
        "--agent-image",
        metavar="TAG",
        default=None,
        help="run each agent as a container of this image, the DaemonSet's way (scripts/image)",
    )
    up.add_argument(
        "--image-store",
        metavar="DIR",
        type=Path,
        default=None,
        help="podman storage holding --agent-image (default $MESH_IMAGE_STORE or <repo>/.image)",
    )
    up.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="leave a failed sandbox in place for inspection (then run down)",
    )

    pod = sub.add_parser("pod", help="add or delete a pod")
    pod_sub = pod.add_subparsers(dest="pod_command", required=True, metavar="add|del")
    add = pod_sub.add_parser(
        "add", help="create a pod through the node's CNI chain; then run CMD (after --) inside it"
    )
    named(add, ("--sandbox",))
    add.add_argument("--node", required=True)
    add.add_argument("--namespace", default=layout.DEFAULT_NAMESPACE)
    add.add_argument("--name", dest="pod", required=True, help="the pod's name")
    add.add_argument("--service-account", default=layout.DEFAULT_SERVICE_ACCOUNT)
    add.add_argument("--labels", default="", help="k=v,k2=v2")
    add.add_argument("--annotations", default="", help="k=v,k2=v2")
    add.add_argument("--no-cmd", action="store_true", help="just the network, no process")
    delete = pod_sub.add_parser("del", help="stop a pod, DEL its CNI chain, drop its namespace")
    named(delete, ("--sandbox",))
    delete.add_argument("pod", metavar="NAME", help="name or namespace/name")
    delete.add_argument("--namespace", default=None)

    ex = sub.add_parser(
        "exec",
        help="run CMD (after --) in a pod, node/nI, outside, etcd or "
        "underlay; exit code propagated",
    )
    named(ex, ("--name", "--sandbox"))
    ex.add_argument("target", metavar="TARGET")

    st = sub.add_parser("status", help="nodes, agents and pods")
    named(st, ("--name", "--sandbox"))
    st.add_argument("-o", "--output", choices=["table", "json"], default="table")

    gw = sub.add_parser("gateway-url", help="the ingress gateway's URL as the outside host sees it")
    named(gw, ("--name", "--sandbox"))
    gw.add_argument("--port", type=int, default=80, help="the Gateway server's port")

    gc = sub.add_parser(
        "gateway-cert",
        help="issue a certificate for HOST from the sandbox's edge CA into the gateway's "
        "credentials (credentialName NAME); prints the CA file for clients",
    )
    named(gc, ("--name", "--sandbox"))
    gc.add_argument("host", metavar="HOST")
    gc.add_argument(
        "--credential", metavar="NAME", help="credentialName (default: HOST with - for .)"
    )

    cu = sub.add_parser(
        "console-url", help="the mesh console's URL (with its token) as the outside host opens it"
    )
    named(cu, ("--name", "--sandbox"))

    env = sub.add_parser("env", help="print `export MESH_STORE=…` for meshctl")
    named(env, ("--name", "--sandbox"))

    agent = sub.add_parser("agent", help="start, stop, restart or kill a node's agent")
    named(agent, ("--name", "--sandbox"))
    agent.add_argument(
        "action",
        choices=["start", "stop", "restart", "kill"],
        help="stop: at once (no drain); restart: graceful (SIGTERM, the new agent binds beside "
        "the draining old one); kill: kill -9",
    )
    agent.add_argument("node", metavar="NODE")
    agent.add_argument(
        "--takeover",
        action="store_true",
        help="restart as a maxSurge 1 rollout: the new agent starts beside the old one with "
        "--takeover, the old one hands over, parks, and gets its SIGTERM after",
    )

    down = sub.add_parser("down", help="remove everything the sandbox created")
    named(down, ("--name", "--sandbox"))
    down.add_argument(
        "--keep-logs",
        metavar="DIR",
        type=Path,
        default=None,
        help="copy agent, pod and etcd logs to DIR first",
    )
    return p


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_status(doc: dict[str, Any]) -> str:
    out = [f"sandbox {doc['name']}  store {doc['store_url']}  state {doc['state_dir']}"]
    rows = [["NODE", "NETNS", "UNDERLAY", "POD CIDR", "AGENT PID", "ALIVE", "READY"]]
    for n in doc["nodes"]:
        rows.append([
            n["name"], n["netns"], n["underlay_ip"], n["pod_cidr"],
            str(n["agent_pid"] or "-"), _yn(n["agent_alive"]), _yn(n["agent_ready"]),
        ])  # fmt: skip
    out += ["", _table(rows)]
    out.append(f"\noutside {doc['outside']['netns']} {doc['outside']['ip']}")
    if doc.get("console"):
        out.append(f"console {doc['console']} (scripts/sandbox console-url)")
    if doc.get("gateway"):
        out.append(f"gateway on {doc['gateway']} (scripts/sandbox gateway-url)")
    if doc["etcd"]:
        e = doc["etcd"]
        out.append(
            f"etcd    {e['netns']} {e['url']} pid {e['pid']} {'alive' if e['alive'] else 'DEAD'}"
        )
    if doc["pods"]:
        rows = [["NODE", "POD", "IP", "PID", "ALIVE"]]
        for p in doc["pods"]:
            rows.append([
                p["node"], f"{p['namespace']}/{p['name']}", p["ip"] or "-",
                str(p["pid"] or "-"), _yn(p["alive"]) if p["pid"] else "-",
            ])  # fmt: skip
        out += ["", _table(rows)]
    else:
        out.append("\nno pods")
    return "\n".join(out)


def _yn(v: bool) -> str:
    return "yes" if v else "no"


def main(argv: list[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    cmd: list[str] = []
    if "--" in args_in:
        i = args_in.index("--")
        args_in, cmd = args_in[:i], args_in[i + 1 :]
    args = _parser().parse_args(args_in)
    try:
        return _run(args, cmd)
    except SandboxError as e:
        print(f"sandbox: error: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"sandbox: {note}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace, cmd: list[str]) -> int:
    progress = not args.quiet
    name: str = args.sandbox
    if args.command == "up":
        if cmd:
            raise SandboxError("up takes no command after --")
        Sandbox.up(
            name,
            nodes=args.nodes,
            store=args.store,
            agents=not args.no_agents,
            mesh_cni=not args.no_mesh_cni,
            ready_timeout=args.ready_timeout,
            progress=progress,
            cleanup_on_failure=not args.keep_on_failure,
            gateway=args.gateway,
            agent_image=args.agent_image,
            image_store=args.image_store,
        )
        print(format_status(Sandbox.open(name).status()))
        return 0
    if args.command == "down":
        Sandbox(name, progress=progress).down(keep_logs=args.keep_logs)
        return 0
    sb = Sandbox.open(name, progress=progress)
    if args.command == "pod" and args.pod_command == "add":
        if args.no_cmd and cmd:
            raise SandboxError("--no-cmd and a command after -- exclude each other")
        pod = sb.pod_add(
            args.node,
            args.namespace,
            args.pod,
            cmd,
            service_account=args.service_account,
            labels=layout.parse_kv_list("--labels", args.labels),
            annotations=layout.parse_kv_list("--annotations", args.annotations),
        )
        print(pod.ip)
        return 0
    if args.command == "pod" and args.pod_command == "del":
        if not sb.pod_del(args.pod, args.namespace):
            print(f"sandbox: no pod {args.pod!r}; nothing to do", file=sys.stderr)
        return 0
    if args.command == "exec":
        if not cmd:
            raise SandboxError("exec needs a command after --")
        netns = sb.netns_of(args.target)
        # exec, not a child: stdin/stdout/tty, signals and the exit code pass straight through.
        os.execvp("ip", ["ip", "netns", "exec", netns, *cmd])
    if args.command == "status":
        doc = sb.status()
        print(json.dumps(doc, indent=2) if args.output == "json" else format_status(doc))
        return 0
    if args.command == "gateway-url":
        print(sb.gateway_url(args.port))
        return 0
    if args.command == "gateway-cert":
        print(sb.gateway_cert(args.host, args.credential))
        return 0
    if args.command == "console-url":
        print(sb.console_url())
        return 0
    if args.command == "env":
        print(sb.env())
        return 0
    if args.command == "agent":
        # Extra `nodeagent run` arguments after -- (start only), kept for later restarts.
        if cmd and args.action != "start":
            raise SandboxError("only `agent start` takes `nodeagent run` arguments after --")
        if args.takeover and args.action != "restart":
            raise SandboxError("--takeover is a way to restart: `agent restart NODE --takeover`")
        if args.action == "start":
            sb.start_agent(args.node, args=cmd or None)
        elif args.action == "stop":
            sb.stop_agent(args.node)
        elif args.action == "restart":
            sb.restart_agent(args.node, takeover=args.takeover)
        else:
            sb.kill_agent(args.node)
        return 0
    raise SandboxError(f"unknown command {args.command!r}")
