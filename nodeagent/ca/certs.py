"""X.509 for the mesh, without I/O: roots, CSRs, SPIFFE SVIDs, chains and revocation lists.

Everything here is a pure function of its arguments (the current time is passed in), so the
signer, the agent's identity manager and the tests share one implementation. Keys are ECDSA P-256
(DESIGN.md); an SVID carries exactly one URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>` and no other
name, is not a CA, and may sign (digitalSignature) and agree keys (TLS 1.3 ECDHE) for both TLS
server and client use.
"""

from __future__ import annotations

import datetime
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

# Accepting a certificate a little before its notBefore tolerates clocks that are a bit apart.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Bounds on what we parse from the store or files: a bundle or chain is a handful of certs.
MAX_PEM = 256 * 1024
MAX_CHAIN = 8

# RFC 1123 labels for namespaces; service-account names are DNS subdomains (dots allowed).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SERVICE_ACCOUNT = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
_TRUST_DOMAIN = re.compile(r"[a-z0-9]([-a-z0-9._]{0,253}[a-z0-9])?")


class CertError(Exception):
    """A certificate, key, CSR, chain or CRL is malformed or does not verify; says which and why."""


class SpiffeIdError(CertError):
    """A string is not a SPIFFE id of the mesh's shape (`spiffe://<td>/ns/<ns>/sa/<sa>`)."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def key(self) -> str:
        """The identity's part of a store key: `/mesh/v1/csr/<node>/<ns>/<sa>`."""
        return f"{self.namespace}/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def check_trust_domain(td: str) -> str:
    if not isinstance(td, str) or not _TRUST_DOMAIN.fullmatch(td):
        raise SpiffeIdError(
            f"trust domain {td!r} is not valid: lower-case letters, digits, '.', '-', '_'"
        )
    return td


def parse_spiffe_id(text: str, trust_domain: str | None = None) -> SpiffeId:
    """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; with `trust_domain`, it must be that one."""
    if not isinstance(text, str):
        raise SpiffeIdError(f"SPIFFE id must be a string, not {type(text).__name__}")
    if len(text) > 2048:
        raise SpiffeIdError(f"SPIFFE id of {len(text)} characters is over the 2048 bound")
    if not text.startswith("spiffe://"):
        raise SpiffeIdError(f"{text!r} is not a SPIFFE id: it must start with 'spiffe://'")
    td, _, path = text.removeprefix("spiffe://").partition("/")
    try:
        check_trust_domain(td)
    except SpiffeIdError as exc:
        raise SpiffeIdError(f"{text!r}: {exc}") from None
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise SpiffeIdError(f"{text!r}: the path must be /ns/<namespace>/sa/<service-account>")
    ns, sa = parts[1], parts[3]
    if not _NAMESPACE.fullmatch(ns):
        raise SpiffeIdError(f"{text!r}: namespace {ns!r} is not a DNS label")
    if not _SERVICE_ACCOUNT.fullmatch(sa):
        raise SpiffeIdError(f"{text!r}: service account {sa!r} is not a DNS subdomain")
    if trust_domain is not None and td != trust_domain:
        raise SpiffeIdError(f"{text!r}: trust domain {td!r} is not ours ({trust_domain!r})")
    return SpiffeId(td, ns, sa)


# -- keys and PEM ---------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(data: bytes, where: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertError(f"{where}: the key must be ECDSA P-256")
    return key


def cert_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_certs(data: bytes, where: str, *, limit: int = MAX_CHAIN) -> list[x509.Certificate]:
    """One or more PEM certificates (a chain or a bundle); at least one, at most `limit`."""
    if len(data) > MAX_PEM:
        raise CertError(f"{where}: {len(data)} bytes of PEM is over the {MAX_PEM} byte bound")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertError(f"{where}: not PEM certificates ({exc})") from None
    if len(certs) > limit:
        raise CertError(f"{where}: {len(certs)} certificates, at most {limit} allowed")
    return certs


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


def not_after(cert: x509.Certificate) -> float:
    return cert.not_valid_after_utc.timestamp()


def not_before(cert: x509.Certificate) -> float:
    return cert.not_valid_before_utc.timestamp()


# -- the CA ---------------------------------------------------------------------------------------


