"""X.509 primitives: SPIFFE ids, roots, CSRs, SVIDs, intermediates, CRLs; the CA directory."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.ca import certs, files
from nodeagent.ca.cli import main as ca_main

TD = "cluster.local"
WEB = certs.SpiffeId(TD, "default", "web")


def _authority() -> certs.SigningAuthority:
    key, root = certs.create_root(TD, now=time.time())
    return certs.SigningAuthority(key, root, (), (root,))


def test_spiffe_ids_parse_and_name_what_is_wrong() -> None:
    sid = certs.parse_spiffe_id("spiffe://cluster.local/ns/default/sa/web.v1")
    assert (sid.trust_domain, sid.namespace, sid.service_account) == (TD, "default", "web.v1")
    assert sid.key == "default/web.v1"
    cases = {
        "http://cluster.local/ns/a/sa/b": "must start with 'spiffe://'",
        "spiffe://cluster.local/ns/a/sb/b": "/ns/<namespace>/sa/<service-account>",
        "spiffe://cluster.local/ns/A/sa/b": "namespace 'A' is not a DNS label",
        "spiffe://cluster.local/ns/a/sa/b/c": "/ns/<namespace>/sa/<service-account>",
        "spiffe://Bad_TD!/ns/a/sa/b": "trust domain 'Bad_TD!' is not valid",
        "spiffe://cluster.local/ns/a/sa/": "service account '' is not a DNS subdomain",
    }
    for text, why in cases.items():
        with pytest.raises(certs.SpiffeIdError, match=re.escape(why)):
            certs.parse_spiffe_id(text)
    with pytest.raises(certs.SpiffeIdError, match="is not ours"):
        certs.parse_spiffe_id("spiffe://other.org/ns/a/sa/b", TD)


def test_root_is_a_p256_ca() -> None:
    auth = _authority()
    root = auth.cert
    assert certs.is_self_signed(root)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert ku.crl_sign
    assert not ku.digital_signature
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_sign_and_verify_round_trip() -> None:
    auth = _authority()
    key = certs.new_key()
    now = time.time()
    csr = certs.check_csr(certs.build_csr(key, WEB), WEB)
    leaf = certs.sign_svid(auth, csr, WEB, now=now, ttl=3600)
    leaf.verify_directly_issued_by(auth.cert)
    assert certs.verify_svid([leaf], auth.roots, trust_domain=TD, now=now, where="leaf") == WEB
    assert leaf.public_key() == key.public_key()
    assert certs.spiffe_id_of(leaf, TD) == WEB
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(WEB.uri)]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_agreement
    assert not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert certs.not_before(leaf) < now - 60  # clock skew allowance
    assert abs(certs.not_after(leaf) - (now + 3600)) < 2
    other = certs.sign_svid(auth, csr, WEB, now=now, ttl=3600)
    assert other.serial_number != leaf.serial_number  # random serials
    with pytest.raises(certs.CertError, match="does not chain"):
        certs.verify_svid([leaf], _authority().roots, trust_domain=TD, now=now, where="leaf")


@pytest.mark.parametrize("ttl", [10, 60, 3600, 86400])
def test_half_life_is_always_in_the_future(ttl: float) -> None:
    """Holders renew at the midpoint of notBefore..notAfter: the clock-skew backdating must never
    move it to before the moment of signing, or a short TTL renews in a loop."""
    auth = _authority()
    now = time.time()
    csr = certs.check_csr(certs.build_csr(certs.new_key(), WEB), WEB)
    leaf = certs.sign_svid(auth, csr, WEB, now=now, ttl=ttl)
    midpoint = (certs.not_before(leaf) + certs.not_after(leaf)) / 2
    assert now + 0.4 * ttl - 1 < midpoint < now + 0.5 * ttl + 1  # X.509 times are whole seconds


def test_csr_must_name_exactly_the_requested_identity() -> None:
    key = certs.new_key()
    der = certs.build_csr(key, certs.SpiffeId(TD, "default", "admin"))
    with pytest.raises(certs.CertError, match="only subjectAltName must be the URI"):
        certs.check_csr(der, WEB)
    with pytest.raises(certs.CertError, match="not DER PKCS#10"):
        certs.check_csr(b"\x30\x03junk", WEB)


def test_intermediate_chain(tmp_path: Path) -> None:
    root = _authority()
    # an intermediate signed by the root, with its own key
    ikey = certs.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.cert.subject)
        .public_key(ikey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(root.cert.not_valid_before_utc)
        .not_valid_after(root.cert.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(certs.key_usage(key_cert_sign=True), critical=True)
    )
    from cryptography.hazmat.primitives import hashes

    icert = builder.sign(root.key, hashes.SHA256())
    (tmp_path / "i.key").write_bytes(certs.key_pem(ikey))
    (tmp_path / "i.pem").write_bytes(certs.cert_pem([icert, root.cert]))
    d, auth = files.init(
        tmp_path / "ca",
        TD,
        intermediate_key=tmp_path / "i.key",
        intermediate_chain=tmp_path / "i.pem",
    )
    assert auth.roots == (root.cert,)
    assert auth.issuer_chain == (icert,)
    loaded, td = files.load(d.path)
    assert td == TD
    assert loaded.cert == icert
    key = certs.new_key()
    leaf = certs.sign_svid(
        loaded, certs.check_csr(certs.build_csr(key, WEB), WEB), WEB, now=time.time(), ttl=60
    )
    now = time.time()
    chain = [leaf, *loaded.issuer_chain]
    assert certs.verify_svid(chain, loaded.roots, trust_domain=TD, now=now, where="svid") == WEB
    # a CRL signed by the intermediate verifies through its chain
    crl = certs.build_crl(loaded, {leaf.serial_number}, now=now)
    revoked = certs.verify_crl(crl, loaded.issuer_chain, loaded.roots, now=now)
    assert revoked == {leaf.serial_number}
    # the wrong key for the chain is refused
    (tmp_path / "x.key").write_bytes(certs.key_pem(certs.new_key()))
    with pytest.raises(certs.CertError, match="does not match"):
        files.init(
            tmp_path / "ca2",
            TD,
            intermediate_key=tmp_path / "x.key",
            intermediate_chain=tmp_path / "i.pem",
        )


def test_crl_lists_serials_and_needs_the_right_signer() -> None:
    auth, other = _authority(), _authority()
    now = time.time()
    crl = certs.build_crl(auth, {5, 7}, now=now)
    assert certs.verify_crl(crl, (), auth.roots, now=now) == {5, 7}
    with pytest.raises(certs.CertError, match="not signed"):
        certs.verify_crl(crl, (), other.roots, now=now)
    with pytest.raises(certs.CertError, match="not DER"):
        certs.verify_crl(b"junk", (), auth.roots, now=now)


def test_ca_dir_init_refuses_to_overwrite(tmp_path: Path) -> None:
    d, auth = files.init(tmp_path / "ca", TD)
    assert stat.S_IMODE(os.stat(d.key_file).st_mode) == 0o600
    loaded, td = files.load(d.path)
    assert loaded.cert == auth.cert
    assert td == TD
    with pytest.raises(files.CaDirError, match="refusing to overwrite"):
        files.init(tmp_path / "ca", TD)
    assert files.add_revoked(d.path, {255}) == {255}
    assert files.load_revoked(d.path) == {255}


def test_cli_init_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ca_main(["init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD]) == 0
    assert "created CA for trust domain cluster.local" in capsys.readouterr().out
    assert ca_main(["init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "refusing to overwrite" in err
    assert ca_main(["serve", "--dir", str(tmp_path / "nope"), "--store", "memory://"]) == 1
    assert "is not a CA directory" in capsys.readouterr().err
