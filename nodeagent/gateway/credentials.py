"""Server certificates of the gateway's TLS servers: where they come from, and their contexts.

Two sources, as Istio users write them:
- `credentialName: NAME` → the directory given by `--gateway-credentials DIR`, laid out as
  Kubernetes mounts a TLS Secret: `DIR/NAME/tls.crt`, `DIR/NAME/tls.key`, the client CA in
  `DIR/NAME/ca.crt` or in the `NAME-cacert` Secret (`DIR/NAME-cacert/ca.crt`); Istio's generic
  Secret keys `cert`, `key`, `cacert` are read too.
- `serverCertificate`/`privateKey`/`caCertificates`: file paths on the gateway node.

`context_for(tls)` gives an `ssl.SSLContext` per server, cached and rebuilt when a file changes
(its inode, size or mtime; checked at most every `recheck` seconds, so a rotated certificate is
served by new connections within seconds, without a restart). A rotation caught half-way (a key
that does not match the certificate yet) keeps the previous context until the files agree.
Nothing here logs, returns or keeps the key bytes: OpenSSL reads the key file itself, and
errors name the credential and the file, never its contents.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.gateway.tls_settings import ServerTls
from nodeagent.log import get_logger

log = get_logger("gateway.credentials")

RECHECK = 1.0  # seconds between looks at a credential's files
ALPN = ("h2", "http/1.1")  # what the gateway speaks over TLS, in Envoy's order of preference
_VERSIONS = {"TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}
_CERT_NAMES = ("tls.crt", "cert")
_KEY_NAMES = ("tls.key", "key")
_CA_NAMES = ("ca.crt", "cacert")


class CredentialError(Exception):
    """A server's certificate cannot be loaded (names the credential or file, and why)."""


@dataclass(frozen=True, slots=True)
class CredentialFiles:
    label: str  # credentialName, or "files" for file paths, for messages and statistics
    cert: Path
    key: Path
    ca: Path | None


@dataclass(slots=True)
class _Entry:
    context: ssl.SSLContext
    fingerprint: tuple[tuple[int, int, int], ...]
    checked: float
    loads: int = 1
    error: str | None = None


def _first(directory: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


def _stat(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)  # follows the symlinks a Secret volume swaps (..data)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class CredentialSource:
    """Resolves and loads server credentials; one per gateway."""

    directory: Path | None = None
    recheck: float = RECHECK
    clock: Callable[[], float] = time.monotonic
    _cache: dict[ServerTls, _Entry] = field(default_factory=dict, init=False, repr=False)

    def files_for(self, tls: ServerTls) -> CredentialFiles:
        """The files of `tls`'s certificate, key and (MUTUAL) CA; CredentialError if missing."""
        name = tls.credential_name
        if name is None:
            if tls.server_certificate is None or tls.private_key is None:
                raise CredentialError(f"{tls.mode} server has no credentialName and no files")
            ca = Path(tls.ca_certificates) if tls.ca_certificates else None
            if tls.mutual and ca is None:
                raise CredentialError("MUTUAL server has no caCertificates")
            return CredentialFiles("files", Path(tls.server_certificate), Path(tls.private_key), ca)
        if self.directory is None:
            raise CredentialError(
                f"credentialName {name!r}: the agent has no credential source "
                "(nodeagent run --gateway-credentials DIR)"
            )
        base = self.directory / name
        cert, key = _first(base, _CERT_NAMES), _first(base, _KEY_NAMES)
        if cert is None or key is None:
            raise CredentialError(
                f"credentialName {name!r}: {base}/ has no tls.crt and tls.key (nor cert and key)"
            )
        ca = None
        if tls.mutual:
            ca = _first(base, _CA_NAMES) or _first(self.directory / f"{name}-cacert", _CA_NAMES)
            if ca is None:
                raise CredentialError(
                    f"credentialName {name!r}: MUTUAL needs a CA: no {base}/ca.crt "
                    f"and no {self.directory / (name + '-cacert')}/ca.crt"
                )
        return CredentialFiles(name, cert, key, ca)

    def context_for(self, tls: ServerTls) -> ssl.SSLContext:
        """The server context of `tls`, current with its files. CredentialError when there is
        none that loads (a previous good one is kept over a bad rotation)."""
        now = self.clock()
        entry = self._cache.get(tls)
        if entry is not None and now - entry.checked < self.recheck:
            return entry.context
        try:
            files = self.files_for(tls)
            fingerprint = tuple(
                _stat(p) for p in (files.cert, files.key, files.ca) if p is not None
            )
        except (CredentialError, OSError) as exc:
            return self._keep_or_raise(tls, entry, now, str(exc))
        if entry is not None and entry.fingerprint == fingerprint:
            entry.checked = now
            return entry.context
        try:
            context = build_context(tls, files)
        except CredentialError as exc:
            return self._keep_or_raise(tls, entry, now, str(exc))
        loads = entry.loads + 1 if entry is not None else 1
        self._cache[tls] = _Entry(context, fingerprint, now, loads)
        log.info("credential.loaded", credential=files.label, cert=str(files.cert), loads=loads)
        return context

    def _keep_or_raise(
        self, tls: ServerTls, entry: _Entry | None, now: float, error: str
    ) -> ssl.SSLContext:
        if entry is None:
            raise CredentialError(error)
        if entry.error != error:
            log.warning("credential.reload_failed", error=error, keeping="previous certificate")
        entry.error = error
        entry.checked = now
        return entry.context

    def forget_unused(self, used: set[ServerTls]) -> None:
        """Drop contexts of servers that are gone (a Gateway deleted or changed)."""
        for tls in set(self._cache) - used:
            del self._cache[tls]

    def statistics(self) -> dict[str, Any]:
        """Per credential: how often it was loaded and the last reload error (never key bytes)."""
        out: dict[str, Any] = {}
        for tls, entry in self._cache.items():
            label = tls.credential_name or tls.server_certificate or "?"
            out[label] = {"mode": tls.mode, "loads": entry.loads, "error": entry.error}
        return out


def build_context(tls: ServerTls, files: CredentialFiles) -> ssl.SSLContext:
    """A server context for `tls` from `files`. CredentialError says which part failed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[tls.min_version]
    context.maximum_version = _VERSIONS[tls.max_version]
    if context.minimum_version > context.maximum_version:
        raise CredentialError(f"{files.label}: minProtocolVersion is above maxProtocolVersion")
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
    except (ssl.SSLError, OSError) as exc:
        # The reason only (e.g. KEY_VALUES_MISMATCH): OpenSSL's message never carries key bytes.
        raise CredentialError(
            f"{files.label}: cannot load {files.cert} with {files.key}: "
            f"{getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}"
        ) from None
    if tls.cipher_suites:
        try:
            context.set_ciphers(":".join(tls.cipher_suites))
        except ssl.SSLError:
            raise CredentialError(f"{files.label}: no usable cipher suite") from None
    if tls.mutual:
        assert files.ca is not None
        try:
            context.load_verify_locations(cafile=str(files.ca))
        except (ssl.SSLError, OSError) as exc:
            raise CredentialError(f"{files.label}: cannot load CA {files.ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(list(ALPN))
    return context
