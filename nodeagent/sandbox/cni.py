"""Runs a CNI network list exactly as a container runtime (libcni) does.

ADD runs each plugin in order with the list's `name` and `cniVersion` injected into its config
and the previous plugin's result as `prevResult`; the last result is the list's result. DEL runs
the plugins in reverse, each with the cached ADD result as `prevResult` (none when ADD never
completed), and stops at the first that fails; CHECK runs them in order with that result. A
plugin's error is its JSON `{"code", "msg", "details"}` on stdout and a non-zero exit; the
message is reported verbatim. docs/cni.md compares this with containerd's libcni.

The plugins run with the NODE's network namespace as their current one (the bridge plugin makes
its bridge there) via `ip netns exec <node-ns>`; CNI_NETNS points at the pod's.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.sandbox.errors import CniError, SandboxError

PLUGIN_TIMEOUT = 60.0
MAX_PLUGIN_OUTPUT = 1 << 20


@dataclass(frozen=True, slots=True)
class Invocation:
    """What a runtime hands a plugin besides its config."""

    container_id: str
    netns_path: str
    ifname: str
    args: str
    cni_path: Sequence[str]


def plugin_config(
    netconf: Mapping[str, Any], plugin: Mapping[str, Any], prev_result: Mapping[str, Any] | None
) -> bytes:
    """The plugin's stdin: its own config plus the list's name/cniVersion and prevResult."""
    conf = dict(plugin)
    conf["name"] = netconf["name"]
    conf["cniVersion"] = netconf["cniVersion"]
    if prev_result is not None:
        conf["prevResult"] = prev_result
    else:
        conf.pop("prevResult", None)
    return json.dumps(conf).encode()


def check_netconf(netconf: Any, where: str) -> list[dict[str, Any]]:
    """Validate the shape of a network list; returns its plugins."""
    if not isinstance(netconf, dict):
        raise SandboxError(f"{where}: a CNI network list must be a JSON object")
    for field in ("name", "cniVersion"):
        if not isinstance(netconf.get(field), str):
            raise SandboxError(f"{where}: missing or non-string {field!r}")
    plugins = netconf.get("plugins")
    if not isinstance(plugins, list) or not plugins:
        raise SandboxError(f"{where}: 'plugins' must be a non-empty list")
    for i, p in enumerate(plugins):
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise SandboxError(f"{where}: plugins[{i}] has no 'type'")
    return plugins


def parse_error(plugin: str, command: str, rc: int, stdout: bytes, stderr: bytes) -> CniError:
    """Turn a failed plugin's output into a CniError carrying its message verbatim."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("msg"), str):
        code = doc.get("code")
        details = doc.get("details")
        return CniError(
            plugin,
            command,
            doc["msg"],
            code=code if isinstance(code, int) else None,
            details=details if isinstance(details, str) else "",
            raw=doc,
        )
    text = (stdout or stderr).decode(errors="replace").strip()[:2000]
    return CniError(plugin, command, text or f"exited with status {rc} and no error message")


def pod_ip(result: Mapping[str, Any], ifname: str = "eth0") -> str:
    """The pod's IPv4 address from a (1.0.0 or 0.4.0) CNI result, preferring `ifname`."""
    interfaces = result.get("interfaces") or []
    candidates: list[str] = []
    for ip in result.get("ips") or []:
        if not isinstance(ip, dict) or not isinstance(ip.get("address"), str):
            continue
        addr = ip["address"].split("/")[0]
        if ":" in addr or addr.startswith("127."):
            continue
        idx = ip.get("interface")
        if isinstance(idx, int) and 0 <= idx < len(interfaces):
            iface = interfaces[idx]
            if isinstance(iface, dict) and iface.get("name") == ifname:
                return str(addr)
        candidates.append(str(addr))
    if candidates:
        return candidates[0]
    raise SandboxError(f"the CNI result has no IPv4 address for {ifname}: {json.dumps(result)}")


