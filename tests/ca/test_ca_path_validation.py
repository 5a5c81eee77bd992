"""Full path validation of SVID and issuer chains (`certs.verify_svid`, `verify_issuer_chain`):
validity windows, the CA flag and key usage of intermediates, the trust anchor, the SPIFFE id."""

from __future__ import annotations

import datetime
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.ca import certs

TD = "cluster.local"
WEB = certs.SpiffeId(TD, "default", "web")
NOW = time.time()
HOUR = 3600.0


def _utc(ts: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)


def _root() -> certs.SigningAuthority:
    key, root = certs.create_root(TD, now=NOW - 10 * 86400)
    return certs.SigningAuthority(key, root, (), (root,))


def _intermediate(
    root: certs.SigningAuthority,
    *,
    ca: bool = True,
    key_usage: bool = True,
    start: float = NOW - 86400,
    end: float = NOW + 86400,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> certs.SigningAuthority:
    key = key or certs.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(end))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if key_usage:
        builder = builder.add_extension(certs.key_usage(key_cert_sign=True), critical=True)
    cert = builder.sign(root.key, hashes.SHA256())
    return certs.SigningAuthority(key, cert, (), root.roots)


def _leaf(
    issuer: certs.SigningAuthority, *, now: float = NOW, ttl: float = HOUR
) -> x509.Certificate:
    key = certs.new_key()
    csr = certs.check_csr(certs.build_csr(key, WEB), WEB)
    return certs.sign_svid(issuer, csr, WEB, now=now, ttl=ttl)


def _verify(chain: list[x509.Certificate], roots: tuple[x509.Certificate, ...]) -> certs.SpiffeId:
    return certs.verify_svid(chain, roots, trust_domain=TD, now=NOW, where="svid")


def test_a_good_chain_is_accepted_and_names_its_identity() -> None:
    root = _root()
    inter = _intermediate(root)
    assert _verify([_leaf(root)], root.roots) == WEB
    assert _verify([_leaf(inter), inter.cert], root.roots) == WEB


def test_an_expired_leaf_is_refused() -> None:
    root = _root()
    leaf = _leaf(root, now=NOW - 2 * HOUR, ttl=HOUR)
    with pytest.raises(certs.CertError, match=r"svid\[0\]: expired at "):
        _verify([leaf], root.roots)


def test_a_leaf_not_yet_valid_is_refused() -> None:
    root = _root()
    leaf = _leaf(root, now=NOW + 2 * HOUR, ttl=HOUR)
    with pytest.raises(certs.CertError, match=r"svid\[0\]: not valid before "):
        _verify([leaf], root.roots)


def test_an_intermediate_without_the_ca_flag_is_refused() -> None:
    root = _root()
    inter = _intermediate(root, ca=False)
    with pytest.raises(certs.CertError, match=r"basicConstraints\.cA must be asserted"):
        _verify([_leaf(inter), inter.cert], root.roots)


def test_an_intermediate_without_key_usage_is_refused() -> None:
    root = _root()
    inter = _intermediate(root, key_usage=False)
    with pytest.raises(certs.CertError, match="missing required extension"):
        _verify([_leaf(inter), inter.cert], root.roots)


def test_an_expired_intermediate_is_refused() -> None:
    root = _root()
    inter = _intermediate(root)
    leaf = _leaf(inter)
    # the same intermediate key, in a certificate that expired a minute ago: only the
    # intermediate is out of date, the leaf is inside its window
    expired = _intermediate(root, start=NOW - 2 * 86400, end=NOW - 60, key=inter.key)
    with pytest.raises(certs.CertError, match=r"svid\[1\]: expired at "):
        _verify([leaf, expired.cert], root.roots)


def test_a_chain_to_a_foreign_root_is_refused() -> None:
    root, foreign = _root(), _root()
    with pytest.raises(certs.CertError, match="does not chain to any root of the trust bundle"):
        _verify([_leaf(root)], foreign.roots)
    inter = _intermediate(root)
    with pytest.raises(certs.CertError, match="does not chain to any root of the trust bundle"):
        _verify([_leaf(inter), inter.cert], foreign.roots)


def test_a_leaf_of_another_trust_domain_is_refused() -> None:
    root = _root()
    with pytest.raises(certs.CertError, match="is not ours"):
        certs.verify_svid([_leaf(root)], root.roots, trust_domain="other.org", now=NOW, where="s")


def test_issuer_chains_are_validated_too() -> None:
    root = _root()
    good = _intermediate(root)
    certs.verify_issuer_chain([good.cert], root.roots, now=NOW, where="issuer")
    certs.verify_issuer_chain([root.cert], root.roots, now=NOW, where="issuer")
    expired = _intermediate(root, start=NOW - 2 * 86400, end=NOW - 60)
    with pytest.raises(certs.CertError, match=r"issuer\[0\]: expired at "):
        certs.verify_issuer_chain([expired.cert], root.roots, now=NOW, where="issuer")
    with pytest.raises(certs.CertError, match="not a CA"):
        certs.verify_issuer_chain(
            [_intermediate(root, ca=False).cert], root.roots, now=NOW, where="issuer"
        )


def test_a_crl_from_an_expired_issuer_is_refused() -> None:
    root = _root()
    expired = _intermediate(root, start=NOW - 2 * 86400, end=NOW - 60)
    crl = certs.build_crl(expired, {7}, now=NOW - 3600)
    with pytest.raises(certs.CertError, match="expired at"):
        certs.verify_crl(crl, (expired.cert,), root.roots, now=NOW)
