"""The mesh's mTLS rules, in one place for every holder of workload certificates (the agent's
`IdentityManager` and each worker's `WorkerIdentities`): the TLS 1.3 context of an identity,
and the check of a peer's certificate (its SPIFFE identity, not revoked)."""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Container
from pathlib import Path

from cryptography import x509

from nodeagent.ca import certs
from nodeagent.identity.api import PeerRejected


def mtls_context(
    chain_pem: bytes, key_pem: bytes, bundle_pem: str, *, server: bool
) -> ssl.SSLContext:
    """TLS 1.3 only, the peer's certificate required and verified against `bundle_pem` (the
    SPIFFE identity is checked by `peer_identity`, not by hostname)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if not server:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle_pem)
    # ssl loads keys from files only: a private temporary directory, removed at once.
    with tempfile.TemporaryDirectory(prefix="nodeagent-id-") as tmp:
        chain_file, key_file = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        chain_file.write_bytes(chain_pem)
        write_private(key_file, key_pem)
        ctx.load_cert_chain(chain_file, key_file)
    return ctx


def peer_identity(cert_der: bytes, trust_domain: str, revoked: Container[int]) -> str:
    """The SPIFFE URI of a verified peer certificate; PeerRejected when it names none in
    `trust_domain` or its serial is revoked."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
        ident = certs.spiffe_id_of(cert, trust_domain)
    except (ValueError, certs.CertError) as exc:
        raise PeerRejected(f"peer certificate: {exc}") from None
    if cert.serial_number in revoked:
        raise PeerRejected(
            f"peer certificate of {ident.uri} (serial "
            f"{certs.serial_hex(cert.serial_number)}) is revoked"
        )
    return ident.uri


def write_private(path: Path, data: bytes) -> None:
    """Write a file readable by its owner only (atomically: temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
