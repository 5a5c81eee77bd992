"""daemonset/: every rendered manifest validates offline against the Kubernetes OpenAPI schemas
(kubernetes-validate, strict), the DaemonSet has what the design needs and no more, and the RBAC
grants exactly the verbs kube-sync's code sends (recorded by the API double)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import trio
import yaml
from apiserver import FakeApiServer
from kube_helpers import TIMEOUT, fixture, memory_client, service
from kustomize_render import render

from nodeagent.contract import METRICS_PORT, READY_PATH
from nodeagent.kube.cli import KubeSync
from nodeagent.kube.leader import LeaderElector
from nodeagent.kube.resources import ALL
from nodeagent.store import open_store

DAEMONSET = Path(__file__).resolve().parents[2] / "daemonset"
K8S_VERSION = "1.31.0"
LAYOUTS = {
    "default": DAEMONSET,
    "embedded": DAEMONSET / "overlays" / "embedded",
    "external-etcd": DAEMONSET / "overlays" / "external-etcd",
}


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_manifest_validates_offline(layout: str) -> None:
    docs = render(LAYOUTS[layout])
    assert len(docs) >= 15
    for doc in docs:
        ref = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{layout}: {ref}: {exc.message} at {list(exc.path)}")
        if doc["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ):
            assert doc["metadata"]["namespace"] == "mesh-system", ref


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kubectl_kustomize_renders_the_same_valid_objects(layout: str) -> None:
    """The real kustomize (built into kubectl) renders what our renderer does, and it validates."""
    kubectl = shutil.which("kubectl")
    # The machine image's kubectl (google-cloud-cli, kustomize v5); Debian's kubernetes-client
    # 1.20 embeds kustomize v2, which cannot read these kustomizations.
    assert kubectl, "kubectl with kustomize v4 or later is required for this test"
    done = subprocess.run(
        [kubectl, "kustomize", str(LAYOUTS[layout])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    real = [d for d in yaml.safe_load_all(done.stdout) if d]
    for doc in real:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)

    def key(d: dict[str, Any]) -> str:
        return f"{d['kind']}/{d['metadata'].get('namespace', '')}/{d['metadata']['name']}"

    ours = {key(d): d for d in render(LAYOUTS[layout])}
    assert {key(d): d for d in real} == ours


def test_validator_rejects_a_broken_manifest() -> None:
    """The validation above can fail: a typo'd field is refused in strict mode."""
    ds = by_kind(render(DAEMONSET), "DaemonSet", "nodeagent")
    ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurg"] = 0
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_store_url_per_overlay() -> None:
    urls = {
        name: by_kind(render(path), "ConfigMap", "mesh-config")["data"]["MESH_STORE"]
        for name, path in LAYOUTS.items()
    }
    assert urls["embedded"] == "sqlite:///var/lib/nodeagent/mesh.db"
    assert urls["external-etcd"].startswith("etcd://")
    assert urls["default"] == urls["external-etcd"]
    embedded = render(LAYOUTS["embedded"])
    assert by_kind(embedded, "Deployment", "kube-sync")["spec"]["replicas"] == 1
    for kind, name in (
        ("DaemonSet", "nodeagent"),
        ("Deployment", "kube-sync"),
        ("Deployment", "mesh-ca"),
        ("Deployment", "mesh-console"),
        ("Deployment", "mesh-controller"),
    ):
        pod = by_kind(embedded, kind, name)["spec"]["template"]["spec"]
        mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert "/var/lib/nodeagent" in mounts, f"{kind}/{name}"


