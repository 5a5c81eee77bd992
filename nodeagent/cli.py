"""`nodeagent`: the node agent and its subcommands.

run          the agent (CNI endpoint, redirection, proxy, store sync, admin socket)
uninstall    stop the agent and remove every rule it installed on this node
install-cni  put the mesh-cni plugin into the node's CNI chain (and take it out)
sandbox      a multi-node cluster of network namespaces on this machine
ca           the certificate authority: `ca init`, `ca serve`, `ca revoke`
admin        talk to a running agent over its admin socket (tables, or JSON with -o json)
kube-sync    mirror Kubernetes Services, EndpointSlices, Pods and Istio config into the store
console      the read-only web console: service graph, traffic, config health, rollouts
controller   drive Rollouts: canary weights or A/B matches, metric analysis, promotion, rollback
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import sys
from pathlib import Path

import trio

from nodeagent.contract import METRICS_PATH, METRICS_PORT, READY_PATH, RUN_DIR


def _run(argv: list[str]) -> int:
    from nodeagent import log
    from nodeagent.agent.main import AgentConfig, run_until_signalled
    from nodeagent.http import Limits
    from nodeagent.proxy.inbound import DESTINATION_L7_MODES
    from nodeagent.store import DEFAULT_URL
    from nodeagent.workers.config import MAX_DEFAULT_WORKERS, default_workers

    p = argparse.ArgumentParser(prog="nodeagent run", description="Run the node agent.")
    p.add_argument("--node", default=os.environ.get("NODE_NAME") or socket.gethostname())
    p.add_argument("--store", default=os.environ.get("MESH_STORE", DEFAULT_URL))
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="json", choices=["json", "console"])
    p.add_argument(
        "--metrics-port",
        type=int,
        default=METRICS_PORT,
        help=f"TCP port of {METRICS_PATH} and {READY_PATH}",
    )
    p.add_argument("--zipkin-url", default=os.environ.get("MESH_ZIPKIN_URL"))
    p.add_argument("--sample-rate", type=float, default=0.01, help="trace sampling, 0..1")
    p.add_argument(
        "--pod-metadata",
        default=os.environ.get("MESH_POD_METADATA", ""),
        choices=["", "runtime-args", "kubernetes"],
        help="where pod labels and service accounts come from",
    )
    p.add_argument(
        "--destination-l7",
        default="always",
        choices=list(DESTINATION_L7_MODES),
        help="parse the requests of a pod's HTTP ports arriving through the tunnel always, or "
        "only when a policy of the pod reads them or the source did not report them",
    )
    p.add_argument(
        "--outbound-policy",
        default="ALLOW_ANY",
        choices=["ALLOW_ANY", "REGISTRY_ONLY"],
        help="what happens to connections to destinations the mesh does not know",
    )
    p.add_argument("--no-dns", dest="dns", action="store_false", help="no in-pod DNS proxy")
    p.add_argument(
        "--dns-upstream",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="resolver for non-mesh names (repeatable; default: the node's /etc/resolv.conf)",
    )
    p.add_argument(
        "--gateway",
        action="store_true",
        help="also serve the ingress gateway on this node (Gateways selecting "
        "istio: ingressgateway), bound in the node's network namespace",
    )
    p.add_argument(
        "--gateway-bind", default="0.0.0.0", metavar="IP", help="address the gateway binds"
    )
    p.add_argument(
        "--gateway-credentials",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the gateway's credentialName certificates are: DIR/<name>/tls.crt, "
        "tls.key, ca.crt (a Kubernetes TLS Secret's mount layout); re-read when they change",
    )
    p.add_argument(
        "--no-probe-snat",
        dest="probe_snat",
        action="store_false",
        help="do not SNAT the node's connections to enrolled pods to 169.254.7.127 "
        "(kubelet probes then hit the pods' inbound capture)",
    )
    p.add_argument(
        "--advertise-address",
        default=os.environ.get("NODE_IP") or None,
        metavar="IP",
        help="the node address its metrics port is reachable on, published in the store "
        "for the console and the rollout controller (default $NODE_IP; none: not published)",
    )
    p.add_argument(
        "--lease-ttl",
        type=_positive_seconds,
        default=15.0,
        metavar="SECONDS",
        help="the node's lease: its registrations vanish this long after the agent stops",
    )
    p.add_argument(
        "--lease-grace",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="keep other nodes' workloads this long after their node's lease lapsed",
    )
    p.add_argument(
        "--drain-timeout",
        type=_positive_seconds,
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM: hand over to a new agent, and close connections still open after this",
    )
    p.add_argument(
        "--http-request-headers-timeout",
        type=_positive_seconds,
        default=Limits().request_headers_timeout,
        metavar="SECONDS",
        help="HTTP (pods and gateway): a request head must complete within this of its first "
        "byte, else 408 (flag DT)",
    )
    p.add_argument(
        "--http-stream-idle-timeout",
        type=_positive_seconds,
        default=Limits().stream_idle_timeout,
        metavar="SECONDS",
        help="HTTP (pods and gateway): a request with no byte either way for this long is "
        "ended, 408 if no response was started (flag SI); Envoy's default, 300",
    )
    p.add_argument(
        "--workers",
        type=_worker_count,
        default=default_workers(),
        metavar="N",
        help="data-plane processes serving every pod (SO_REUSEPORT: the kernel spreads "
        "connections); 1 serves in the agent's own process (default: usable cores, "
        f"at most {MAX_DEFAULT_WORKERS})",
    )
    p.add_argument(
        "--takeover",
        action="store_true",
        help="if an agent runs in the run dir, ask it to hand over (it drains, then idles "
        "until its SIGTERM) and start: a DaemonSet rollout with maxSurge 1",
    )
    args = p.parse_args(argv)
    log.configure(args.log_level, args.log_format)
    cfg = AgentConfig(
        workers=args.workers,
        log_format=args.log_format,
        node=args.node,
        store_url=args.store,
        run_dir=args.run_dir,
        trust_domain=args.trust_domain,
        log_level=args.log_level,
        metrics_port=args.metrics_port,
        zipkin_url=args.zipkin_url,
        sample_rate=args.sample_rate,
        pod_metadata=args.pod_metadata,
        outbound_policy=args.outbound_policy,
        destination_l7=args.destination_l7,
        dns=args.dns,
        dns_upstreams=tuple(args.dns_upstream),
        gateway=args.gateway,
        gateway_bind=args.gateway_bind,
        gateway_credentials=args.gateway_credentials,
        probe_snat=args.probe_snat,
        advertise_address=args.advertise_address,
        lease_ttl=args.lease_ttl,
        lease_grace=args.lease_grace,
        drain_timeout=args.drain_timeout,
        takeover=args.takeover,
        http_limits=Limits(
            request_headers_timeout=args.http_request_headers_timeout,
            stream_idle_timeout=args.http_stream_idle_timeout,
        ),
    )
    try:
        trio.run(run_until_signalled, cfg)
    except Exception as exc:  # start-up failures: one clear line, not a traceback
        log.get_logger("agent").error("agent.failed", error=_describe(exc))
        if args.log_level == "debug":
            raise
        return 1
    return 0


MAX_WORKERS = 64


def _worker_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r}: workers must be between 1 and {MAX_WORKERS}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be positive and finite")
    return value


def _describe(exc: BaseException) -> str:
    """The leaf errors of an exception group, one clause each."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def _uninstall(argv: list[str]) -> int:
    from nodeagent import log
    from nodeagent.agent.uninstall import uninstall
    from nodeagent.store import DEFAULT_URL

    p = argparse.ArgumentParser(prog="nodeagent uninstall")
    p.add_argument("--node", default=os.environ.get("NODE_NAME") or socket.gethostname())
    p.add_argument("--store", default=os.environ.get("MESH_STORE", DEFAULT_URL))
    p.add_argument("--run-dir", type=Path, default=RUN_DIR)
    p.add_argument(
        "--stop-timeout",
        type=_positive_seconds,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for a running agent to exit after SIGTERM (then give up, "
        "removing nothing)",
    )
    args = p.parse_args(argv)
    log.configure("info", "console")
    return trio.run(
        lambda: uninstall(
            node=args.node,
            store_url=args.store,
            run_dir=args.run_dir,
            stop_timeout=args.stop_timeout,
        )
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "uninstall", "install-cni", "sandbox", *_DELEGATED}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return _run(rest)
    if cmd == "uninstall":
        return _uninstall(rest)
    if cmd == "install-cni":
        from nodeagent.cni.install import main as install_main

        return install_main(rest)
    if cmd in _DELEGATED:
        module = importlib.import_module(_DELEGATED[cmd])
        result: int = module.main(rest)
        return result
    try:
        from nodeagent.sandbox.cli import main as sandbox_main
    except ModuleNotFoundError as e:
        # The runtime install (the DaemonSet image) carries the agent only, not the tooling.
        if e.name != "nodeagent.sandbox":
            raise
        print(
            "nodeagent sandbox: the sandbox is development tooling, not part of this install; "
            "run scripts/sandbox from a checkout",
            file=sys.stderr,
        )
        return 2
    return sandbox_main(rest)


# Subcommands whose parsing lives with their package: `nodeagent <cmd> …` → `<module>.main(argv)`.
_DELEGATED = {
    "ca": "nodeagent.ca.cli",
    "admin": "nodeagent.admin.cli",
    "kube-sync": "nodeagent.kube.cli",
    "console": "nodeagent.console.cli",
    "controller": "nodeagent.rollout.cli",
}


if __name__ == "__main__":
    sys.exit(main())
