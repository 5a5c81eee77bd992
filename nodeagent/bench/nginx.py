"""The server pod's HTTP server for the anchors' workload: nginx (Debian's `nginx-light`)
serving a 1 KB static file, as Istio's published benchmarks do.

`server_argv(...)` is the pod's command: nginx in the foreground on the HTTP port, beside the
built-in server (`nodeagent.bench.server`) for the echo and bulk ports, in one process group
(the sandbox stops pods by their group, so nginx goes with the pod). Everything nginx writes
(config, the file, pid, temp dirs) lives under one directory of the run.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

RESPONSE_BYTES = 1024


def nginx_binary() -> str:
    """nginx's path; a clear error when it is missing (scripts/bootstrap installs it)."""
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not path:
        raise RuntimeError(
            "the nginx workload needs nginx (Debian nginx-light): run scripts/bootstrap"
        )
    return path


def config(root: Path, port: int, *more: int, h2_port: int = 0) -> str:
    """One worker, no access log, keep-alive without a request limit (wrk/loadgen connections
    stay up for the whole run), the 1 KB file from `root`, on `port` and `more` ports; with
    `h2_port`, the same file over HTTP/2 in the clear (h2c, prior knowledge) there."""
    listen = "\n".join(f"        listen {p} reuseport;" for p in (port, *more))
    h2 = (
        f"""    server {{
        listen {h2_port} http2 reuseport;
        # sendfile splits HTTP/2's DATA frame from its header write: ~45 ms per request
        # (a delayed ACK) at a fixed rate, measured with h2load on loopback; off: 0.1 ms.
        sendfile off;
        root {root}/www;
        index index.html;
    }}
"""
        if h2_port
        else ""
    )
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type text/plain;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
{listen}
        root {root}/www;
        index index.html;
    }}
{h2}}}
"""


def prepare(root: Path, port: int, *more: int, h2_port: int = 0) -> Path:
    """Write the config and the 1 KB file under `root`; returns the config's path."""
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "www" / "index.html").write_bytes(b"x" * (RESPONSE_BYTES - 1) + b"\n")
    conf = root / "nginx.conf"
    conf.write_text(config(root, port, *more, h2_port=h2_port))
    return conf


def server_argv(root: Path, ports: dict[str, int]) -> list[str]:
    """The server pod's command: nginx on ports["http"] (and ports["http-l4"]; h2c on
    ports["h2"]), the gRPC server (`grpc_server.py`) on ports["grpc"], the built-in server on
    the others."""
    more = (ports["http-l4"],) if "http-l4" in ports else ()
    conf = prepare(root, ports["http"], *more, h2_port=ports.get("h2", 0))
    builtin = [
        sys.executable, "-m", "nodeagent.bench.server",
        "--echo", str(ports["echo"]), "--bulk", str(ports["bulk"]), "--http", "0",
    ]  # fmt: skip
    nginx = [nginx_binary(), "-c", str(conf), "-e", "stderr"]
    side = shlex.join(nginx)
    if "grpc" in ports:
        grpc = [sys.executable, "-m", "nodeagent.bench.grpc_server", "--port", str(ports["grpc"])]
        side += f" & {shlex.join(grpc)}"
    return ["sh", "-c", f"{side} & exec {shlex.join(builtin)}"]