def test_daemonset_shape() -> None:
    docs = render(DAEMONSET)
    ds = by_kind(docs, "DaemonSet", "nodeagent")
    spec = ds["spec"]
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    agent = next(c for c in pod["containers"] if c["name"] == "agent")
    sc = agent["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]}
    assert agent["readinessProbe"]["httpGet"] == {"path": READY_PATH, "port": METRICS_PORT}
    # A surge pod beside the old one: it takes over, declares no host port (the scheduler would
    # refuse it), and no preStop drains through the run dir's admin socket (the new agent's).
    assert "--takeover" in agent["args"]
    assert "ports" not in agent
    assert "lifecycle" not in agent
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/run/netns"]["mountPropagation"] == "HostToContainer"
    assert "/run/nodeagent" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert {"/opt/cni/bin", "/etc/cni/net.d", "/run/netns", "/run/nodeagent"} <= host_paths
    cni = next(c for c in pod["containers"] if c["name"] == "install-cni")
    assert "--watch" in cni["args"]
    assert "--uninstall-flag=/etc/nodeagent/cni-uninstall" in cni["args"]
    assert by_kind(docs, "ConfigMap", "mesh-config")["data"]["cni-uninstall"] == "false"
    ca = by_kind(docs, "Deployment", "mesh-ca")["spec"]["template"]["spec"]
    assert {"name": "ca-secret", "secret": {"secretName": "mesh-ca", "defaultMode": 0o440}} in ca[
        "volumes"
    ]
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    mirrored_crds = {
        f"{r.plural}.{r.group}"
        for r in ALL
        if r.group.endswith("istio.io") or r.group == "mesh.nodeagent.io"
    }
    assert crds == mirrored_crds


def test_console_is_a_token_guarded_cluster_service_and_agents_publish_their_address() -> None:
    docs = render(DAEMONSET)
    pod = by_kind(docs, "Deployment", "mesh-console")["spec"]["template"]["spec"]
    (console,) = pod["containers"]
    args = console["args"]
    assert args[:3] == ["console", "--listen", "0.0.0.0:20001"]
    assert args[args.index("--token-file") + 1] == "/etc/mesh-console/token"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["token"]["secret"]["secretName"] == "mesh-console-token"
    svc = by_kind(docs, "Service", "mesh-console")["spec"]
    assert svc["type"] == "ClusterIP"
    assert svc["ports"][0]["port"] == 20001
    agent = next(
        c
        for c in by_kind(docs, "DaemonSet", "nodeagent")["spec"]["template"]["spec"]["containers"]
        if c["name"] == "agent"
    )
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"


def granted(docs: list[dict[str, Any]], account: str) -> set[tuple[str, str, str]]:
    """(verb, group, resource) the ServiceAccount gets from every (Cluster)Role bound to it."""
    roles = {
        (d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in ("Role", "ClusterRole")
    }
    out: set[tuple[str, str, str]] = set()
    for binding in docs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == account for s in binding["subjects"]
        ):
            continue
        role = roles[(binding["roleRef"]["kind"], binding["roleRef"]["name"])]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"]
            assert "*" not in rule["resources"]
            for verb in rule["verbs"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        out.add((verb, group, resource))
    return out


async def test_rbac_grants_exactly_what_the_code_calls(autojump_clock: object) -> None:
    """Run kube-sync (all kinds, leader-elected) against the double; the requests it made are
    the RBAC it needs. Grants beyond them, or calls without a grant, fail the test."""
    api = FakeApiServer()
    api.apply(service("reviews", "10.96.44.7"))
    api.apply(fixture("pod"))
    store = await open_store("memory://")
    try:
        async with trio.open_nursery() as nursery:
            client = memory_client(api, nursery)
            elector = LeaderElector(
                client,
                namespace="mesh-system",
                name="kube-sync",
                identity="r1",
                lease_duration=15,
                renew_deadline=10,
                retry_period=2,
            )
            synced = trio.Event()

            async def lead() -> None:
                async with trio.open_nursery() as inner:
                    await inner.start(KubeSync(client, store, ALL).run)
                    synced.set()

            scope = trio.CancelScope()

            async def run() -> None:
                with scope:
                    await elector.run(lead)

            nursery.start_soon(run)
            with trio.fail_after(TIMEOUT):
                await synced.wait()
            await trio.sleep(5)  # a few renewals
            scope.cancel()  # and a release
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
    used = api.verbs()
    docs = render(DAEMONSET)
    assert granted(docs, "kube-sync") == used
    assert {v for v, _, r in used if r == "leases"} == {"get", "create", "update"}
    lease_rules = by_kind(docs, "Role", "mesh-kube-sync-leader")["rules"]
    assert all(r.get("resourceNames") == ["kube-sync"] for r in lease_rules if "get" in r["verbs"])
    # The agent and the CA call no Kubernetes API: nothing bound, no token mounted.
    for account in ("nodeagent", "mesh-ca"):
        assert granted(docs, account) == set()
        sa = by_kind(docs, "ServiceAccount", account)
        assert sa["automountServiceAccountToken"] is False
