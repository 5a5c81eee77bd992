"""A minimal Kubernetes API client: h11 over trio, JSON in and out, list/watch wire format.

No client library: the mesh needs GET (list, with `limit`/`continue` chunking), a watch (a
chunked body of newline-delimited `{"type", "object"}` events, parsed by the bounded sans-IO
`JsonLines`), and POST/PUT for Lease objects, all on `nodeagent.httpclient` connections. One
connection per request keeps failure handling trivial (a watch owns its connection anyway);
timeouts are trio cancel scopes set here at the I/O edge. Credentials come from a kubeconfig
file (token, client certificate, CA) or the in-cluster service account mount.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import yaml

from nodeagent.httpclient import (
    ConnectError,
    Connector,
    HttpClientError,
    HttpConnection,
    JsonLines,
    ProtocolError,
    parse_object,
)

IN_CLUSTER_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """A request to the API server failed; the message names method, path and why."""


class ApiStatus(KubeError):
    """The API server answered with a non-2xx status (its `Status.reason` and message kept)."""

    def __init__(self, method: str, path: str, code: int, reason: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {code} {reason}: {message}")
        self.code = code
        self.reason = reason


class Gone(ApiStatus):
    """410: the resourceVersion asked for is too old (compacted away); re-list."""


@dataclass(frozen=True, slots=True)
class KubeConfig:
    server: str  # https://host:port or http://host:port (tests)
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    namespace: str = "default"

    @classmethod
    def in_cluster(cls, root: Path = IN_CLUSTER_DIR) -> KubeConfig:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("in-cluster config: KUBERNETES_SERVICE_HOST is not set (not in a pod?)")
        try:
            token = (root / "token").read_text().strip()
            namespace = (root / "namespace").read_text().strip()
        except OSError as exc:
            raise KubeError(f"in-cluster config: read {exc.filename}: {exc.strerror}") from None
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token, str(root / "ca.crt"), namespace=namespace)

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> KubeConfig:
        """The current (or named) context of a kubeconfig file; embedded data is spilled to
        private temporary files because the ssl module loads certificates from paths only."""
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise KubeError(f"kubeconfig {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise KubeError(f"kubeconfig {path}: not a YAML mapping")
        ctx_name = context or doc.get("current-context")

        def named(section: str, name: Any) -> dict[str, Any]:
            for item in doc.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    body = item.get(section[:-1])
                    if isinstance(body, dict):
                        return body
            raise KubeError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")

        ctx = named("contexts", ctx_name)
        cluster = named("clusters", ctx.get("cluster"))
        user = named("users", ctx.get("user")) if ctx.get("user") else {}
        server = cluster.get("server")
        if not isinstance(server, str) or not server.startswith(("https://", "http://")):
            raise KubeError(f"kubeconfig {path}: cluster server {server!r} is not an http(s) URL")

        def file_or_data(body: dict[str, Any], key: str) -> str | None:
            if body.get(key):
                return str(Path(path).parent / str(body[key]))
            data = body.get(f"{key}-data")
            if not data:
                return None
            fd, name = tempfile.mkstemp(prefix="kube-", suffix=".pem")
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(data))
            return name

        token = user.get("token")
        if user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        return cls(
            server=server.rstrip("/"),
            token=token if isinstance(token, str) else None,
            ca_file=file_or_data(cluster, "certificate-authority"),
            cert_file=file_or_data(user, "client-certificate"),
            key_file=file_or_data(user, "client-key"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            namespace=str(ctx.get("namespace") or "default"),
        )


def _ssl_context(cfg: KubeConfig) -> ssl.SSLContext | None:
    if cfg.server.startswith("http://"):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


def with_query(path: str, params: Mapping[str, str | int | bool | None]) -> str:
    clean = {
        k: ("true" if v is True else "false" if v is False else str(v))
        for k, v in params.items()
        if v is not None and v != ""
    }
    return f"{path}?{urllib.parse.urlencode(clean)}" if clean else path


def status_error(method: str, path: str, code: int, body: bytes) -> ApiStatus:
    """Map a non-2xx answer (a `Status` object when the server is an API server) to an error."""
    reason, message = "", body[:200].decode(errors="replace")
    try:
        doc = json.loads(body)
        if isinstance(doc, dict):
            reason = str(doc.get("reason") or "")
            message = str(doc.get("message") or message)
    except ValueError:
        pass
    cls = Gone if code == 410 else ApiStatus
    return cls(method, path, code, reason, message)


@contextmanager
def _errors(where: str) -> Iterator[None]:
    """The shared client's errors as KubeError, prefixed with the request."""
    try:
        yield
    except HttpClientError as exc:
        raise KubeError(f"{where}: {exc}") from None


