"""The sandbox's pure parts: names, addresses, CNI config and args, plugin I/O shapes, state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.sandbox import CniError, SandboxError, cni, layout
from nodeagent.sandbox.cli import format_status
from nodeagent.sandbox.state import NodeState, PodState, State, load, save
from nodeagent.sandbox.system import ProcessRef


def test_addresses() -> None:
    assert layout.node_underlay_ip(1) == "10.200.0.11"
    assert layout.pod_cidr(3) == "10.201.3.0/24"
    assert layout.pod_gateway(3) == "10.201.3.1"
    assert layout.node_index("n12") == 12
    for bad in ("n0", "node1", "n", "n01"):
        with pytest.raises(SandboxError, match="invalid node name"):
            layout.node_index(bad)
    with pytest.raises(SandboxError, match="between 1 and"):
        layout.check_node_count(0)


def test_sandbox_names() -> None:
    assert layout.check_sandbox_name("mesh") == "mesh"
    for bad in ("", "Mesh", "1mesh", "me-sh", "a" * 21):
        with pytest.raises(SandboxError, match="invalid sandbox name"):
            layout.check_sandbox_name(bad)


def test_pod_netns_short_and_long() -> None:
    assert layout.pod_netns("mesh", "n1", "default", "web") == "mesh-n1-default-web"
    long1 = layout.pod_netns("mesh", "n1", "default", "x" * 80)
    long2 = layout.pod_netns("mesh", "n1", "default", "x" * 81)
    assert len(long1) <= layout.MAX_NETNS_LEN
    assert len(long2) <= layout.MAX_NETNS_LEN
    assert long1 != long2
    assert long1.startswith("mesh-n1-default-x")


@given(
    ns=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True),
    pod=st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,100}[a-z0-9])?", fullmatch=True),
)
def test_pod_netns_is_ours_and_bounded(ns: str, pod: str) -> None:
    name = layout.pod_netns("mesh", "n2", ns, pod)
    assert len(name) <= layout.MAX_NETNS_LEN
    assert layout.is_own_netns("mesh", name)
    assert not layout.is_own_netns("meshx", name)


def test_is_own_netns() -> None:
    for own in ("mesh-ul", "mesh-out", "mesh-etcd", "mesh-cp", "mesh-n1", "mesh-n12-default-web"):
        assert layout.is_own_netns("mesh", own)
    for other in (
        "mesh",
        "meshx-n1",
        "mesh-n0",
        "mesh-x",
        "other-n1",
        "mesh-ulx",
        "mesh-cpx",
        "scratch",
    ):
        assert not layout.is_own_netns("mesh", other)


def test_store_url() -> None:
    assert layout.store_url("sqlite", Path("/run/x")) == "sqlite:///run/x/mesh.db"
    assert layout.store_url("etcd", Path("/run/x")) == "etcd://10.200.0.2:2379"
    with pytest.raises(SandboxError, match="unknown store"):
        layout.store_url("redis", Path("/run/x"))


def test_conflist_chain() -> None:
    paths = layout.NodePaths(Path("/run/s/n2"))
    conf = layout.conflist(2, paths)
    assert [p["type"] for p in conf["plugins"]] == ["loopback", "bridge", "mesh-cni"]
    bridge = conf["plugins"][1]
    assert bridge["isGateway"] is True
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["dataDir"] == "/run/s/n2/ipam"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.201.2.0/24", "gateway": "10.201.2.1"}]]
    assert conf["plugins"][2]["agentSocket"] == "/run/s/n2/cni.sock"
    plain = layout.conflist(2, paths, mesh_cni=False)
    assert [p["type"] for p in plain["plugins"]] == ["loopback", "bridge"]


@given(
    labels=st.dictionaries(st.text(min_size=1), st.text()),
    annotations=st.dictionaries(st.text(min_size=1), st.text()),
    sa=st.text(),
)
def test_pod_meta_round_trip_and_cni_args_safe(
    labels: dict[str, str], annotations: dict[str, str], sa: str
) -> None:
    value = layout.encode_pod_meta(labels, annotations, sa)
    # CNI_ARGS splits on ';' and '=': neither may appear in the value (no base64 padding).
    assert ";" not in value
    assert "=" not in value
    assert layout.decode_pod_meta(value) == {
        "labels": labels,
        "annotations": annotations,
        "serviceAccount": sa,
    }


def test_cni_args() -> None:
    args = layout.cni_args(
        namespace="shop",
        pod="cart",
        container_id="c0ffee",
        uid="u-1",
        labels={"app": "cart"},
        annotations={},
        service_account="cart-sa",
    )
    pairs = [kv.split("=") for kv in args.split(";")]
    assert all(len(p) == 2 for p in pairs)  # exactly what Go's types.LoadArgs accepts
    d = dict(pairs)
    assert d["IgnoreUnknown"] == "1"
    assert d["K8S_POD_NAMESPACE"] == "shop"
    assert d["K8S_POD_NAME"] == "cart"
    assert d["K8S_POD_INFRA_CONTAINER_ID"] == "c0ffee"
    assert d["K8S_POD_UID"] == "u-1"
    assert layout.decode_pod_meta(d["MESH_POD_META"])["serviceAccount"] == "cart-sa"


def test_parse_kv_list() -> None:
    assert layout.parse_kv_list("--labels", "a=1,b=x=y,,c=") == {"a": "1", "b": "x=y", "c": ""}
    assert layout.parse_kv_list("--labels", None) == {}
    with pytest.raises(SandboxError, match="--labels: 'a' is not key=value"):
        layout.parse_kv_list("--labels", "a")


def test_plugin_config_injects_name_version_prev_result() -> None:
    netconf = {"name": "mesh", "cniVersion": "1.0.0", "plugins": []}
    plugin = {"type": "bridge", "bridge": "cni0", "prevResult": {"stale": True}}
    conf = json.loads(cni.plugin_config(netconf, plugin, {"ips": []}))
    assert conf == {
        "type": "bridge",
        "bridge": "cni0",
        "name": "mesh",
        "cniVersion": "1.0.0",
        "prevResult": {"ips": []},
    }
    assert "prevResult" not in json.loads(cni.plugin_config(netconf, plugin, None))
    assert plugin["prevResult"] == {"stale": True}  # the caller's config is not modified


def test_check_netconf() -> None:
    with pytest.raises(SandboxError, match="non-empty list"):
        cni.check_netconf({"name": "m", "cniVersion": "1.0.0", "plugins": []}, "x")
    with pytest.raises(SandboxError, match=r"plugins\[1\] has no 'type'"):
        cni.check_netconf({"name": "m", "cniVersion": "1", "plugins": [{"type": "a"}, {}]}, "x")
    with pytest.raises(SandboxError, match="'name'"):
        cni.check_netconf({"cniVersion": "1", "plugins": [{"type": "a"}]}, "x")


def test_parse_error_keeps_message_verbatim() -> None:
    out = json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "agent: try later", "details": "d"})
    e = cni.parse_error("mesh-cni", "ADD", 1, out.encode(), b"")
    assert isinstance(e, CniError)
    assert (e.msg, e.code, e.details, e.plugin) == ("agent: try later", 11, "d", "mesh-cni")
    assert "agent: try later" in str(e)
    raw = cni.parse_error("bridge", "ADD", 2, b"", b"panic: oops\n")
    assert raw.msg == "panic: oops"
    assert raw.code is None
    silent = cni.parse_error("bridge", "DEL", 2, b"", b"")
    assert "exited with status 2" in silent.msg


def test_pod_ip_prefers_the_pod_interface() -> None:
    result = {
        "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/x"}],
        "ips": [
            {"address": "127.0.0.1/8"},
            {"address": "fd00::2/64", "interface": 2},
            {"address": "10.201.1.1/24", "interface": 0},
            {"address": "10.201.1.5/24", "interface": 2},
        ],
    }
    assert cni.pod_ip(result) == "10.201.1.5"
    assert cni.pod_ip({"ips": [{"address": "10.0.0.9/24"}]}) == "10.0.0.9"
    with pytest.raises(SandboxError, match="no IPv4 address"):
        cni.pod_ip({"ips": [{"address": "127.0.0.1/8"}]})


def test_find_plugin(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "p").write_text("not executable")
    (b / "p").write_text("#!/bin/sh\n")
    (b / "p").chmod(0o755)
    assert cni.find_plugin("p", [str(a), str(b)]) == b / "p"
    with pytest.raises(SandboxError, match='failed to find plugin "q"'):
        cni.find_plugin("q", [str(a), str(b)])
    with pytest.raises(SandboxError, match="invalid CNI plugin type"):
        cni.find_plugin("../p", [str(a)])


def test_state_round_trip(tmp_path: Path) -> None:
    s = State(
        name="t",
        state_dir=str(tmp_path),
        store="sqlite",
        store_url="sqlite:///x",
        cni_path=["/usr/lib/cni"],
        agents=True,
        agent_cmd=["nodeagent", "run"],
        mesh_cni=True,
        outside_ip="10.200.0.100",
        netns=["t-ul", "t-n1"],
        nodes={
            "n1": NodeState(
                "n1",
                1,
                "t-n1",
                "10.200.0.11",
                "10.201.1.0/24",
                "10.201.1.1",
                "/r",
                agent=ProcessRef(10, 20),
            ),
        },
        pods={
            "d/p": PodState(
                "d",
                "p",
                "n1",
                "t-n1-d-p",
                "u",
                "c",
                "IgnoreUnknown=1",
                "/l",
                ip="10.201.1.2",
                process=ProcessRef(11, 21),
                result={"ips": []},
            ),
        },
    )
    save(s)
    assert load(tmp_path) == s
    (tmp_path / "state.json").write_text('{"version": 99}')
    with pytest.raises(SandboxError, match="state version 99"):
        load(tmp_path)
    (tmp_path / "state.json").write_text('{"version": 1}')
    with pytest.raises(SandboxError, match="malformed sandbox state"):
        load(tmp_path)


def test_process_ref_of_this_process() -> None:
    import os

    me = ProcessRef.of(os.getpid())
    assert me.alive()
    assert not ProcessRef(me.pid, me.start_time + 1).alive()  # a recycled pid is not ours
    assert ProcessRef.from_json(me.to_json()) == me
    assert ProcessRef.from_json({"pid": "x"}) is None


def test_format_status() -> None:
    doc = {
        "name": "m",
        "store_url": "sqlite:///x",
        "state_dir": "/run/x",
        "outside": {"netns": "m-out", "ip": "10.200.0.100"},
        "etcd": None,
        "nodes": [
            {
                "name": "n1",
                "netns": "m-n1",
                "underlay_ip": "10.200.0.11",
                "pod_cidr": "10.201.1.0/24",
                "agent_pid": 7,
                "agent_alive": True,
                "agent_ready": False,
            },
        ],
        "pods": [
            {
                "node": "n1",
                "namespace": "d",
                "name": "p",
                "ip": "10.201.1.2",
                "pid": None,
                "alive": False,
            }
        ],
    }
    text = format_status(doc)
    assert "n1    m-n1   10.200.0.11  10.201.1.0/24  7          yes    no" in text
    assert "d/p" in text


def test_check_refuses_a_list_older_than_0_4_0_before_running_anything() -> None:
    inv = cni.Invocation("c", "/run/netns/p", "eth0", "", ["/nonexistent"])
    old = {"name": "n", "cniVersion": "0.3.1", "plugins": [{"type": "bridge"}]}
    with pytest.raises(SandboxError, match=r"'0\.3\.1' does not support the CHECK command"):
        cni.check("no-such-netns", old, inv, None)
    # disableCheck: libcni calls no plugin at all (none exists in this CNI_PATH).
    cni.check("no-such-netns", {**old, "cniVersion": "1.0.0", "disableCheck": True}, inv, None)
    with pytest.raises(SandboxError, match='failed to find plugin "bridge"'):
        cni.check("no-such-netns", {**old, "cniVersion": "1.0.0"}, inv, None)
