"""The mesh-cni executable, run as a runtime runs it (env + stdin), against a real CniServer."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from cni_fakes import RecordingHandler

from nodeagent.cni.errors import EnrollError
from nodeagent.cni.install import DEFAULT_PLUGIN_SOURCE, install_binary
from nodeagent.cni.protocol import Command
from nodeagent.cni.server import CniServer

PREV = {
    "cniVersion": "1.1.0",
    "interfaces": [
        {"name": "cni0", "mac": "0a:58:0a:16:00:01"},
        {"name": "eth0", "mac": "0a:58:0a:16:00:05", "sandbox": "/var/run/netns/pod-1"},
    ],
    "ips": [{"address": "10.22.0.5/16", "gateway": "10.22.0.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
V7 = msgpack.packb({"v": 7, "ok": True})
POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_UID=uid-1"


@pytest.fixture
def plugin(sock_dir: Path) -> Path:
    bin_dir = sock_dir / "bin"
    install_binary(bin_dir, DEFAULT_PLUGIN_SOURCE, sys.executable)
    return bin_dir / "mesh-cni"


def conf(sock: Path | str, version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "cniVersion": version,
        "name": "meshnet",
        "type": "mesh-cni",
        "agentSocket": str(sock),
        "prevResult": {**PREV, "cniVersion": version},
    }
    doc.update(extra)
    return {k: v for k, v in doc.items() if v is not None}


def env(command: str, **overrides: str | None) -> dict[str, str]:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/var/run/netns/pod-1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": POD_ARGS,
    }
    base.update(overrides)  # type: ignore[arg-type]
    return {k: v for k, v in base.items() if v is not None}


async def run_plugin(
    plugin: Path, command: str, stdin: bytes | dict[str, Any], **env_overrides: str | None
) -> tuple[int, dict[str, Any] | None, str]:
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    with trio.fail_after(20):
        proc = await trio.run_process(
            [str(plugin)],
            stdin=data,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=env(command, **env_overrides),
        )
    out = proc.stdout.decode()
    assert "Traceback" not in out + proc.stderr.decode()
    return proc.returncode, (json.loads(out) if out.strip() else None), proc.stderr.decode()


def sock_of(server: CniServer) -> str:
    return server.socket_path


# --- ADD ----------------------------------------------------------------------------------------


def test_plugin_interpreter_cannot_import_msgpack(plugin: Path) -> None:
    """What the tests below run is what a node runs: python3 with the standard library only."""
    interpreter, flags = plugin.read_text().splitlines()[0].removeprefix("#!").split()
    assert flags == "-IS"
    probe = subprocess.run([interpreter, flags, "-c", "import msgpack"], capture_output=True)
    assert probe.returncode != 0
    assert b"No module named 'msgpack'" in probe.stderr


@pytest.mark.parametrize("version", ["1.1.0", "1.0.0", "0.4.0"])
async def test_add_ok_prints_prev_result(
    plugin: Path, server: CniServer, handler: RecordingHandler, version: str
) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server), version))
    assert rc == 0
    assert out == {**PREV, "cniVersion": version}
    [(name, req)] = handler.calls
    assert name == "add"
    assert req.command is Command.ADD
    assert req.container_id == "c0ffee"
    assert req.netns == "/var/run/netns/pod-1"
    assert req.ifname == "eth0"
    assert (req.pod.namespace, req.pod.name, req.pod.uid) == ("default", "web-0", "uid-1")
    assert req.args["IgnoreUnknown"] == "1"
    assert req.prev_result == {**PREV, "cniVersion": version}
    assert "prevResult" not in req.config
    assert req.config["agentSocket"] == sock_of(server)


async def test_add_reemits_in_config_version(plugin: Path, server: CniServer) -> None:
    doc = conf(sock_of(server), "1.0.0")
    doc["prevResult"]["cniVersion"] = "1.1.0"
    rc, out, _ = await run_plugin(plugin, "ADD", doc)
    assert rc == 0
    assert out is not None
    assert out["cniVersion"] == "1.0.0"


async def test_add_skipped_by_agent_still_succeeds(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    handler.enroll = False
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server)))
    assert (rc, out) == (0, PREV)


async def test_add_agent_down_is_code_11(plugin: Path, sock_dir: Path) -> None:
    path = sock_dir / "nobody.sock"
    rc, out, _ = await run_plugin(plugin, "ADD", conf(path))
    assert rc != 0
    assert out is not None
    assert out["code"] == 11
    assert out["cniVersion"] == "1.1.0"
    assert f"mesh node agent not reachable at {path}" in out["msg"]
    assert "is the nodeagent DaemonSet running on this node?" in out["msg"]


async def test_add_agent_refuses_connection_is_code_11(plugin: Path, sock_dir: Path) -> None:
    path = sock_dir / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    rc, out, _ = await run_plugin(plugin, "ADD", conf(path))
    assert rc != 0
    assert out is not None
    assert out["code"] == 11
    assert "connection refused" in out["msg"]


async def test_add_agent_error_passes_code_and_msg(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    handler.errors["add"] = EnrollError(100, "bind 15001 in netns pod-1: address in use", "d")
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server)))
    assert rc != 0
    assert out == {
        "cniVersion": "1.1.0",
        "code": 100,
        "msg": "bind 15001 in netns pod-1: address in use",
        "details": "d",
    }


async def test_add_without_prev_result_is_code_7(plugin: Path, server: CniServer) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server), prevResult=None))
    assert rc != 0
    assert out is not None
    assert out["code"] == 7
    assert "prevResult" in out["msg"]


async def test_excluded_namespace_passes_through_without_agent(
    plugin: Path, sock_dir: Path
) -> None:
    down = sock_dir / "nobody.sock"
    args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1;K8S_POD_UID=u"
    rc, out, _ = await run_plugin(plugin, "ADD", conf(down), CNI_ARGS=args)
    assert (rc, out) == (0, PREV)
    rc, out, _ = await run_plugin(
        plugin,
        "ADD",
        conf(down, excludeNamespaces=["infra"]),
        CNI_ARGS=args.replace("kube-system", "infra"),
    )
    assert (rc, out) == (0, PREV)
    rc, out, _ = await run_plugin(plugin, "DEL", conf(down), CNI_ARGS=args)
    assert (rc, out) == (0, None)


async def test_not_a_kubernetes_pod_passes_through(plugin: Path, sock_dir: Path) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_dir / "x.sock"), CNI_ARGS=None)
    assert (rc, out) == (0, PREV)


async def test_unnamed_pod_is_named_after_the_container_id(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    """`ctr run --cni` sends no CNI_ARGS; with `unnamedPods` the pod is <namespace>/<id>."""
    doc = conf(sock_of(server), unnamedPods={"namespace": "runtime"})
    # As ctr calls the chain: the task's /proc netns on ADD, none on DEL.
    for command, netns in (("ADD", "/proc/42/ns/net"), ("CHECK", "/proc/42/ns/net"), ("DEL", None)):
        rc, _, _ = await run_plugin(
            plugin, command, doc, CNI_ARGS="", CNI_CONTAINERID="mesh-web1", CNI_NETNS=netns
        )
        assert rc == 0, command
    assert [name for name, _ in handler.calls] == ["add", "check", "delete"]
    for _, req in handler.calls:
        assert (req.pod.namespace, req.pod.name, req.pod.uid) == (
            "runtime",
            "mesh-web1",
            "mesh-web1",
        )
        assert req.args == {}
    assert handler.calls[0][1].netns == "/proc/42/ns/net"
    assert handler.calls[2][1].netns == ""
    # K8S_POD_* still win when a runtime sends them.
    rc, _, _ = await run_plugin(plugin, "ADD", doc)
    assert rc == 0
    assert (handler.calls[-1][1].pod.namespace, handler.calls[-1][1].pod.name) == (
        "default",
        "web-0",
    )


async def test_unnamed_pod_with_an_id_that_is_no_name_fails_add_not_del(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    doc = conf(sock_of(server), unnamedPods={})
    rc, out, _ = await run_plugin(plugin, "ADD", doc, CNI_ARGS="", CNI_CONTAINERID="Web_1")
    assert rc != 0
    assert out is not None
    assert out["code"] == 4
    assert "CNI_CONTAINERID 'Web_1' cannot name a pod" in out["msg"]
    rc, out, _ = await run_plugin(plugin, "DEL", doc, CNI_ARGS="", CNI_CONTAINERID="Web_1")
    assert (rc, out) == (0, None)
    assert handler.calls == []


async def test_unnamed_pod_in_an_excluded_namespace_passes_through(
    plugin: Path, sock_dir: Path
) -> None:
    doc = conf(sock_dir / "x.sock", unnamedPods={"namespace": "kube-system"})
    rc, out, _ = await run_plugin(plugin, "ADD", doc, CNI_ARGS="", CNI_CONTAINERID="c1")
    assert (rc, out) == (0, PREV)


@pytest.mark.parametrize(
    "value", ["enroll", {"namespace": "Bad_NS"}, {"namespace": 3}, ["default"]]
)
async def test_bad_unnamed_pods_is_code_7(plugin: Path, sock_dir: Path, value: Any) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_dir / "x.sock", unnamedPods=value))
    assert rc != 0
    assert out is not None
    assert out["code"] == 7
    assert "unnamedPods" in out["msg"]


async def test_add_agent_times_out_is_code_11(plugin: Path, sock_dir: Path) -> None:
    # A server that accepts and never answers.
    path = sock_dir / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(path))
        listener.listen(1)
        rc, out, _ = await run_plugin(plugin, "ADD", conf(path, timeoutSeconds=0.3))
    assert rc != 0
    assert out is not None
    assert out["code"] == 11
    assert "no reply within 0.3s" in out["msg"]


async def misbehaving_server(path: Path, reply: bytes, *, task_status: Any) -> None:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.bind(str(path))
        sock.listen(1)
        task_status.started()
        conn, _ = await sock.accept()
        with conn:
            await conn.recv(65536)
            await conn.send(reply)
            await trio.sleep_forever()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (struct.pack(">I", 2 << 20) + b"x" * 1000, "exceeds the 1 MiB limit"),
        (b"\x00\x00\x00\x01\xc1", "undecodable"),
        (struct.pack(">I", len(V7)) + V7, "protocol version 7"),
    ],
)
async def test_misbehaving_agent_is_code_100(
    plugin: Path, sock_dir: Path, nursery: trio.Nursery, reply: bytes, match: str
) -> None:
    path = sock_dir / "bad.sock"
    await nursery.start(misbehaving_server, path, reply)
    rc, out, _ = await run_plugin(plugin, "ADD", conf(path, timeoutSeconds=5))
    assert rc != 0
    assert out is not None
    assert out["code"] == 100
    assert match in out["msg"]
    nursery.cancel_scope.cancel()


# --- DEL / CHECK / STATUS / GC ------------------------------------------------------------------


async def test_del_ok(plugin: Path, server: CniServer, handler: RecordingHandler) -> None:
    rc, out, _ = await run_plugin(plugin, "DEL", conf(sock_of(server)))
    assert (rc, out) == (0, None)
    assert handler.calls[0][0] == "delete"


async def test_del_agent_down_succeeds(plugin: Path, sock_dir: Path) -> None:
    rc, out, _ = await run_plugin(plugin, "DEL", conf(sock_dir / "nobody.sock"))
    assert (rc, out) == (0, None)


async def test_del_with_missing_netns_and_prev_result(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    rc, out, _ = await run_plugin(
        plugin, "DEL", conf(sock_of(server), prevResult=None), CNI_NETNS=None
    )
    assert (rc, out) == (0, None)
    [(_, req)] = handler.calls
    assert req.netns == ""
    assert req.prev_result is None


async def test_check_ok_and_failure(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    rc, out, _ = await run_plugin(plugin, "CHECK", conf(sock_of(server)))
    assert (rc, out) == (0, None)
    handler.errors["check"] = EnrollError(100, "pod default/web-0: listener 15001 missing")
    rc, out, _ = await run_plugin(plugin, "CHECK", conf(sock_of(server)))
    assert rc != 0
    assert out is not None
    assert out["code"] == 100
    assert "listener 15001 missing" in out["msg"]


async def test_status(plugin: Path, server: CniServer, sock_dir: Path) -> None:
    status_env = {"CNI_CONTAINERID": None, "CNI_NETNS": None, "CNI_IFNAME": None, "CNI_ARGS": None}
    rc, out, _ = await run_plugin(
        plugin, "STATUS", conf(sock_of(server), prevResult=None), **status_env
    )
    assert (rc, out) == (0, None)
    rc, out, _ = await run_plugin(
        plugin, "STATUS", conf(sock_dir / "nobody.sock", prevResult=None), **status_env
    )
    assert rc != 0
    assert out is not None
    assert out["code"] == 50
    assert "not reachable" in out["msg"]


async def test_status_refused_for_old_config_version(plugin: Path, server: CniServer) -> None:
    rc, out, _ = await run_plugin(plugin, "STATUS", conf(sock_of(server), "1.0.0", prevResult=None))
    assert rc != 0
    assert out is not None
    assert out["code"] == 1


async def test_gc_forwards_valid_attachments(
    plugin: Path, server: CniServer, handler: RecordingHandler
) -> None:
    valid = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "eth0"}]
    doc = conf(sock_of(server), prevResult=None, **{"cni.dev/valid-attachments": valid})
    rc, out, _ = await run_plugin(plugin, "GC", doc, CNI_CONTAINERID=None, CNI_ARGS=None)
    assert (rc, out) == (0, None)
    assert handler.calls == [("gc", valid)]


# --- VERSION and malformed input -----------------------------------------------------------------


async def test_version(plugin: Path) -> None:
    for stdin in (b'{"cniVersion": "1.1.0"}', b""):
        rc, out, _ = await run_plugin(plugin, "VERSION", stdin)
        assert rc == 0
        assert out == {"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}


@pytest.mark.parametrize(
    ("stdin", "code"),
    [
        (b"{not json", 6),
        (b"[1, 2]", 6),
        (b"\xff\xfe", 6),
        (b'{"cniVersion": "0.3.1", "type": "mesh-cni"}', 1),
        (b'{"type": "mesh-cni"}', 7),
    ],
)
async def test_malformed_stdin(plugin: Path, stdin: bytes, code: int) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", stdin)
    assert rc != 0
    assert out is not None
    assert out["code"] == code
    assert out["msg"]


@pytest.mark.parametrize(
    ("overrides", "name"),
    [
        ({"CNI_COMMAND": None}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "FROB"}, "CNI_COMMAND"),
        ({"CNI_CONTAINERID": None}, "CNI_CONTAINERID"),
        ({"CNI_NETNS": None}, "CNI_NETNS"),
        ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
        ({"CNI_ARGS": "K8S_POD_NAME"}, "CNI_ARGS"),
    ],
)
async def test_invalid_env_is_code_4(
    plugin: Path, server: CniServer, overrides: dict[str, str | None], name: str
) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server)), **overrides)
    assert rc != 0
    assert out is not None
    assert out["code"] == 4
    assert name in out["msg"] or name.removeprefix("CNI_") in out["msg"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("agentSocket", "relative.sock"),
        ("excludeNamespaces", "kube-system"),
        ("timeoutSeconds", "30"),
        ("timeoutSeconds", True),
        ("logLevel", ["debug"]),
        ("prevResult", [1]),
    ],
)
async def test_wrong_config_types_are_code_7(
    plugin: Path, server: CniServer, key: str, value: Any
) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server), **{key: value}))
    assert rc != 0
    assert out is not None
    assert out["code"] == 7
    assert key in out["msg"]


async def test_unknown_config_keys_ignored(plugin: Path, server: CniServer) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", conf(sock_of(server), somethingNew={"a": 1}))
    assert (rc, out) == (0, PREV)


async def test_log_file(plugin: Path, server: CniServer, sock_dir: Path) -> None:
    log = sock_dir / "mesh-cni.log"
    rc, _, _ = await run_plugin(plugin, "ADD", conf(sock_of(server), logFile=str(log)))
    assert rc == 0
    rc, _, _ = await run_plugin(plugin, "ADD", conf(sock_dir / "x.sock", logFile=str(log)))
    assert rc != 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("cni.complete", "info"),
        ("cni.failed", "error"),
    ]
    assert lines[0]["pod"] == "default/web-0"
    assert lines[1]["code"] == 11


def _strict_json(text: str) -> Any:
    """JSON as the runtime's Go decoder reads it: NaN and Infinity are not JSON."""

    def refuse(name: str) -> None:
        raise AssertionError(f"the plugin printed {name}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
        (b'{"a": ' * 40 + b"1" + b"}" * 40, "nested deeper than 32 levels"),
    ],
)
async def test_deeply_nested_stdin_is_a_decoding_error(
    plugin: Path, server: CniServer, body: bytes, detail: str
) -> None:
    rc, out, _ = await run_plugin(plugin, "ADD", body)
    assert rc == 1
    assert out is not None
    assert (out["code"], out["msg"]) == (6, "failed to decode network configuration")
    assert detail in out["details"]


@pytest.mark.parametrize(
    ("number", "detail"),
    [
        ("NaN", "NaN is not JSON"),
        ("Infinity", "Infinity is not JSON"),
        ("-Infinity", "-Infinity is not JSON"),
        ("1e999", "overflows a double"),
    ],
)
async def test_non_standard_json_numbers_are_a_decoding_error(
    plugin: Path, server: CniServer, handler: RecordingHandler, number: str, detail: str
) -> None:
    text = json.dumps(conf(sock_of(server))).replace('"dns": {}', f'"dns": {{"x": {number}}}')
    assert number in text
    data = text.encode()
    with trio.fail_after(20):
        proc = await trio.run_process(
            [str(plugin)], stdin=data, capture_stdout=True, check=False, env=env("ADD")
        )
    out = _strict_json(proc.stdout.decode())
    assert proc.returncode == 1
    assert out["code"] == 6
    assert detail in out["details"]
    assert handler.calls == []  # refused before the agent is asked
