"""`nodeagent install-cni`: chain mesh-cni into the node's primary CNI config, and keep it there.

The container runtime uses the lexicographically first valid network config in the conf dir
(*.conf, *.conflist, *.json). We append `{"type": "mesh-cni", ...}` as the LAST plugin of that
conflist (a single-plugin *.conf/*.json is first converted to a conflist, as libcni does, and
replaced by it), copy the plugin executable into the CNI bin dir, and with `--watch` repair the
chain whenever the primary CNI rewrites its file. `--uninstall` undoes it: the original file
comes back byte-identical when nobody changed ours since, else our entry is stripped out.

In a cluster (`--watch --uninstall-flag FILE`, the DaemonSet's install-cni container), a restart
or upgrade must leave the chain in place (pods keep being enrolled by the next agent), while
deleting the DaemonSet must take mesh-cni out (else no pod can start on the node: the plugin
fails ADD when no agent answers). A container cannot tell the two apart from SIGTERM alone, so
the uninstall path says so explicitly: FILE (a ConfigMap key, re-read at every poll) reading
"true" makes the watch uninstall and stay out, and SIGTERM uninstalls only when it reads "true".

Deciding is pure: `plan(files, state, entry)` maps what is on disk to the writes and deletes
to make; `apply` performs them atomically (tmp file + rename, state first). The state file
(`.mesh-cni-install.state`, ignored by runtimes for its extension) keeps the original bytes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from nodeagent.contract import CNI_SOCKET
from nodeagent.log import get_logger

log = get_logger("cni.install")

PLUGIN_TYPE = "mesh-cni"
CONF_EXTENSIONS = (".conf", ".conflist", ".json")
STATE_FILE = ".mesh-cni-install.state"
STATE_VERSION = 1
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_AGENT_SOCKET = str(CNI_SOCKET)
# In a source checkout (the DaemonSet image copies the repository), the plugin sits next to
# the package.
DEFAULT_PLUGIN_SOURCE = Path(__file__).resolve().parents[2] / "cni-plugin" / PLUGIN_TYPE
MAX_CONF_SIZE = 1 << 20


class InstallError(Exception):
    """A problem an operator must fix (unreadable dir, foreign file in our way, ...)."""


@dataclass(frozen=True, slots=True)
class InstallState:
    """What we changed: `source` (the primary's file) became `target` (ours, maybe the same)."""

    source: str
    target: str
    original: bytes
    written_sha256: str

    def encode(self) -> bytes:
        doc = {
            "v": STATE_VERSION,
            "source": self.source,
            "target": self.target,
            "original": base64.b64encode(self.original).decode(),
            "written_sha256": self.written_sha256,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> InstallState:
        try:
            doc = json.loads(data)
            if doc.get("v") != STATE_VERSION:
                raise ValueError(f"state version {doc.get('v')!r}, expected {STATE_VERSION}")
            return cls(
                source=_plain_name(doc["source"]),
                target=_plain_name(doc["target"]),
                original=base64.b64decode(doc["original"], validate=True),
                written_sha256=str(doc["written_sha256"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InstallError(f"unreadable install state {STATE_FILE}: {exc}") from None


def _plain_name(value: object) -> str:
    if not isinstance(value, str) or not value or "/" in value or value.startswith("."):
        raise ValueError(f"bad file name {value!r}")
    return value


@dataclass(slots=True)
class Plan:
    writes: dict[str, bytes] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    # None: leave the state file alone; b"" delete it; else its new content.
    state: bytes | None = None
    # Where each written file takes its permission bits from (the file it replaces).
    mode_from: dict[str, str] = field(default_factory=dict)
    note: str = ""
    # No primary config to chain into yet (the primary CNI has not written one).
    waiting: bool = False

    @property
    def empty(self) -> bool:
        return not self.writes and not self.deletes and self.state is None


# --- pure decisions ---------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2) + "\n").encode()


def is_ours(plugin: object) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def parse_network_config(name: str, data: bytes) -> dict[str, Any]:
    """A conflist (with 'plugins') or a single plugin config (with 'type'); else ValueError."""
    if len(data) > MAX_CONF_SIZE:
        raise ValueError(f"{len(data)} bytes, more than {MAX_CONF_SIZE}")
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError(f"top level is a JSON {type(doc).__name__}, expected an object")
    if name.endswith(".conflist"):
        plugins = doc.get("plugins")
        if not isinstance(plugins, list) or not plugins:
            raise ValueError("a .conflist needs a non-empty 'plugins' list")
        if not all(isinstance(p, dict) for p in plugins):
            raise ValueError("every entry of 'plugins' must be an object")
    elif not isinstance(doc.get("type"), str):
        raise ValueError("a single network config needs a string 'type'")
    return doc


def find_primary(files: Mapping[str, bytes]) -> tuple[str, dict[str, Any]] | None:
    """The config a runtime would use: the first (by name) that parses, as CRI-O and Istio do."""
    for name in sorted(files):
        try:
            return name, parse_network_config(name, files[name])
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("cni.install.skip_config", file=name, reason=str(exc))
    return None


def to_conflist(doc: Mapping[str, Any]) -> dict[str, Any]:
    """libcni's ConfListFromConf: the whole single config becomes the only plugin."""
    out: dict[str, Any] = {}
    if "cniVersion" in doc:
        out["cniVersion"] = doc["cniVersion"]
    if "name" in doc:
        out["name"] = doc["name"]
    out["plugins"] = [dict(doc)]
    return out


def strip_ours(doc: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(doc)
    out["plugins"] = [p for p in doc.get("plugins", []) if not is_ours(p)]
    return out


def plan_install(
    files: Mapping[str, bytes], state: InstallState | None, entry: Mapping[str, Any]
) -> Plan:
    """Writes/deletes that make `entry` the last plugin of the primary config, idempotently."""
    primary = find_primary(files)
    if primary is None:
        return Plan(
            waiting=True, note="no valid CNI network config yet; waiting for the primary CNI"
        )
    name, doc = primary
    if name.endswith(".conflist"):
        target, current = name, doc
        converted_from = None
    else:
        target = name.rsplit(".", 1)[0] + ".conflist"
        current, converted_from = to_conflist(doc), name
    plan = Plan()
    if state is not None and state.target != target:
        if state.target in files:
            # The primary moved to another file: take ourselves out of the old one first.
            plan = plan_uninstall(files, state)
        state = None
    if converted_from is not None and target in files and state is None:
        raise InstallError(
            f"cannot convert {name} to {target}: {target} already exists and is not ours"
        )
    desired = strip_ours(current)
    desired["plugins"].append(dict(entry))
    if converted_from is None and current == desired:
        plan.note = f"{name}: mesh-cni already chained last"
        return plan
    has_ours = any(is_ours(p) for p in current.get("plugins", []))
    if converted_from is not None:
        original, source = files[converted_from], converted_from
    elif not has_ours:
        original, source = files[name], name
    elif state is not None and state.target == name and sha256(files[name]) == state.written_sha256:
        # Our own file, unchanged since we wrote it (only our settings change): same original.
        original, source = state.original, state.source
    else:
        # Someone changed the file around our entry, or the state is lost: their content
        # without our entry is the best original there is (no longer byte-identical).
        original, source = render(strip_ours(current)), name
    written = render(desired)
    plan.state = InstallState(source, target, original, sha256(written)).encode()
    plan.writes[target] = written
    plan.mode_from[target] = source
    if converted_from is not None:
        plan.deletes.append(converted_from)
    plan.note = f"{target}: chained mesh-cni last" + (
        f" (converted from {converted_from})" if converted_from else ""
    )
    return plan


def plan_uninstall(files: Mapping[str, bytes], state: InstallState | None) -> Plan:
    """Restore the original when our file is untouched since; otherwise strip our entries."""
    plan = Plan(state=b"")
    untouched = (
        state is not None
        and state.target in files
        and sha256(files[state.target]) == state.written_sha256
    )
    if state is not None and untouched:
        converted = state.target != state.source
        if converted and state.source in files:
            # The primary CNI wrote its .conf again since: that one is newer than our copy.
            plan.note = f"kept {state.source} (rewritten by the primary CNI)"
        else:
            plan.writes[state.source] = state.original
            plan.mode_from[state.source] = state.target
            plan.note = f"restored {state.source}"
        if converted:
            plan.deletes.append(state.target)
    # Anything else of ours (a file changed since we wrote it, or a lost state file).
    for name in sorted(files):
        if name in plan.writes or name in plan.deletes:
            continue
        try:
            doc = parse_network_config(name, files[name])
        except (ValueError, UnicodeDecodeError):
            continue
        if name.endswith(".conflist") and any(is_ours(p) for p in doc["plugins"]):
            plan.writes[name] = render(strip_ours(doc))
            plan.mode_from[name] = name
            plan.note = (plan.note + "; " if plan.note else "") + f"removed mesh-cni from {name}"
    return plan


# --- I/O ----------------------------------------------------------------------------------------


def read_conf_dir(conf_dir: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        entries = sorted(os.scandir(conf_dir), key=lambda e: e.name)
    except OSError as exc:
        raise InstallError(f"read CNI conf dir {conf_dir}: {exc.strerror}") from None
    for entry in entries:
        if not entry.name.endswith(CONF_EXTENSIONS) or not entry.is_file():
            continue
        try:
            with open(entry.path, "rb") as f:
                files[entry.name] = f.read(MAX_CONF_SIZE + 1)
        except FileNotFoundError:
            continue  # removed while we listed
        except OSError as exc:
            raise InstallError(f"read {entry.path}: {exc.strerror}") from None
    return files


def read_state(conf_dir: Path) -> InstallState | None:
    try:
        data = (conf_dir / STATE_FILE).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InstallError(f"read {conf_dir / STATE_FILE}: {exc.strerror}") from None
    return InstallState.decode(data)


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    # The tmp name ends in neither .conf, .conflist nor .json, so runtimes never read it.
    tmp = path.with_name(f".{path.name}.mesh-tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InstallError(f"write {path}: {exc.strerror}") from None


def _mode_of(path: Path, default: int) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return default


def apply(conf_dir: Path, plan: Plan) -> None:
    # State first: if we die half-way, the next run still knows the original.
    if plan.state:
        atomic_write(conf_dir / STATE_FILE, plan.state, 0o600)
    for name, data in plan.writes.items():
        mode = _mode_of(conf_dir / plan.mode_from.get(name, name), 0o644)
        atomic_write(conf_dir / name, data, mode)
    for name in plan.deletes:
        with contextlib.suppress(FileNotFoundError):
            (conf_dir / name).unlink()
    if plan.state == b"":
        with contextlib.suppress(FileNotFoundError):
            (conf_dir / STATE_FILE).unlink()


def plugin_executable(source: Path, interpreter: str) -> bytes:
    """The plugin with its shebang pointing at the node's interpreter (standard library only)."""
    try:
        text = source.read_bytes()
    except OSError as exc:
        raise InstallError(f"read plugin {source}: {exc.strerror}") from None
    body = text.split(b"\n", 1)[1] if text.startswith(b"#!") else text
    # -I: the runtime's environment (PYTHONPATH, user site) must not change what we import;
    # -S: nor what the node has installed (the plugin needs the standard library only).
    return f"#!{interpreter} -IS\n".encode() + body


def install_binary(bin_dir: Path, source: Path, interpreter: str) -> bool:
    data = plugin_executable(source, interpreter)
    dest = bin_dir / PLUGIN_TYPE
    try:
        if dest.read_bytes() == data and os.access(dest, os.X_OK):
            return False
    except OSError:
        pass
    try:
        bin_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"create CNI bin dir {bin_dir}: {exc.strerror}") from None
    atomic_write(dest, data, 0o755)
    return True


@dataclass(frozen=True, slots=True)
class Options:
    conf_dir: Path = Path(DEFAULT_CONF_DIR)
    bin_dir: Path = Path(DEFAULT_BIN_DIR)
    agent_socket: str = DEFAULT_AGENT_SOCKET
    exclude_namespaces: tuple[str, ...] = ("kube-system",)
    log_level: str = "info"
    plugin_source: Path = DEFAULT_PLUGIN_SOURCE
    interpreter: str = sys.executable

    def entry(self) -> dict[str, Any]:
        return {
            "type": PLUGIN_TYPE,
            "agentSocket": self.agent_socket,
            "excludeNamespaces": list(self.exclude_namespaces),
            "logLevel": self.log_level,
        }


def reconcile(opts: Options) -> Plan:
    """One pass of install: binary, then the conflist. Returns what was done."""
    if install_binary(opts.bin_dir, opts.plugin_source, opts.interpreter):
        log.info("cni.install.binary", path=str(opts.bin_dir / PLUGIN_TYPE))
    plan = plan_install(read_conf_dir(opts.conf_dir), read_state(opts.conf_dir), opts.entry())
    if not plan.empty:
        apply(opts.conf_dir, plan)
        log.info("cni.install.config", conf_dir=str(opts.conf_dir), change=plan.note)
    return plan


def uninstall(opts: Options) -> Plan:
    plan = plan_uninstall(read_conf_dir(opts.conf_dir), read_state(opts.conf_dir))
    apply(opts.conf_dir, plan)
    with contextlib.suppress(FileNotFoundError):
        (opts.bin_dir / PLUGIN_TYPE).unlink()
    log.info("cni.uninstall.complete", conf_dir=str(opts.conf_dir), change=plan.note or "none")
    return plan


def uninstall_requested(flag: Path | None) -> bool:
    """The uninstall path's signal: `flag` exists and reads "true" (a missing file: no)."""
    if flag is None:
        return False
    try:
        return flag.read_text(errors="replace").strip().lower() == "true"
    except OSError:
        return False


def watch(
    opts: Options,
    *,
    interval: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
    uninstall_flag: Path | None = None,
) -> None:
    """Re-run `reconcile` every `interval` until `should_stop()`; errors are logged, retried.

    While `uninstall_flag` reads "true", uninstall (once) instead and do not reinstall; at stop,
    uninstall only if it reads "true" then (a restart keeps the chain)."""
    removed = False
    while not should_stop():
        try:
            if uninstall_requested(uninstall_flag):
                if not removed:
                    uninstall(opts)
                    removed = True
            else:
                removed = False
                reconcile(opts)
        except InstallError as exc:
            log.warning("cni.install.retry", error=str(exc))
        sleep(interval)
    if uninstall_requested(uninstall_flag):
        try:
            uninstall(opts)
        except InstallError as exc:
            log.error("cni.uninstall.failed", error=str(exc))
    else:
        log.info("cni.install.stopped", kept="mesh-cni stays chained (restart, not uninstall)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodeagent install-cni",
        description="Chain mesh-cni into the node's primary CNI config (docs/cni.md).",
    )
    p.add_argument("--cni-conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR))
    p.add_argument("--cni-bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR))
    p.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET)
    p.add_argument(
        "--exclude-namespaces",
        default="kube-system",
        help="comma-separated namespaces whose pods are never enrolled (default: kube-system)",
    )
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    p.add_argument(
        "--plugin-source",
        type=Path,
        default=Path(os.environ.get("MESH_CNI_PLUGIN_SOURCE") or DEFAULT_PLUGIN_SOURCE),
    )
    p.add_argument(
        "--host-interpreter",
        default=sys.executable,
        help="the python3 (3.8 or later, standard library only) the plugin runs with ON THE NODE "
        "(default: this one)",
    )
    p.add_argument(
        "--uninstall-flag",
        type=Path,
        default=None,
        help="with --watch: uninstall while this file reads 'true', and at exit only then",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--uninstall", action="store_true", help="remove our entry and executable")
    mode.add_argument("--watch", action="store_true", help="keep repairing, polling every second")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.agent_socket.startswith("/"):
        print(
            f"install-cni: --agent-socket {args.agent_socket!r} must be absolute", file=sys.stderr
        )
        return 2
    opts = Options(
        conf_dir=args.cni_conf_dir,
        bin_dir=args.cni_bin_dir,
        agent_socket=args.agent_socket,
        exclude_namespaces=tuple(ns for ns in args.exclude_namespaces.split(",") if ns),
        log_level=args.log_level,
        plugin_source=args.plugin_source,
        interpreter=args.host_interpreter,
    )
    try:
        if args.uninstall:
            uninstall(opts)
            return 0
        if not args.watch:
            plan = reconcile(opts)
            if plan.waiting:
                print(f"install-cni: {opts.conf_dir}: {plan.note}", file=sys.stderr)
                return 1
            return 0
    except InstallError as exc:
        print(f"install-cni: {exc}", file=sys.stderr)
        return 1
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        watch(opts, should_stop=lambda: stop, uninstall_flag=args.uninstall_flag)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
