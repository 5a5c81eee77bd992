"""The CA directory: the signing key, its chain, the trust domain, and the revoked serials.

    <dir>/ca.key        the signing key (PEM, mode 0600; never in the store)
    <dir>/chain.pem     the key's certificate, intermediates, the self-signed root last
    <dir>/ca.json       {"v": 1, "trust_domain": …}
    <dir>/revoked.json  {"v": 1, "serials": ["<hex>", …]}  (the CRL is built from it)

The directory may be a mounted Kubernetes Secret (read-only) for `serve`; `revoke` needs it
writable. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from nodeagent.ca import certs

KEY_FILE = "ca.key"
CHAIN_FILE = "chain.pem"
META_FILE = "ca.json"
REVOKED_FILE = "revoked.json"


class CaDirError(Exception):
    """The CA directory is missing, incomplete or malformed; names the file and the problem."""


@dataclass(frozen=True, slots=True)
class CaDir:
    path: Path

    @property
    def key_file(self) -> Path:
        return self.path / KEY_FILE

    @property
    def chain_file(self) -> Path:
        return self.path / CHAIN_FILE

    @property
    def meta_file(self) -> Path:
        return self.path / META_FILE

    @property
    def revoked_file(self) -> Path:
        return self.path / REVOKED_FILE


def init(
    path: Path,
    trust_domain: str,
    *,
    intermediate_key: Path | None = None,
    intermediate_chain: Path | None = None,
    now: float | None = None,
) -> tuple[CaDir, certs.SigningAuthority]:
    """Create a CA directory: a new root, or the given intermediate key and chain. Refuses to
    overwrite an existing CA (its key file)."""
    certs.check_trust_domain(trust_domain)
    d = CaDir(path)
    if (intermediate_key is None) != (intermediate_chain is None):
        raise CaDirError("--intermediate-key and --intermediate-chain go together")
    if d.key_file.exists() or d.chain_file.exists():
        raise CaDirError(f"{path} already holds a CA ({d.key_file}); refusing to overwrite it")
    if intermediate_key is not None and intermediate_chain is not None:
        try:
            key_data, chain_data = intermediate_key.read_bytes(), intermediate_chain.read_bytes()
        except OSError as exc:
            raise CaDirError(f"reading the intermediate CA: {exc}") from None
        authority = certs.load_authority(
            key_data,
            chain_data,
            f"intermediate {intermediate_key}",
            now=time.time() if now is None else now,
        )
        key_pem = certs.key_pem(authority.key)
        chain_pem = chain_data
    else:
        key, root = certs.create_root(trust_domain, now=time.time() if now is None else now)
        authority = certs.SigningAuthority(key, root, (), (root,))
        key_pem, chain_pem = certs.key_pem(key), certs.cert_pem([root])
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(d.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CaDirError(f"{d.key_file} already exists; refusing to overwrite it") from None
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    _write(d.chain_file, chain_pem)
    _write(d.meta_file, json.dumps({"v": 1, "trust_domain": trust_domain}).encode())
    return d, authority


def load(path: Path, *, now: float | None = None) -> tuple[certs.SigningAuthority, str]:
    """The signing authority and trust domain of a CA directory, valid at `now` (default: the
    current time)."""
    d = CaDir(path)
    try:
        key_data, chain_data = d.key_file.read_bytes(), d.chain_file.read_bytes()
        meta = json.loads(d.meta_file.read_text())
    except FileNotFoundError as exc:
        raise CaDirError(f"{path} is not a CA directory: {exc.filename} is missing") from None
    except (OSError, ValueError) as exc:
        raise CaDirError(f"reading the CA directory {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("v") != 1:
        raise CaDirError(f"{d.meta_file}: not a version 1 CA description")
    td = certs.check_trust_domain(meta.get("trust_domain"))  # type: ignore[arg-type]
    when = time.time() if now is None else now
    return certs.load_authority(key_data, chain_data, str(path), now=when), td


def load_revoked(path: Path) -> set[int]:
    f = CaDir(path).revoked_file
    try:
        doc = json.loads(f.read_text())
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as exc:
        raise CaDirError(f"reading {f}: {exc}") from None
    try:
        return {int(s, 16) for s in doc["serials"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise CaDirError(f"{f}: malformed revocation list ({exc!r})") from None


def add_revoked(path: Path, serials: set[int]) -> set[int]:
    """Add serials to the revocation list; returns the whole list."""
    revoked = load_revoked(path) | serials
    doc = {"v": 1, "serials": sorted(certs.serial_hex(s) for s in revoked)}
    _write(CaDir(path).revoked_file, json.dumps(doc, indent=2).encode())
    return revoked


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