class KubeClient:
    """Requests to one API server. `connector` replaces the TCP connect (tests: memory streams)."""

    def __init__(
        self, cfg: KubeConfig, *, timeout: float = 30.0, connector: Connector | None = None
    ) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self._connector = connector
        parsed = urllib.parse.urlsplit(cfg.server)
        self._host = parsed.hostname or "localhost"
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._host_header = parsed.netloc
        self._ssl = _ssl_context(cfg)

    @asynccontextmanager
    async def _exchange(
        self, method: str, path: str, body: Any | None
    ) -> AsyncIterator[HttpConnection]:
        """A new connection with the request sent on it; closed on the way out."""
        where = f"{method} {path}"
        try:
            conn = await HttpConnection.open(
                self._host,
                self._port,
                host_header=self._host_header,
                ssl_context=self._ssl,
                connector=self._connector,
                peer="the API server",
            )
        except ConnectError as exc:
            raise KubeError(f"{where}: connect {self.cfg.server}: {exc.reason}") from None
        except HttpClientError as exc:
            raise KubeError(f"{where}: {exc}") from None
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            headers = [("Accept", "application/json"), ("User-Agent", "nodeagent-kube-sync")]
            if body is not None:
                headers.append(("Content-Type", "application/json"))
            if self.cfg.token:
                headers.append(("Authorization", f"Bearer {self.cfg.token}"))
            with _errors(where):
                await conn.send(method, path, headers, payload)
            yield conn
        finally:
            await conn.aclose()

    async def request(self, method: str, path: str, body: Any | None = None) -> dict[str, Any]:
        """One unary call; the decoded JSON object, or ApiStatus/Gone for a non-2xx answer."""
        try:
            with trio.fail_after(self.timeout):
                async with self._exchange(method, path, body) as conn:
                    with _errors(f"{method} {path}"):
                        code = await conn.read_head()
                        raw = await conn.read_body()
        except trio.TooSlowError:
            raise KubeError(f"{method} {path}: no answer within {self.timeout}s") from None
        if not 200 <= code < 300:
            raise status_error(method, path, code, raw)
        try:
            return parse_object(raw)
        except ProtocolError as exc:
            raise KubeError(f"{method} {path}: {exc}") from None

    @asynccontextmanager
    async def watch(self, path: str, *, idle: float) -> AsyncIterator[WatchStream]:
        """The watch events (`{"type", "object"}`) of a `?watch=true` request, as an async
        iterator that ends when the server ends the response (its timeoutSeconds). A non-2xx
        answer raises ApiStatus (Gone for 410) before anything is yielded. Nothing at all for
        `idle` seconds (set it above the request's timeoutSeconds) is a dead connection."""
        async with self._exchange("GET", path, None) as conn:
            try:
                with trio.fail_after(self.timeout), _errors(f"GET {path}"):
                    code = await conn.read_head()
            except trio.TooSlowError:
                raise KubeError(f"GET {path}: no answer within {self.timeout}s") from None
            if not 200 <= code < 300:
                with _errors(f"GET {path}"):
                    raw = await conn.read_body()
                raise status_error("GET", path, code, raw)
            yield WatchStream(conn, path, idle)


class WatchStream:
    """Async iterator over one watch response (a class, not an async generator, so that
    closing it never depends on garbage collection)."""

    def __init__(self, conn: HttpConnection, path: str, idle: float) -> None:
        self._conn = conn
        self._path = path
        self._idle = idle
        self._lines = JsonLines()
        self._done = False

    def __aiter__(self) -> WatchStream:
        return self

    async def __anext__(self) -> dict[str, Any]:
        while True:
            try:
                ev = self._lines.next_event()
                if ev is not None:
                    return ev
                if self._done:
                    last = self._lines.finish()
                    if last is not None:
                        return last
                    raise StopAsyncIteration
            except ProtocolError as exc:
                raise KubeError(f"watch {self._path}: {exc}") from None
            with trio.move_on_after(self._idle), _errors(f"GET {self._path}"):
                chunk = await self._conn.read_chunk()
                if chunk is None:
                    self._done = True
                else:
                    self._lines.receive_data(chunk)
                continue
            raise KubeError(f"watch {self._path}: nothing received for {self._idle:g}s")