def find_plugin(kind: str, cni_path: Sequence[str]) -> Path:
    """libcni's FindInPath: the first executable named `kind` in CNI_PATH."""
    if "/" in kind or kind in ("", ".", ".."):
        raise SandboxError(f"invalid CNI plugin type {kind!r}")
    for d in cni_path:
        p = Path(d) / kind
        if p.is_file() and os.access(p, os.X_OK):
            return p
    raise SandboxError(f'failed to find plugin "{kind}" in path {list(cni_path)}')


def plugin_environment(command: str, inv: Invocation) -> dict[str, str]:
    """As libcni's `invoke.Args.AsEnv`: the runtime's whole environment, then the CNI_* variables
    (which win over inherited ones). mesh-cni runs as `python3 -IS` on whatever python3 PATH
    names, with the standard library only, as on a node."""
    env = dict(os.environ)
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(
        {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": inv.container_id,
            "CNI_NETNS": inv.netns_path,
            "CNI_ARGS": inv.args,
            "CNI_IFNAME": inv.ifname,
            "CNI_PATH": os.pathsep.join(inv.cni_path),
        }
    )
    return env


def _exec(
    node_netns: str,
    command: str,
    plugin: Mapping[str, Any],
    stdin: bytes,
    inv: Invocation,
) -> bytes:
    kind = plugin["type"]
    binary = find_plugin(kind, inv.cni_path)
    env = plugin_environment(command, inv)
    argv = ["ip", "netns", "exec", node_netns, str(binary)]
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            env=env,
            timeout=PLUGIN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise CniError(kind, command, f"timed out after {PLUGIN_TIMEOUT:.0f}s") from e
    except OSError as e:
        raise CniError(kind, command, f"cannot run {binary}: {e.strerror}") from e
    if proc.returncode != 0:
        raise parse_error(kind, command, proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout[:MAX_PLUGIN_OUTPUT]


def add(node_netns: str, netconf: Mapping[str, Any], inv: Invocation) -> dict[str, Any]:
    """ADD the whole list; returns the final result. Does NOT clean up on failure (see `delete`)."""
    plugins = check_netconf(netconf, "network list")
    prev: dict[str, Any] | None = None
    for plugin in plugins:
        out = _exec(node_netns, "ADD", plugin, plugin_config(netconf, plugin, prev), inv)
        try:
            result = json.loads(out)
        except ValueError as e:
            raise CniError(plugin["type"], "ADD", f"result is not JSON: {out[:200]!r}") from e
        if not isinstance(result, dict):
            raise CniError(plugin["type"], "ADD", f"result is not a JSON object: {out[:200]!r}")
        prev = result
    assert prev is not None
    return prev


def check(
    node_netns: str,
    netconf: Mapping[str, Any],
    inv: Invocation,
    cached_result: Mapping[str, Any] | None,
) -> None:
    """CHECK the list as libcni's CheckNetworkList: refused for a list older than 0.4.0, nothing
    at all when the list says `disableCheck`, otherwise every plugin IN ORDER with the cached ADD
    result as `prevResult`; the first failure is raised."""
    plugins = check_netconf(netconf, "network list")
    if _version(netconf["cniVersion"]) < (0, 4, 0):
        raise SandboxError(
            f"configuration version {netconf['cniVersion']!r} does not support the CHECK command"
        )
    if netconf.get("disableCheck") is True:
        return
    for plugin in plugins:
        try:
            _exec(node_netns, "CHECK", plugin, plugin_config(netconf, plugin, cached_result), inv)
        except CniError:
            raise
        except SandboxError as e:
            raise CniError(plugin["type"], "CHECK", str(e)) from e


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        raise SandboxError(f"invalid cniVersion {text!r}") from None


def delete(
    node_netns: str,
    netconf: Mapping[str, Any],
    inv: Invocation,
    cached_result: Mapping[str, Any] | None,
) -> None:
    """DEL the whole list in reverse, as libcni's DelNetworkList: the first plugin that fails
    ends it (the plugins before it in the list are not called) and is raised; the runtime
    retries the DEL until it succeeds."""
    plugins = check_netconf(netconf, "network list")
    for plugin in reversed(plugins):
        try:
            _exec(node_netns, "DEL", plugin, plugin_config(netconf, plugin, cached_result), inv)
        except CniError:
            raise
        except SandboxError as e:
            raise CniError(plugin["type"], "DEL", str(e)) from e
