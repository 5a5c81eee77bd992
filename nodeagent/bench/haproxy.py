"""The peer proxy pipeline for the benchmarks: two HAProxy instances doing the mesh's hops.

client pod → HAProxy in node n1's netns (TCP, originates mutual TLS with a client certificate)
→ HAProxy in node n2's netns (terminates TLS, checks the client certificate) → server pod. One
frontend per application port. Certificates (ECDSA P-256, a throw-away CA) are generated here;
`config_text` is pure so its shape is testable; `HAProxyPipeline` starts both processes in the
sandbox, waits until they listen, and stops them by pid.

Each HAProxy runs one thread (`nbthread 1`): the agent is one trio thread per node, so a
multi-threaded HAProxy would be measured on a different number of cores.
"""

from __future__ import annotations

import datetime
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.sandbox import Sandbox

TLS_PORT_BASE = 17400  # n2 side: one TLS port per application port, base + index
START_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Hop:
    """One application port carried through the pipeline."""

    name: str
    listen_port: int  # on n1, where the client connects
    server_port: int  # on the server pod
    # HTTP/2 in the clear at both ends: HAProxy speaks h2 as an L7 proxy (mode http, h2c with
    # the client and the server, ALPN h2 on the TLS hop), not a byte relay.
    http2: bool = False


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def write_certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server and a client certificate (P-256), as HAProxy wants them (cert + key)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("bench-ca", ca_key, None, ca_key, ca=True)
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"bench-{role}", key, ca.subject, ca_key, ca=False)
        path = directory / f"{role}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + _pem_key(key))
        path.chmod(0o600)
        paths[role] = path
    return paths


def config_text(
    side: str,
    hops: list[Hop],
    *,
    listen_ip: str,
    peer_ip: str,
    certs: Mapping[str, Path],
) -> str:
    """HAProxy configuration for the client side (`n1`) or the server side (`n2`).

    n1: `listen_ip:hop.listen_port` → TLS to `peer_ip:TLS_PORT_BASE+i` (verifying the server).
    n2: TLS on `listen_ip:TLS_PORT_BASE+i` (requiring a client cert) → `peer_ip:hop.server_port`.
    """
    if side not in ("n1", "n2"):
        raise ValueError(f"HAProxy side must be n1 or n2, not {side!r}")
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 4096",
        "    tune.ssl.default-dh-param 2048",
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
    ]
    for i, hop in enumerate(hops):
        tls_port = TLS_PORT_BASE + i
        lines.append(f"listen {hop.name}")
        h2 = " proto h2" if hop.http2 else ""
        alpn = " alpn h2" if hop.http2 else ""
        if hop.http2:
            lines.append("    mode http")
        if side == "n1":
            lines.append(f"    bind {listen_ip}:{hop.listen_port}{h2}")
            lines.append(
                f"    server peer {peer_ip}:{tls_port} ssl verify required "
                f"ca-file {certs['ca']} crt {certs['client']} verifyhost bench-server{alpn}"
            )
        else:
            lines.append(
                f"    bind {listen_ip}:{tls_port} ssl crt {certs['server']} "
                f"ca-file {certs['ca']} verify required{alpn}"
            )
            lines.append(f"    server app {peer_ip}:{hop.server_port}{h2}")
    return "\n".join(lines) + "\n"


class HAProxyPipeline:
    """Both HAProxy processes in a sandbox; `start()` then `stop()` (idempotent, by pid)."""

    def __init__(self, sb: Sandbox, hops: list[Hop], server_ip: str) -> None:
        self.sb = sb
        self.hops = hops
        self.server_ip = server_ip
        self.dir = Path(tempfile.mkdtemp(prefix="nodeagent-bench-haproxy-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        n1, n2 = sb.node("n1"), sb.node("n2")
        self.client_ip = n1.gateway  # what client pods on n1 reach: the node's cni0 address
        self.n2_ip = n2.underlay_ip

    def pid(self, side: str) -> int:
        return self.procs[side].pid

    def start(self) -> None:
        binary = shutil.which("haproxy")
        if binary is None:
            raise RuntimeError("haproxy is not installed (Debian package haproxy)")
        certs = write_certificates(self.dir)
        try:
            for side, listen, peer in (
                ("n2", self.n2_ip, self.server_ip),
                ("n1", self.client_ip, self.n2_ip),
            ):
                cfg = self.dir / f"{side}.cfg"
                cfg.write_text(
                    config_text(side, self.hops, listen_ip=listen, peer_ip=peer, certs=certs)
                )
                check = self.sb.exec(f"node/{side}", [binary, "-c", "-q", "-f", str(cfg)])
                if check.returncode != 0:
                    raise RuntimeError(f"haproxy rejects {cfg}: {check.stderr.strip()}")
                log = (self.dir / f"{side}.log").open("wb")
                self.procs[side] = self.sb.popen(
                    f"node/{side}",
                    [binary, "-db", "-f", str(cfg)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                log.close()
                ports = (
                    [h.listen_port for h in self.hops]
                    if side == "n1"
                    else [TLS_PORT_BASE + i for i in range(len(self.hops))]
                )
                self._wait_listening(side, ports)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, side: str, ports: list[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            proc = self.procs[side]
            if proc.poll() is not None:
                log = (self.dir / f"{side}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"haproxy on {side} exited {proc.returncode}: {log}")
            out = self.sb.exec(f"node/{side}", ["ss", "-Htln"]).stdout
            if all(f":{p} " in out for p in ports):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy on {side} does not listen on {ports} after 10 s")
            time.sleep(0.05)

    def stop(self) -> None:
        for side, proc in list(self.procs.items()):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            del self.procs[side]
        shutil.rmtree(self.dir, ignore_errors=True)
