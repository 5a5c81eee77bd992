"""The multi-node sandbox: nodes, pods and an outside host as network namespaces on one machine.

`Sandbox.up()` builds the underlay, the nodes (with routes to each other's pod CIDRs), the outside
host, optionally a real etcd, writes each node's CNI network list and starts one agent per node
inside its namespace. Pods are namespaces wired by the real CNI chain (see `cni`). `down()` undoes
all of it, after a partial `up` too. The state lives in `/run/nodeagent-sandbox/<name>/` so the
CLI and the Python API (tests, demo) drive the same sandbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from nodeagent.admin.client import is_ready
from nodeagent.sandbox import cni, container, containerd, layout
from nodeagent.sandbox.certs import FileCa
from nodeagent.sandbox.errors import CniError, SandboxError
from nodeagent.sandbox.state import NodeState, PodState, State, load, locked, save
from nodeagent.sandbox.system import (
    ProcessRef,
    ip,
    netns_add,
    netns_delete,
    netns_exists,
    netns_list,
    reap,
    run,
    spawn,
    stop_all,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 60.0
ETCD_TIMEOUT = 30.0
CA_TIMEOUT = 30.0
CA_TRUST_DOMAIN = "cluster.local"
AGENT_GRACE = 10.0
DRAIN_TIMEOUT = 5.0  # `nodeagent run --drain-timeout`'s default
POD_GRACE = 5.0
# A pod command that dies this fast with an error was a bad command line: undo the pod.
POD_START_CHECK = 0.3
# Every background process this Python process started (agents, pods, etcd), shared by all
# handles so any of them reaps (and no Popen is collected while its child is unreaped).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    index: int
    netns: str
    underlay_ip: str
    pod_cidr: str
    gateway: str
    run_dir: Path
    agent_pid: int | None

    @property
    def paths(self) -> layout.NodePaths:
        return layout.NodePaths(self.run_dir)

    @property
    def admin_socket(self) -> Path:
        return self.paths.admin_socket

    @property
    def cni_socket(self) -> Path:
        return self.paths.cni_socket

    @property
    def agent_log(self) -> Path:
        return self.paths.agent_log

    @property
    def conflist(self) -> Path:
        return self.paths.conflist


@dataclass(frozen=True, slots=True)
class Pod:
    ip: str
    netns: str
    node: str
    namespace: str
    name: str
    uid: str
    pid: int | None
    container_id: str
    log: Path

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _node(ns: NodeState) -> Node:
    return Node(
        name=ns.name,
        index=ns.index,
        netns=ns.netns,
        underlay_ip=ns.underlay_ip,
        pod_cidr=ns.pod_cidr,
        gateway=ns.gateway,
        run_dir=Path(ns.run_dir),
        agent_pid=ns.agent.pid if ns.agent else None,
    )


def _pod(ps: PodState) -> Pod:
    return Pod(
        ip=ps.ip or "",
        netns=ps.netns,
        node=ps.node,
        namespace=ps.namespace,
        name=ps.name,
        uid=ps.uid,
        pid=ps.process.pid if ps.process else None,
        container_id=ps.container_id,
        log=Path(ps.log),
    )


@dataclass(frozen=True, slots=True)
class AgentRestart:
    """When (time.monotonic(), the same clock in every process) a graceful restart sent the
    SIGTERM, saw the new agent ready, and saw the old one gone."""

    sigterm_at: float
    ready_at: float
    old_exited_at: float


def _logged_since(path: Path, offset: int, event: str) -> bool:
    """Whether `event` (a log record's event name) appears in `path` after byte `offset`."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f'"{event}"'.encode() in f.read()
    except OSError:
        return False


def _pid_file_names(run_dir: Path, pid: int) -> bool:
    """Whether `<run-dir>/agent.pid` still names `pid` (the agent removes it when it stops
    being the node's agent; nodeagent.agent.pidfile)."""
    try:
        return (run_dir / "agent.pid").read_text().strip() == str(pid)
    except FileNotFoundError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Sandbox:
    """One sandbox, named; the handle is cheap and reads the recorded state on every call."""

    def __init__(
        self, name: str = layout.DEFAULT_NAME, *, progress: bool = True, root: Path | None = None
    ) -> None:
        self.name = layout.check_sandbox_name(name)
        self.state_dir = (root or layout.STATE_ROOT) / name
        self.progress = progress

    # ----- life cycle -------------------------------------------------------------------------

    @classmethod
    def up(
        cls,
        name: str = layout.DEFAULT_NAME,
        nodes: int = 2,
        store: str = "sqlite",
        agents: bool = True,
        *,
        mesh_cni: bool = True,
        cni_path: Sequence[str] | None = None,
        agent_cmd: Sequence[str] | None = None,
        agent_args: Sequence[str] = (),
        ready_timeout: float = READY_TIMEOUT,
        progress: bool = True,
        cleanup_on_failure: bool = True,
        ca_ttl: str = "24h",
        gateway: str | None = None,
        agent_image: str | None = None,
        image_store: Path | None = None,
        workers: int | None = None,
    ) -> Sandbox:
        """Create and start a sandbox. On failure it is torn down again (unless told not to).
        With agents, the CA's signer runs too (before the agents), issuing certificates of
        lifetime `ca_ttl`. `gateway="n1"` makes n1's agent serve the ingress gateway too.
        `agent_image` runs each agent as a container of that image (sandbox/container.py),
        from `image_store` (default: scripts/image's). `workers` is every agent's
        `--workers` (default `SANDBOX_WORKERS`: one process); `agent_args` are more flags of
        every agent (after `agent_cmd`, default `nodeagent run`)."""
        sb = cls(name, progress=progress)
        layout.check_node_count(nodes)
        if gateway is not None and gateway not in {f"n{i}" for i in range(1, nodes + 1)}:
            raise SandboxError(f"--gateway {gateway!r}: no such node (n1..n{nodes})")
        layout.store_url(store, sb.state_dir)  # validates the store kind
        sb._check_absent()
        store_dir = None
        if agent_image is not None:
            store_dir = (image_store or container.default_store()).resolve()
            container.check_image(store_dir, agent_image)
        try:
            sb._build(
                nodes=nodes,
                store=store,
                agents=agents,
                mesh_cni=mesh_cni,
                cni_path=list(cni_path) if cni_path else sb._default_cni_path(),
                agent_cmd=[*(agent_cmd or sb._default_agent_cmd()), *agent_args],
                ready_timeout=ready_timeout,
                ca_ttl=ca_ttl,
                gateway=gateway,
                agent_image=agent_image,
                image_store=None if store_dir is None else str(store_dir),
                workers=workers,
            )
        except BaseException:
            if cleanup_on_failure:
                sb._say("up failed; tearing down what was created")
                with contextlib.suppress(SandboxError):
                    sb.down()
            raise
        return sb

    @classmethod
    def open(cls, name: str = layout.DEFAULT_NAME, *, progress: bool = True) -> Sandbox:
        """A handle on an existing sandbox."""
        sb = cls(name, progress=progress)
        load(sb.state_dir)
        return sb

    def exists(self) -> bool:
        return self.state_dir.exists()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # ----- read-only views --------------------------------------------------------------------

    def state(self) -> State:
        return load(self.state_dir)

    @property
    def store_url(self) -> str:
        return self.state().store_url

    def node(self, name: str) -> Node:
        st = self.state()
        if name not in st.nodes:
            raise SandboxError(
                f"sandbox {self.name!r} has no node {name!r} ({', '.join(st.nodes)})"
            )
        return _node(st.nodes[name])

    def nodes(self) -> list[Node]:
        return [_node(n) for n in self.state().nodes.values()]

    def pods(self) -> list[Pod]:
        return [_pod(p) for p in self.state().pods.values() if p.ip]

    def pod(self, ref: str, namespace: str | None = None) -> Pod:
        return _pod(self._find_pod(self.state(), ref, namespace))

    def outside_ip(self) -> str:
        return self.state().outside_ip

    def gateway_url(self, port: int = 80) -> str:
        """The ingress gateway's URL as the outside host sees it (the gateway node's underlay
        address)."""
        st = self.state()
        if st.gateway is None:
            raise SandboxError(f"sandbox {st.name!r} has no gateway (up --gateway NODE)")
        return f"http://{self._node_state(st, st.gateway).underlay_ip}:{port}"

    @property
    def gateway_credentials_dir(self) -> Path:
        """The gateway agent's `--gateway-credentials` directory: put a TLS Secret's files in
        `<dir>/<credentialName>/` (tls.crt, tls.key, ca.crt); the gateway re-reads them."""
        d = self.state_dir / "gateway-credentials"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d

    def gateway_cert(self, host: str, credential: str | None = None) -> Path:
        """Issue a certificate for `host` into the gateway's credentials as `credential`
        (default: the host with dashes); the edge CA's certificate file, for clients."""
        ca = FileCa(self.state_dir / "edge-ca")
        name = credential or host.replace(".", "-")
        ca.issue(self.gateway_credentials_dir / name, host)
        return ca.cert_file

    def console_url(self) -> str:
        """The console's URL as the outside host (or any sandbox namespace) opens it, with the
        token that sets the console's cookie."""
        st = self.state()
        if st.console is None:
            raise SandboxError(f"sandbox {st.name!r} runs no console (up without --no-agents)")
        token = self.console_token_file.read_text().strip()
        return f"http://{layout.CONSOLE_IP}:{layout.CONSOLE_PORT}/?token={token}"

    @property
    def console_token_file(self) -> Path:
        return self.state_dir / "console.token"

    @property
    def console_log(self) -> Path:
        return self.state_dir / "console.log"

    def agent_ready(self, node: str) -> bool:
        return is_ready(self.node(node).admin_socket)

    def status(self) -> dict[str, Any]:
        st = self.state()
        nodes = []
        for n in st.nodes.values():
            paths = layout.NodePaths(Path(n.run_dir))
            alive = n.agent.alive() if n.agent else False
            nodes.append(
                {
                    "name": n.name,
                    "netns": n.netns,
                    "underlay_ip": n.underlay_ip,
                    "pod_cidr": n.pod_cidr,
                    "run_dir": n.run_dir,
                    "agent_pid": n.agent.pid if n.agent else None,
                    "agent_alive": alive,
                    "agent_ready": alive and is_ready(paths.admin_socket),
                }
            )
        pods = [
            {
                "node": p.node,
                "namespace": p.namespace,
                "name": p.name,
                "ip": p.ip,
                "netns": p.netns,
                "pid": p.process.pid if p.process else None,
                "alive": p.process.alive() if p.process else False,
            }
            for p in st.pods.values()
        ]
        return {
            "name": st.name,
            "state_dir": st.state_dir,
            "store": st.store,
            "store_url": st.store_url,
            "outside": {"netns": layout.outside_netns(st.name), "ip": st.outside_ip},
            "gateway": st.gateway,
            "console": None
            if st.console is None
            else f"{layout.console_netns(st.name)} {layout.CONSOLE_IP}:{layout.CONSOLE_PORT}",
            "etcd": None
            if st.etcd is None
            else {
                "netns": layout.etcd_netns(st.name),
                "url": st.etcd_url,
                "pid": st.etcd.pid,
                "alive": st.etcd.alive(),
            },
            "nodes": nodes,
            "pods": pods,
        }

    def env(self) -> str:
        st = self.state()
        lines = [f"export MESH_STORE={st.store_url}"]
        if st.store == "etcd":
            lines.insert(
                0,
                "# etcd is reachable from the sandbox's namespaces only, e.g.: "
                f"scripts/sandbox --name {self.name} exec node/n1 -- meshctl …",
            )
        return "\n".join(lines)

    # ----- running things inside ---------------------------------------------------------------

    def netns_of(self, target: str | Pod) -> str:
        """`outside`, `etcd`, `underlay`, `node/nI`, `ns/pod` or `pod` → its network namespace."""
        if isinstance(target, Pod):
            return target.netns
        st = self.state()
        if target == "outside":
            return layout.outside_netns(st.name)
        if target == "underlay":
            return layout.underlay_netns(st.name)
        if target == "etcd":
            if st.etcd is None:
                raise SandboxError(f"sandbox {self.name!r} runs no etcd (store {st.store})")
            return layout.etcd_netns(st.name)
        if target.startswith("node/"):
            node = target.removeprefix("node/")
            if node not in st.nodes:
                raise SandboxError(f"sandbox {self.name!r} has no node {node!r}")
            return st.nodes[node].netns
        return self._find_pod(st, target, None).netns

    def exec(
        self,
        target: str | Pod,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
        input: str | bytes | None = None,
        text: bool = True,
        check: bool = False,
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv inside the target's namespace, wait (bounded), capture its output."""
        full = ["ip", "netns", "exec", self.netns_of(target), *argv]
        return subprocess.run(
            full, input=input, capture_output=True, text=text, timeout=timeout, check=check
        )

    def popen(self, target: str | Pod, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv inside the target's namespace; the caller owns (and must reap) it."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns_of(target), *argv], **kwargs)

    # ----- pods --------------------------------------------------------------------------------

    def pod_add(
        self,
        node: str,
        namespace: str,
        name: str,
        cmd: Sequence[str] | None = None,
        *,
        service_account: str = layout.DEFAULT_SERVICE_ACCOUNT,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> Pod:
        """Create a pod's namespace, run the node's CNI chain (ADD), then start cmd inside."""
        layout.check_namespace(namespace)
        layout.check_object_name("pod", name)
        layout.check_object_name("service account", service_account)
        with locked(self.state_dir):
            st = load(self.state_dir)
            key = f"{namespace}/{name}"
            if key in st.pods:
                raise SandboxError(f"pod {key} already exists (on {st.pods[key].node})")
            if node not in st.nodes:
                raise SandboxError(f"sandbox {self.name!r} has no node {node!r}")
            ns = st.nodes[node]
            netns = layout.pod_netns(st.name, node, namespace, name)
            if netns_exists(netns):
                raise SandboxError(f"network namespace {netns} already exists")
            netconf = self._read_conflist(ns)
            container_id = secrets.token_hex(32)
            uid = str(uuid.uuid4())
            ps = PodState(
                namespace=namespace,
                name=name,
                node=node,
                netns=netns,
                uid=uid,
                container_id=container_id,
                cni_args=layout.cni_args(
                    namespace=namespace,
                    pod=name,
                    container_id=container_id,
                    uid=uid,
                    labels=labels or {},
                    annotations=annotations or {},
                    service_account=service_account,
                ),
                log=str(self.state_dir / "pods" / namespace / f"{name}.log"),
                cmd=list(cmd or []),
                netconf=netconf,
            )
            # Recorded first, so a crash from here on is still undone by `down`.
            st.pods[key] = ps
            save(st)
            try:
                self._pod_network(st, ps)
                if ps.cmd:
                    self._pod_start(ps)
            except BaseException as e:
                try:
                    self._pod_teardown(st, ps)
                except SandboxError as cleanup:
                    e.add_note(f"while undoing the pod: {cleanup}")
                del st.pods[key]
                save(st)
                raise
            save(st)
            self._say(f"pod {key} on {node}: {ps.ip}")
            return _pod(ps)

    def pod_del(self, name: str, namespace: str | None = None) -> bool:
        """Stop the pod's processes, DEL its CNI chain, delete its namespace. False if absent."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            try:
                ps = self._find_pod(st, name, namespace)
            except SandboxError:
                return False
            self._pod_teardown(st, ps)
            del st.pods[ps.key]
            save(st)
            self._say(f"pod {ps.key} deleted")
            return True

    def containerd(self, node: str) -> containerd.Containerd:
        """The node's containerd (`start()` it): pods made by `ctr run --cni`, see
        nodeagent/sandbox/containerd.py. `down` stops it and removes what it made."""
        ns = self._node_state(self.state(), node)
        return containerd.Containerd(self.name, ns.netns, layout.NodePaths(Path(ns.run_dir)))

    def pod_check(self, name: str, namespace: str | None = None) -> None:
        """CNI CHECK of the pod's cached chain (in order, with the cached result), as libcni's
        CheckNetworkList; raises CniError naming the first plugin that found a problem."""
        st = self.state()
        ps = self._find_pod(st, name, namespace)
        assert ps.netconf is not None
        cni.check(st.nodes[ps.node].netns, ps.netconf, self._invocation(st, ps), ps.result)

    # ----- agents ------------------------------------------------------------------------------

    def start_agent(
        self,
        node: str,
        *,
        wait: bool = True,
        timeout: float = READY_TIMEOUT,
        args: Sequence[str] | None = None,
    ) -> None:
        """Start the node's agent; `args` (extra `nodeagent run` arguments, e.g. `--drain-timeout
        2`) replace the previous ones and are kept for later starts and restarts."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            ns = self._node_state(st, node)
            if ns.agent and ns.agent.alive():
                raise SandboxError(f"the agent of {node} already runs (pid {ns.agent.pid})")
            if args is not None:
                ns.agent_args = list(args)
            self._spawn_agent(st, ns)
            save(st)
        if wait:
            self.wait_agents_ready([node], timeout=timeout)

    def stop_agent(self, node: str, *, grace: float = AGENT_GRACE) -> None:
        """Stop the agent at once (SIGINT to its process group: no drain), SIGKILL after
        `grace` seconds."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            ns = self._node_state(st, node)
            if ns.agent is not None:
                self._say(f"stopping agent of {node} (pid {ns.agent.pid})")
                stop_all(
                    [ns.agent], grace=grace, group=True, children=_CHILDREN, first=signal.SIGINT
                )
                ns.agent = None
                save(st)
            self._remove_agent_container(st, ns)

    def kill_agent(self, node: str) -> None:
        """kill -9 the agent (an agent crash: its pods' rules stay, nothing serves them)."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            ns = self._node_state(st, node)
            if ns.agent is not None:
                self._say(f"killing agent of {node} (pid {ns.agent.pid})")
                stop_all([ns.agent], grace=0, group=True, children=_CHILDREN, first=signal.SIGKILL)
                ns.agent = None
                save(st)
            self._remove_agent_container(st, ns)

    def restart_agent(
        self,
        node: str,
        *,
        timeout: float = READY_TIMEOUT,
        grace: float = AGENT_GRACE,
        takeover: bool = False,
    ) -> AgentRestart:
        """A graceful restart, as a DaemonSet rollout does it: SIGTERM the running agent, start
        the new one as soon as the old released its pid file (it drains meanwhile), wait for the
        new one to be ready, then for the old one to finish draining (SIGKILL after its drain
        deadline plus `grace`).

        With `takeover`, as a rollout with `maxSurge: 1` does it: the new agent starts beside
        the old one with `--takeover` (it asks the old one to hand over); the old one must then
        drain and park (alive, serving nothing) until its own SIGTERM, sent once its drain time
        is over, as the DaemonSet controller deletes the old pod. `sigterm_at` is then when the
        new agent was started."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            ns = self._node_state(st, node)
            old = ns.agent
            if old is None or not old.alive():
                raise SandboxError(f"the agent of {node} does not run: nothing to restart")
            if st.agent_image is not None:  # two containers of one node would share its name
                raise SandboxError("a graceful restart of a containerised agent is not supported")
            run_dir = Path(ns.run_dir)
            sigterm_at = time.monotonic()
            if takeover:
                self._say(f"taking over from the agent of {node} (pid {old.pid} hands over)")
            else:
                self._say(f"restarting agent of {node} (pid {old.pid} drains)")
                os.kill(old.pid, signal.SIGTERM)
                deadline = time.monotonic() + grace
                while _pid_file_names(run_dir, old.pid):
                    if time.monotonic() > deadline:
                        raise SandboxError(f"the agent of {node} kept its pid file after SIGTERM")
                    time.sleep(0.01)
            log_path = layout.NodePaths(run_dir).agent_log
            log_start = log_path.stat().st_size if log_path.exists() else 0
            self._spawn_agent(st, ns, extra=["--takeover"] if takeover else [])
            save(st)
        self.wait_agents_ready([node], timeout=timeout)
        ready_at = time.monotonic()
        deadline = time.monotonic() + self._drain_timeout(ns) + grace
        if takeover:
            # The old agent drains, then logs `agent.parked` and idles (both write this log).
            while not _logged_since(log_path, log_start, "agent.parked"):
                if not old.alive():
                    raise SandboxError(f"the old agent of {node} exited instead of parking")
                if time.monotonic() > deadline:
                    raise SandboxError(f"the old agent of {node} did not park after the handover")
                time.sleep(0.05)
            os.kill(old.pid, signal.SIGTERM)  # the old pod's deletion
            deadline = time.monotonic() + grace
        while old.alive() and time.monotonic() < deadline:
            reap(_CHILDREN)
            time.sleep(0.05)
        if takeover and old.alive():
            stop_all([old], grace=0, children=_CHILDREN, first=signal.SIGKILL)
            raise SandboxError(f"the parked agent of {node} ignored its SIGTERM ({grace} s)")
        stop_all([old], grace=0, children=_CHILDREN, first=signal.SIGKILL)  # if it hangs
        return AgentRestart(sigterm_at, ready_at, time.monotonic())

    @staticmethod
    def _drain_timeout(ns: NodeState) -> float:
        args = ns.agent_args
        if "--drain-timeout" in args[:-1]:
            return float(args[args.index("--drain-timeout") + 1])
        return DRAIN_TIMEOUT

    # ----- the store (etcd) --------------------------------------------------------------------

    def pause_store(self) -> None:
        """SIGSTOP etcd: a stalled store (connections stay open, nothing answers, leases age)."""
        self._signal_etcd(signal.SIGSTOP)

    def resume_store(self) -> None:
        """SIGCONT etcd after `pause_store`."""
        self._signal_etcd(signal.SIGCONT)

    def stop_store(self, *, grace: float = AGENT_GRACE) -> None:
        """Stop etcd (its data dir stays): connections are refused until `start_store`."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            ref = self._etcd_ref(st)
            self._say(f"stopping etcd (pid {ref.pid})")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ref.pid, signal.SIGCONT)  # a paused etcd cannot act on SIGTERM
            stop_all([ref], grace=grace, group=True, children=_CHILDREN)
            st.etcd = None
            save(st)

    def start_store(self) -> None:
        """Start etcd again after `stop_store`, on the same data (leases, keys), and wait for it."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            if st.store != "etcd":
                raise SandboxError(f"sandbox {self.name!r} runs no etcd (store {st.store})")
            if st.etcd is not None and st.etcd.alive():
                raise SandboxError(f"etcd already runs (pid {st.etcd.pid})")
            self._say("starting etcd again")
            self._spawn_etcd(st)

    def _signal_etcd(self, sig: signal.Signals) -> None:
        ref = self._etcd_ref(self.state())
        self._say(f"{sig.name} to etcd (pid {ref.pid})")
        os.killpg(ref.pid, sig)

    def _etcd_ref(self, st: State) -> ProcessRef:
        if st.etcd is None or not st.etcd.alive():
            raise SandboxError(f"sandbox {self.name!r} has no running etcd (store {st.store})")
        return st.etcd

    # ----- the CA -------------------------------------------------------------------------------

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def ca_log(self) -> Path:
        return self.state_dir / "ca.log"

    def start_ca(self, *, ttl: str = "24h", wait: bool = True) -> None:
        """Start the CA's signer again (after `stop_ca`), with certificates of lifetime `ttl`."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            if st.ca is not None and st.ca.alive():
                raise SandboxError(f"the CA already runs (pid {st.ca.pid})")
            if not (self.ca_dir / "ca.key").exists():
                self._init_ca()
            self._spawn_ca(st, ttl)
            save(st)
        if wait:
            self._wait_ca(self.state())

    def stop_ca(self, *, grace: float = AGENT_GRACE) -> None:
        """SIGTERM the CA's process group (SIGKILL after `grace`); agents keep their certs."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            if st.ca is not None:
                self._say(f"stopping the CA (pid {st.ca.pid})")
                stop_all([st.ca], grace=grace, group=True, children=_CHILDREN)
                st.ca = None
                save(st)

    def _init_ca(self) -> None:
        from nodeagent.ca import files

        self._say(f"creating the CA in {self.ca_dir}")
        try:
            files.init(self.ca_dir, CA_TRUST_DOMAIN)
        except (files.CaDirError, OSError) as e:
            raise SandboxError(f"ca init in {self.ca_dir}: {e}") from e

    def _spawn_ca(self, st: State, ttl: str) -> None:
        first = next(iter(st.nodes.values()))  # etcd is reachable from the nodes' namespaces
        argv = [
            "ip", "netns", "exec", first.netns,
            str(Path(sys.prefix) / "bin" / "nodeagent"), "ca", "serve",
            "--dir", str(self.ca_dir), "--store", st.store_url, "--ttl", ttl,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._say(f"starting the CA in {first.netns} (log {self.ca_log})")
        proc, ref = spawn(argv, log=self.ca_log, env=env)
        _CHILDREN[proc.pid] = proc
        st.ca = ref

    def _start_console(self, st: State) -> None:
        """`nodeagent console` in a namespace of its own on the underlay, guarded by a token
        (it listens beyond loopback); nothing listens in the machine's own namespace."""
        netns = layout.console_netns(self.name)
        self._say(f"starting the console in {netns} ({layout.CONSOLE_IP}:{layout.CONSOLE_PORT})")
        self._attach(st, netns, layout.CONSOLE_IP, "v-cp")
        ip("link", "set", "lo", "up", netns=netns)
        old = os.umask(0o077)
        try:
            self.console_token_file.write_text(secrets.token_urlsafe(24) + "\n")
        finally:
            os.umask(old)
        argv = [
            "ip", "netns", "exec", netns,
            str(Path(sys.prefix) / "bin" / "nodeagent"), "console",
            "--listen", f"{layout.CONSOLE_IP}:{layout.CONSOLE_PORT}", "--store", st.store_url,
            "--token-file", str(self.console_token_file), "--refresh", "1",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc, ref = spawn(argv, log=self.console_log, env=env)
        _CHILDREN[proc.pid] = proc
        st.console = ref
        save(st)

    def _wait_console(self) -> None:
        """Until the console has bound its port (its `console.ready` log line)."""
        st = self.state()
        if st.console is None:
            return
        deadline = time.monotonic() + CA_TIMEOUT
        while True:
            try:
                text = self.console_log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            if '"console.ready"' in text or " console.ready " in text:
                self._say("console ready (scripts/sandbox console-url)")
                return
            if not st.console.alive():
                raise SandboxError(
                    f"the console exited at start; last lines of {self.console_log}:\n"
                    + _tail(self.console_log)
                )
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"the console not ready after {CA_TIMEOUT:.0f}s; see {self.console_log}"
                )
            reap(_CHILDREN)
            time.sleep(0.1)

    def _wait_ca(self, st: State) -> None:
        """Until the signer has published the trust bundle (its `ca.ready` log line)."""
        assert st.ca is not None
        deadline = time.monotonic() + CA_TIMEOUT
        while True:
            try:
                text = self.ca_log.read_text(errors="replace")
            except FileNotFoundError:
                text = ""
            if '"ca.ready"' in text or " ca.ready " in text:
                self._say("CA ready")
                return
            if not st.ca.alive():
                raise SandboxError(
                    f"the CA exited at start; last lines of {self.ca_log}:\n" + _tail(self.ca_log)
                )
            if time.monotonic() > deadline:
                raise SandboxError(f"the CA not ready after {CA_TIMEOUT:.0f}s; see {self.ca_log}")
            reap(_CHILDREN)
            time.sleep(0.1)

    # ----- the rollout controller ---------------------------------------------------------------

    @property
    def controller_log(self) -> Path:
        return self.state_dir / "controller.log"

    def start_controller(self, *, wait: bool = True) -> None:
        """Start the rollout controller again (after `stop_controller`)."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            if st.controller is not None and st.controller.alive():
                raise SandboxError(f"the controller already runs (pid {st.controller.pid})")
            offset = self._spawn_controller(st)
            save(st)
        if wait:
            self._wait_controller(self.state(), offset)

    def stop_controller(self, *, grace: float = AGENT_GRACE, kill: bool = False) -> None:
        """SIGTERM the controller's process group (SIGKILL after `grace`, or at once with
        `kill`: a crash, its leader lease left to expire)."""
        with locked(self.state_dir):
            st = load(self.state_dir)
            if st.controller is not None:
                self._say(f"stopping the controller (pid {st.controller.pid})")
                if kill and st.controller.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(st.controller.pid, signal.SIGKILL)
                stop_all([st.controller], grace=grace, group=True, children=_CHILDREN)
                st.controller = None
                save(st)

    def _spawn_controller(self, st: State) -> int:
        """Start it; returns where its log ends now (`_wait_controller` reads from there)."""
        offset = self.controller_log.stat().st_size if self.controller_log.exists() else 0
        first = next(iter(st.nodes.values()))  # reaches every node's 15020 over the underlay
        argv = [
            "ip", "netns", "exec", first.netns,
            str(Path(sys.prefix) / "bin" / "nodeagent"), "controller", "--store", st.store_url,
            # one name across restarts: a restarted controller takes its own lease key at once
            "--identity", f"sandbox-{st.name}", "--lease-ttl", "3", "--tick", "0.1",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._say(f"starting the rollout controller in {first.netns} (log {self.controller_log})")
        proc, ref = spawn(argv, log=self.controller_log, env=env)
        _CHILDREN[proc.pid] = proc
        st.controller = ref
        return offset

    def _wait_controller(self, st: State, start: int) -> None:
        """Until the controller leads (its `rollout.controller.leading` log line after `start`)."""
        assert st.controller is not None
        deadline = time.monotonic() + CA_TIMEOUT
        while True:
            try:
                with self.controller_log.open(errors="replace") as f:
                    f.seek(start)
                    text = f.read()
            except FileNotFoundError:
                text = ""
            if "rollout.controller.leading" in text:
                self._say("rollout controller leading")
                return
            if not st.controller.alive():
                raise SandboxError(
                    f"the controller exited at start; last lines of {self.controller_log}:\n"
                    + _tail(self.controller_log)
                )
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"the controller does not lead after {CA_TIMEOUT:.0f}s; "
                    f"see {self.controller_log}"
                )
            reap(_CHILDREN)
            time.sleep(0.1)

    def wait_agents_ready(
        self, nodes: Sequence[str] | None = None, *, timeout: float = READY_TIMEOUT
    ) -> None:
        st = self.state()
        pending = {n: st.nodes[n] for n in (nodes if nodes is not None else list(st.nodes))}
        start = time.monotonic()
        last_report = start
        while pending:
            for name, ns in list(pending.items()):
                log = layout.NodePaths(Path(ns.run_dir)).agent_log
                if ns.agent is None or not ns.agent.alive():
                    raise SandboxError(
                        f"the agent of {name} exited before it was ready; last lines of {log}:\n"
                        + _tail(log)
                    )
                if is_ready(layout.NodePaths(Path(ns.run_dir)).admin_socket):
                    del pending[name]
                    self._say(f"agent of {name} ready ({time.monotonic() - start:.1f}s)")
            if not pending:
                break
            reap(_CHILDREN)
            now = time.monotonic()
            if now - start > timeout:
                names = ", ".join(pending)
                raise SandboxError(
                    f"agents not ready after {timeout:.0f}s: {names}; see "
                    + ", ".join(
                        str(layout.NodePaths(Path(n.run_dir)).agent_log) for n in pending.values()
                    )
                )
            if now - last_report >= 3.0:
                last_report = now
                self._say(f"waiting for agents: {', '.join(pending)} ({now - start:.0f}s)")
            time.sleep(0.1)

    # ----- teardown ----------------------------------------------------------------------------

    def down(self, keep_logs: Path | None = None) -> None:
        """Remove everything this sandbox created. Idempotent; works after a partial `up`."""
        errors: list[str] = []
        own: list[str] = []
        if (self.state_dir / "state.json").exists():
            try:
                with locked(self.state_dir):
                    st = load(self.state_dir)
                    own = self._down_recorded(st, errors)
            except SandboxError as e:
                errors.append(str(e))
        if keep_logs is not None and self.state_dir.exists():
            self._copy_logs(keep_logs, errors)
        # Whatever the state says (or if it is lost): every namespace with one of our names.
        leftovers = [n for n in netns_list() if layout.is_own_netns(self.name, n) and n not in own]
        pods_first = sorted(leftovers, key=lambda n: (n.count("-") < 2, n))
        for n in own + pods_first:
            try:
                netns_delete(n)
            except SandboxError as e:
                errors.append(str(e))
        reap(_CHILDREN)
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.state_dir.parent.rmdir()  # only when no other sandbox is left
        if self.state_dir.exists():
            errors.append(f"could not remove {self.state_dir}")
        self._say("down")
        if errors:
            raise SandboxError("down finished with errors:\n  " + "\n  ".join(errors))

    def _down_recorded(self, st: State, errors: list[str]) -> list[str]:
        """containerd's pods and the sandbox's (their DEL needs the agents), then agents, then
        etcd; returns namespaces to drop, pods first, then in reverse creation order."""
        for ns in st.nodes.values():
            try:
                containerd.stop_leftover(st.name, ns.netns, layout.NodePaths(Path(ns.run_dir)))
            except SandboxError as e:
                errors.append(f"containerd of {ns.name}: {e}")
        pod_ns = []
        for ps in list(st.pods.values()):
            pod_ns.append(ps.netns)
            try:
                self._pod_teardown(st, ps)
                del st.pods[ps.key]
                save(st)
            except SandboxError as e:
                errors.append(f"pod {ps.key}: {e}")
        agents = [n.agent for n in st.nodes.values() if n.agent is not None]
        if agents:
            self._say(f"stopping {len(agents)} agent(s)")
            # SIGINT: stop without draining (nothing will take over).
            stop_all(agents, grace=AGENT_GRACE, group=True, children=_CHILDREN, first=signal.SIGINT)
        for ns in st.nodes.values():
            try:
                self._remove_agent_container(st, ns)
            except SandboxError as e:
                errors.append(str(e))
        if st.controller is not None:
            stop_all([st.controller], grace=AGENT_GRACE, group=True, children=_CHILDREN)
        if st.ca is not None:
            stop_all([st.ca], grace=AGENT_GRACE, group=True, children=_CHILDREN)
        if st.console is not None:
            stop_all([st.console], grace=AGENT_GRACE, group=True, children=_CHILDREN)
        if st.etcd is not None:
            stop_all([st.etcd], grace=AGENT_GRACE, group=True, children=_CHILDREN)
        return pod_ns + list(reversed(st.netns))

    def _copy_logs(self, dest: Path, errors: list[str]) -> None:
        try:
            for log in self.state_dir.rglob("*.log"):
                target = dest / log.relative_to(self.state_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(log, target)
            self._say(f"logs copied to {dest}")
        except OSError as e:
            errors.append(f"copying logs to {dest}: {e}")

    # ----- internals ---------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.progress:
            print(f"sandbox[{self.name}]: {msg}", file=sys.stderr, flush=True)

    @staticmethod
    def _default_cni_path() -> list[str]:
        return [layout.CNI_BIN_DIR, str(REPO_ROOT / "cni-plugin")]

    @staticmethod
    def _default_agent_cmd() -> list[str]:
        return [str(Path(sys.prefix) / "bin" / "nodeagent"), "run"]

    def _check_absent(self) -> None:
        if self.state_dir.exists():
            raise SandboxError(
                f"sandbox {self.name!r} already exists ({self.state_dir}); "
                f"run `sandbox --name {self.name} down` first"
            )
        stray = [n for n in netns_list() if layout.is_own_netns(self.name, n)]
        if stray:
            raise SandboxError(
                f"network namespaces of sandbox {self.name!r} exist without its state: "
                f"{', '.join(stray)}; run `sandbox --name {self.name} down` first"
            )

    def _build(
        self,
        *,
        nodes: int,
        store: str,
        agents: bool,
        mesh_cni: bool,
        cni_path: list[str],
        agent_cmd: list[str],
        ready_timeout: float,
        ca_ttl: str = "24h",
        gateway: str | None = None,
        agent_image: str | None = None,
        image_store: str | None = None,
        workers: int | None = None,
    ) -> None:
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700)
        st = State(
            name=self.name,
            state_dir=str(self.state_dir),
            store=store,
            store_url=layout.store_url(store, self.state_dir),
            cni_path=cni_path,
            agents=agents,
            agent_cmd=agent_cmd,
            mesh_cni=mesh_cni,
            outside_ip=layout.OUTSIDE_IP,
            gateway=gateway,
            agent_image=agent_image,
            image_store=image_store,
        )
        save(st)
        with locked(self.state_dir):
            self._say(f"creating underlay {layout.underlay_netns(self.name)}")
            ul = layout.underlay_netns(self.name)
            self._netns_add(st, ul)
            ip("link", "add", layout.UNDERLAY_BRIDGE, "type", "bridge", netns=ul)
            ip("link", "set", layout.UNDERLAY_BRIDGE, "up", netns=ul)
            for i in range(1, nodes + 1):
                self._add_node(st, i, nodes, mesh_cni)
            self._say(f"creating outside host {layout.outside_netns(self.name)} ({st.outside_ip})")
            self._attach(st, layout.outside_netns(self.name), st.outside_ip, "v-out")
            if store == "etcd":
                self._start_etcd(st)
            if agents:
                self._init_ca()
                self._spawn_ca(st, ca_ttl)
                save(st)
                self._wait_ca(st)
                self._start_console(st)
                for ns in st.nodes.values():
                    if workers is not None:
                        ns.agent_args = ["--workers", str(workers)]
                    self._spawn_agent(st, ns)
                controller_log = self._spawn_controller(st)
                save(st)
        if agents:
            self.wait_agents_ready(timeout=ready_timeout)
            self._wait_console()
            self._wait_controller(self.state(), controller_log)
        self._say(f"up: {nodes} node(s), store {st.store_url}")

    def _netns_add(self, st: State, name: str) -> None:
        st.netns.append(name)
        save(st)
        netns_add(name)

    def _attach(self, st: State, netns: str, address: str, peer: str) -> None:
        """A namespace on the underlay: veth `eth0` inside, its peer on the underlay bridge."""
        ul = layout.underlay_netns(self.name)
        self._netns_add(st, netns)
        ip("link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", netns, netns=ul)
        ip("link", "set", peer, "master", layout.UNDERLAY_BRIDGE, "up", netns=ul)
        ip("addr", "add", f"{address}/{layout.UNDERLAY_PREFIXLEN}", "dev", "eth0", netns=netns)
        ip("link", "set", "eth0", "up", netns=netns)

    def _add_node(self, st: State, i: int, total: int, mesh_cni: bool) -> None:
        name = layout.node_name(i)
        netns = layout.node_netns(self.name, name)
        paths = layout.node_paths(self.state_dir, name)
        ns = NodeState(
            name=name,
            index=i,
            netns=netns,
            underlay_ip=layout.node_underlay_ip(i),
            pod_cidr=layout.pod_cidr(i),
            gateway=layout.pod_gateway(i),
            run_dir=str(paths.run_dir),
        )
        st.nodes[name] = ns
        self._say(f"creating node {name} ({netns}, {ns.underlay_ip}, pods {ns.pod_cidr})")
        self._attach(st, netns, ns.underlay_ip, f"v-{name}")
        run(
            ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            what=f"enable forwarding in {netns}",
        )
        for j in range(1, total + 1):
            if j != i:
                ip(
                    "route",
                    "add",
                    layout.pod_cidr(j),
                    "via",
                    layout.node_underlay_ip(j),
                    netns=netns,
                )
        paths.conf_dir.mkdir(parents=True, exist_ok=True)
        paths.ipam_dir.mkdir(parents=True, exist_ok=True)
        paths.conflist.write_text(
            json.dumps(layout.conflist(i, paths, mesh_cni=mesh_cni), indent=2) + "\n"
        )
        save(st)

    def _start_etcd(self, st: State) -> None:
        netns = layout.etcd_netns(self.name)
        self._say(f"starting etcd in {netns} ({layout.ETCD_IP}:{layout.ETCD_CLIENT_PORT})")
        self._attach(st, netns, layout.ETCD_IP, "v-etcd")
        self._spawn_etcd(st)

    def _spawn_etcd(self, st: State) -> None:
        """Start etcd on its data dir in its (existing) namespace and wait for its /health."""
        netns = layout.etcd_netns(self.name)
        client = f"http://{layout.ETCD_IP}:{layout.ETCD_CLIENT_PORT}"
        peer = "http://127.0.0.1:2380"
        argv = [
            "ip", "netns", "exec", netns, "etcd",
            "--name", "sandbox",
            "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", f"{client},http://127.0.0.1:{layout.ETCD_CLIENT_PORT}",
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"sandbox={peer}",
            "--initial-cluster-state", "new",
        ]  # fmt: skip
        proc, ref = spawn(argv, log=self.state_dir / "etcd.log")
        _CHILDREN[proc.pid] = proc
        st.etcd = ref
        st.etcd_url = client
        save(st)
        deadline = time.monotonic() + ETCD_TIMEOUT
        while True:
            if not ref.alive():
                raise SandboxError(
                    f"etcd exited at start; last lines of {self.state_dir / 'etcd.log'}:\n"
                    + _tail(self.state_dir / "etcd.log")
                )
            probe = subprocess.run(
                ["ip", "netns", "exec", netns, "curl", "-sf", "-m", "1", f"{client}/health"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            if probe.returncode == 0 and '"true"' in probe.stdout:
                self._say("etcd ready")
                return
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"etcd not healthy after {ETCD_TIMEOUT:.0f}s; see {self.state_dir / 'etcd.log'}"
                )
            time.sleep(0.2)

    def _spawn_agent(self, st: State, ns: NodeState, extra: Sequence[str] = ()) -> None:
        if st.agent_image is not None:
            self._spawn_agent_container(st, ns)
            return
        paths = layout.NodePaths(Path(ns.run_dir))
        argv = [
            "ip", "netns", "exec", ns.netns, *st.agent_cmd,
            "--node", ns.name, "--store", st.store_url, "--run-dir", ns.run_dir,
            "--advertise-address", ns.underlay_ip,
        ]  # fmt: skip
        if st.gateway == ns.name:
            argv += ["--gateway", "--gateway-credentials", str(self.gateway_credentials_dir)]
        argv += [*_with_workers(ns.agent_args), *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._say(f"starting agent of {ns.name} (log {paths.agent_log})")
        proc, ref = spawn(argv, log=paths.agent_log, env=env)
        _CHILDREN[proc.pid] = proc
        ns.agent = ref

    def _spawn_agent_container(self, st: State, ns: NodeState) -> None:
        """The agent as the DaemonSet runs it; the recorded process is the agent itself (not
        the podman client), so signals and `agent_pid` mean what they mean for a process."""
        assert st.agent_image is not None
        assert st.image_store is not None
        paths = layout.NodePaths(Path(ns.run_dir))
        store = Path(st.image_store)
        args = ["--node", ns.name, "--store", st.store_url, *_workers_args(ns.agent_args)]
        mounts = [st.state_dir] if st.store == "sqlite" else []
        if st.gateway == ns.name:
            args += ["--gateway", "--gateway-credentials", str(self.gateway_credentials_dir)]
            mounts.append(str(self.gateway_credentials_dir))
        argv = container.agent_run_argv(
            store,
            st.agent_image,
            sandbox=st.name,
            node=ns.name,
            node_netns=ns.netns,
            run_dir=ns.run_dir,
            # The sqlite store's directory, as the embedded overlay mounts /var/lib/nodeagent.
            extra_mounts=mounts,
            agent_args=args,
        )
        self._say(f"starting agent of {ns.name} in {st.agent_image} (log {paths.agent_log})")
        client, _ = spawn(argv, log=paths.agent_log)
        _CHILDREN[client.pid] = client
        name = container.container_name(st.name, ns.name)
        ns.agent = ProcessRef.of(container.wait_container_pid(store, name, client, paths.agent_log))

    @staticmethod
    def _remove_agent_container(st: State, ns: NodeState) -> None:
        if st.agent_image is not None and st.image_store is not None:
            container.remove_container(
                Path(st.image_store), container.container_name(st.name, ns.name)
            )
            reap(_CHILDREN)

    @staticmethod
    def _node_state(st: State, node: str) -> NodeState:
        if node not in st.nodes:
            raise SandboxError(f"sandbox {st.name!r} has no node {node!r}")
        return st.nodes[node]

    def _find_pod(self, st: State, ref: str, namespace: str | None) -> PodState:
        if "/" in ref:
            namespace, _, ref = ref.partition("/")
        if namespace is not None:
            key = f"{namespace}/{ref}"
            if key not in st.pods:
                raise SandboxError(f"sandbox {self.name!r} has no pod {key}")
            return st.pods[key]
        default = f"{layout.DEFAULT_NAMESPACE}/{ref}"
        if default in st.pods:
            return st.pods[default]
        matches = [p for p in st.pods.values() if p.name == ref]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise SandboxError(f"sandbox {self.name!r} has no pod named {ref!r}")
        raise SandboxError(
            f"pod name {ref!r} is ambiguous: {', '.join(p.key for p in matches)}; use ns/name"
        )

    def _read_conflist(self, ns: NodeState) -> dict[str, Any]:
        # Read at every ADD, as a runtime reads its conf dir; DEL uses the copy cached at ADD.
        path = layout.NodePaths(Path(ns.run_dir)).conflist
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SandboxError(f"cannot read the CNI config {path}: {e}") from e
        cni.check_netconf(doc, str(path))
        assert isinstance(doc, dict)
        return doc

    def _invocation(self, st: State, ps: PodState) -> cni.Invocation:
        return cni.Invocation(
            container_id=ps.container_id,
            netns_path=str(Path("/run/netns") / ps.netns),
            ifname="eth0",
            args=ps.cni_args,
            cni_path=st.cni_path,
        )

    def _pod_network(self, st: State, ps: PodState) -> None:
        assert ps.netconf is not None
        netns_add(ps.netns)
        node_ns = st.nodes[ps.node].netns
        ps.result = cni.add(node_ns, ps.netconf, self._invocation(st, ps))
        ps.ip = cni.pod_ip(ps.result)
        save(st)

    def _pod_start(self, ps: PodState) -> None:
        proc, ref = spawn(["ip", "netns", "exec", ps.netns, *ps.cmd], log=Path(ps.log))
        _CHILDREN[proc.pid] = proc
        ps.process = ref
        try:
            rc = proc.wait(timeout=POD_START_CHECK)
        except subprocess.TimeoutExpired:
            return
        if rc != 0:
            raise SandboxError(
                f"pod command {ps.cmd!r} exited with status {rc} at once; "
                f"last lines of {ps.log}:\n{_tail(Path(ps.log))}"
            )

    def _pod_teardown(self, st: State, ps: PodState) -> None:
        """Processes, then the CNI chain's DEL (reverse order, with the cached result, stopping
        at the first plugin that fails, as libcni does), then the namespace. Raises (after
        deleting the namespace) when a plugin's DEL failed: the pod stays recorded, so the next
        `pod del` (or `down`) runs the DEL again, as a kubelet retries it."""
        if ps.process is not None:
            stop_all([ps.process], grace=POD_GRACE, group=True, children=_CHILDREN)
        error: CniError | None = None
        if ps.netconf is not None and ps.node in st.nodes and netns_exists(st.nodes[ps.node].netns):
            try:
                cni.delete(st.nodes[ps.node].netns, ps.netconf, self._invocation(st, ps), ps.result)
            except CniError as e:
                error = e
        netns_delete(ps.netns)
        if error is not None:
            raise SandboxError(f"pod {ps.key}: CNI DEL failed: {error}")


@contextlib.contextmanager
def sandbox(
    name: str = layout.DEFAULT_NAME,
    nodes: int = 2,
    store: str = "sqlite",
    agents: bool = True,
    **kwargs: Any,
) -> Iterator[Sandbox]:
    """`with sandbox("t1", nodes=2) as sb: …` — up on entry, down on exit (even on failure)."""
    sb = Sandbox.up(name, nodes, store, agents, **kwargs)
    try:
        yield sb
    finally:
        sb.down()


# Agents in the sandbox serve in one process unless a test asks for more (`start_agent(node,
# args=["--workers", "2"])`): several agents, the load and the servers share a few cores here.
SANDBOX_WORKERS = 1


def _workers_args(args: Sequence[str]) -> list[str]:
    """The `--workers` pair of `args`, or the sandbox's default."""
    if "--workers" in args[:-1]:
        i = list(args).index("--workers")
        return ["--workers", args[i + 1]]
    return ["--workers", str(SANDBOX_WORKERS)]


def _with_workers(args: Sequence[str]) -> list[str]:
    return list(args) if "--workers" in args else [*_workers_args(args), *args]