def create_root(
    trust_domain: str, *, now: float, validity: float = 10 * 365 * 86400.0
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed root for `trust_domain`: CA, path length 1 (it may sign intermediates)."""
    check_trust_domain(trust_domain)
    key = new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"mesh root {secrets.token_hex(4)}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now) - CLOCK_SKEW)
        .not_valid_after(_utc(now + validity))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(key_usage(key_cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def key_usage(*, key_cert_sign: bool = False, leaf: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=leaf,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=leaf,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True, slots=True)
class SigningAuthority:
    """The key that signs SVIDs and CRLs, its certificate, the intermediates between it and a
    root (sent with every SVID), and the root(s) it chains to."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    @property
    def issuer_chain(self) -> tuple[x509.Certificate, ...]:
        """What a peer needs besides a root to verify an SVID: the signer and intermediates."""
        return () if is_self_signed(self.cert) else (self.cert, *self.intermediates)


def load_authority(
    key_pem_data: bytes, chain_pem: bytes, where: str, *, now: float
) -> SigningAuthority:
    """A signing key and its chain: the key's certificate first, then intermediates, then the
    self-signed root last (for a self-created root, the chain is just the root). The chain must
    validate at `now`: a CA that starts with an expired intermediate would sign SVIDs no peer
    accepts."""
    key = load_key(key_pem_data, f"{where} key")
    chain = load_certs(chain_pem, f"{where} chain")
    cert = chain[0]
    if cert.public_key() != key.public_key():
        raise CertError(f"{where}: the key does not match the first certificate of the chain")
    roots = tuple(c for c in chain if is_self_signed(c))
    if not roots or not is_self_signed(chain[-1]):
        raise CertError(f"{where}: the chain must end with a self-signed root certificate")
    verify_issuer_chain(chain, roots, now=now, where=f"{where} chain")
    intermediates = tuple(c for c in chain[1:] if not is_self_signed(c))
    return SigningAuthority(key, cert, intermediates, roots)


def _check_ca(cert: x509.Certificate, where: str) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise CertError(f"{where}: the certificate has no basicConstraints (not a CA)") from None
    if not bc.ca:
        raise CertError(f"{where}: the certificate is not a CA (basicConstraints ca=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign or not ku.crl_sign:
        raise CertError(f"{where}: the CA certificate lacks keyCertSign/cRLSign key usage")


def verify_svid(
    chain: Sequence[x509.Certificate],
    roots: Iterable[x509.Certificate],
    *,
    trust_domain: str,
    now: float,
    where: str,
) -> SpiffeId:
    """Full RFC 5280 path validation of an SVID chain (the leaf first, then intermediates) at
    `now`, and the leaf's one SPIFFE id of `trust_domain`, which is returned.

    Validation is cryptography's webpki verifier as a *client* verifier: the server verifier
    insists on matching a DNS name or IP address, and an SVID carries only its URI SAN. The
    client verifier checks what matters here: every certificate's validity window, the CA flag,
    path length and keyCertSign on each issuer, no CA flag and a well-formed SAN on the leaf,
    and the clientAuth extended key usage (our SVIDs carry serverAuth and clientAuth)."""
    _validate(chain, roots, now=now, where=where, ee_policy=ExtensionPolicy.webpki_defaults_ee())
    try:
        return spiffe_id_of(chain[0], trust_domain)
    except CertError as exc:
        raise CertError(f"{where}: {exc}") from None


def verify_issuer_chain(
    chain: Sequence[x509.Certificate], roots: Iterable[x509.Certificate], *, now: float, where: str
) -> None:
    """Path validation at `now` of a chain whose first certificate is itself a CA (a signing
    authority, a CRL's issuer): the same checks as `verify_svid`, with CA rules for the first."""
    _check_ca(chain[0], f"{where}[0]")
    _validate(chain, roots, now=now, where=where, ee_policy=ExtensionPolicy.webpki_defaults_ca())


def _validate(
    chain: Sequence[x509.Certificate],
    roots: Iterable[x509.Certificate],
    *,
    now: float,
    where: str,
    ee_policy: ExtensionPolicy,
) -> None:
    roots = list(roots)
    if not chain:
        raise CertError(f"{where}: no certificate")
    if not roots:
        raise CertError(f"{where}: the trust bundle is empty")
    # The verifier's own message for a validity failure does not say which certificate or
    # when; check the windows of what was presented first, so the error names them.
    for i, cert in enumerate(chain):
        _check_window(cert, now, f"{where}[{i}]")
    leaf = chain[0]
    if len(chain) == 1 and leaf in roots:
        return  # a root used as the signing authority itself: it is its own trust anchor
    builder = (
        PolicyBuilder()
        .store(Store(roots))
        .time(_utc(now))
        .max_chain_depth(MAX_CHAIN)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
    )
    try:
        builder.build_client_verifier().verify(leaf, list(chain[1:]))
    except VerificationError as exc:
        raise CertError(f"{where}: {_reason(str(exc))}") from None


def _check_window(cert: x509.Certificate, now: float, where: str) -> None:
    if now < not_before(cert):
        raise CertError(
            f"{where}: not valid before {cert.not_valid_before_utc.isoformat()} "
            f"(now is {_utc(now).isoformat()})"
        )
    if now > not_after(cert):
        raise CertError(f"{where}: expired at {cert.not_valid_after_utc.isoformat()}")


def _reason(message: str) -> str:
    """The verifier's message, made readable: no prefix, and the bare 'no path' case named."""
    message = message.removeprefix("validation failed: ")
    if "all candidates exhausted with no interior errors" in message:
        return "does not chain to any root of the trust bundle"
    return message.removeprefix("candidates exhausted: ")


# -- CSRs and SVIDs --------------------------------------------------------------------------------


def build_csr(key: ec.EllipticCurvePrivateKey, ident: SpiffeId) -> bytes:
    """A DER CSR whose only name is the SPIFFE URI SAN."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident.uri)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def check_csr(der: bytes, ident: SpiffeId) -> x509.CertificateSigningRequest:
    """Parse a DER CSR; it must be self-consistent (signature), carry a P-256 key and name
    exactly `ident` (one URI SAN, no other SAN). CertError says what is wrong."""
    if not isinstance(der, bytes) or len(der) > 16 * 1024:
        raise CertError("the CSR must be DER bytes of at most 16 KiB")
    try:
        csr = x509.load_der_x509_csr(der)
    except ValueError as exc:
        raise CertError(f"the CSR is not DER PKCS#10 ({exc})") from None
    if not csr.is_signature_valid:
        raise CertError("the CSR's signature does not verify")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise CertError("the CSR's key must be ECDSA P-256")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertError("the CSR has no subjectAltName; it must name the SPIFFE id") from None
    except ValueError as exc:
        raise CertError(f"the CSR's extensions do not parse ({exc})") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(list(san)) != 1 or uris != [ident.uri]:
        names = [str(getattr(n, "value", n)) for n in san]
        raise CertError(
            f"the CSR names {names}, but its only subjectAltName must be the URI {ident.uri}"
        )
    return csr


def sign_svid(
    authority: SigningAuthority,
    csr: x509.CertificateSigningRequest,
    ident: SpiffeId,
    *,
    now: float,
    ttl: float,
) -> x509.Certificate:
    """An X.509 SVID for `ident` with the CSR's key; valid from a little before `now` (clock
    skew between nodes) to `now + ttl`, never past the signer's own expiry.

    The backdating is at most a tenth of the TTL: holders renew at half of notBefore..notAfter,
    and a backdating longer than the TTL itself would put that point in the past (a renewal
    storm with short TTLs)."""
    end = min(now + ttl, not_after(authority.cert))
    skew = min(CLOCK_SKEW, datetime.timedelta(seconds=ttl / 10))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now) - skew)
        .not_valid_after(_utc(end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(leaf=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ident.uri)]),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
    )
    return builder.sign(authority.key, hashes.SHA256())


def spiffe_id_of(cert: x509.Certificate, trust_domain: str) -> SpiffeId:
    """The one SPIFFE id a certificate carries; CertError when it has none, several, or one of
    another trust domain."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertError("the certificate has no subjectAltName (no SPIFFE id)") from None
    except ValueError as exc:
        raise CertError(f"the certificate's extensions do not parse ({exc})") from None
    uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if len(spiffe) != 1:
        raise CertError(f"the certificate carries {len(spiffe)} SPIFFE ids; exactly one needed")
    return parse_spiffe_id(spiffe[0], trust_domain)


# -- revocation ------------------------------------------------------------------------------------


def build_crl(
    authority: SigningAuthority,
    revoked: Iterable[int],
    *,
    now: float,
    validity: float = 7 * 86400.0,
) -> bytes:
    """A DER CRL signed by the authority, listing `revoked` serials."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.cert.subject)
        .last_update(_utc(now) - CLOCK_SKEW)
        .next_update(_utc(now + validity))
    )
    for serial in sorted(set(revoked)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_utc(now) - CLOCK_SKEW)
            .build()
        )
    return builder.sign(authority.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def verify_crl(
    der: bytes,
    issuer_chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: float,
) -> frozenset[int]:
    """The revoked serials of a DER CRL, after checking that its issuer (the first of
    `issuer_chain`, or a root when the chain is empty) signed it and that the issuer chain
    validates at `now`."""
    if not isinstance(der, bytes) or len(der) > MAX_PEM:
        raise CertError(f"the CRL must be DER bytes of at most {MAX_PEM} bytes")
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError as exc:
        raise CertError(f"the CRL is not DER X.509 ({exc})") from None
    candidates = [issuer_chain[0]] if issuer_chain else list(roots)
    if issuer_chain:
        verify_issuer_chain(issuer_chain, roots, now=now, where="the CRL's issuer chain")
    for issuer in candidates:
        if crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
            return frozenset(r.serial_number for r in crl)
    raise CertError("the CRL is not signed by its issuer chain or any root of the bundle")
