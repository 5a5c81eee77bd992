"""TLS origination: the proxy speaks TLS to an endpoint when its DestinationRule says so.

`trafficPolicy.tls` (or a port's) with mode SIMPLE or MUTUAL compiles to `balance.UpstreamTls`;
the pool wraps each new connection to such a cluster with `originate()` right after the
connector opened it, so the app talks plain HTTP (`http://api.external.example/`) and the
endpoint sees TLS. Verification: the chain against `caCertificates` (a file) or the system
store; the name against `subjectAltNames` when given, else the SNI (`sni`, else the service
host), as Istio's `VERIFY_CERTIFICATE_AT_CLIENT` does; `insecureSkipVerify` skips both, only
when asked. MUTUAL presents `clientCertificate`/`privateKey` (files). A handshake or
verification failure is an `UpstreamTlsError` (an OSError: the attempt's connect failure, 503
UF) carrying Envoy's transport failure reason for the response and the request's log line.

A plain socket (an endpoint outside the mesh) is wrapped by OpenSSL on the socket itself
(`tunnel.TlsStream`); any other stream (a mesh tunnel stream) through `trio.SSLStream`.
Contexts are cached per settings and rebuilt when one of their files changes.
"""

from __future__ import annotations

import os
import ssl

import trio

from nodeagent.balance import UpstreamTls
from nodeagent.tunnel import TlsStream, detach

HANDSHAKE_TIMEOUT = 10.0


class UpstreamTlsError(OSError):
    """TLS to the endpoint failed; `reason` is the transport failure reason Envoy logs."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"TLS to {where}: {reason}")
        self.reason = reason


def _fingerprint(tls: UpstreamTls) -> tuple[tuple[str, int, int], ...]:
    out = []
    for path in (tls.ca_certificates, tls.client_certificate, tls.private_key):
        if path is not None:
            try:
                st = os.stat(path)
                out.append((path, st.st_ino, st.st_mtime_ns))
            except OSError:
                out.append((path, 0, 0))
    return tuple(out)


_contexts: dict[UpstreamTls, tuple[tuple[tuple[str, int, int], ...], ssl.SSLContext]] = {}


def client_context(tls: UpstreamTls) -> ssl.SSLContext:
    """The client context for `tls` (cached; rebuilt when a file changed). UpstreamTlsError
    names the file that does not load."""
    fingerprint = _fingerprint(tls)
    cached = _contexts.get(tls)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        # subjectAltNames are checked after the handshake; without them, the name is the SNI.
        context.check_hostname = not tls.subject_alt_names
        try:
            if tls.ca_certificates is not None:
                context.load_verify_locations(cafile=tls.ca_certificates)
            else:
                context.load_default_certs()
        except (ssl.SSLError, OSError) as exc:
            raise UpstreamTlsError(
                "upstream", f"caCertificates {tls.ca_certificates}: {exc}"
            ) from None
    if tls.mode == "MUTUAL":
        assert tls.client_certificate is not None
        assert tls.private_key is not None
        try:
            context.load_cert_chain(tls.client_certificate, tls.private_key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
            raise UpstreamTlsError(
                "upstream", f"clientCertificate {tls.client_certificate}: {reason}"
            ) from None
    _contexts[tls] = (fingerprint, context)
    return context


def _reason(exc: BaseException) -> str:
    """Envoy's spelling of a TLS failure reason: `TLS_error:…:CERTIFICATE_VERIFY_FAILED`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS_error:CERTIFICATE_VERIFY_FAILED: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if reason:
        return f"TLS_error:{reason}"
    return f"TLS_error:{type(exc).__name__}: {exc}"


def _sans(cert: dict[str, object]) -> set[str]:
    entries = cert.get("subjectAltName") or ()
    return {str(e[1]) for e in entries if isinstance(e, tuple) and len(e) == 2}  # type: ignore[attr-defined]


async def originate(
    stream: trio.abc.Stream, tls: UpstreamTls, *, host: str, where: str
) -> trio.abc.Stream:
    """`stream` (just connected) wrapped in TLS per `tls`; `host` is the service host (the SNI
    when `tls.sni` is unset). Takes over `stream`: closed on failure."""
    server_name = tls.sni or host
    try:
        context = client_context(tls)
    except UpstreamTlsError:
        await stream.aclose()
        raise
    out: trio.abc.Stream = stream  # what to close on failure
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            if isinstance(stream, trio.SocketStream):
                wrapped = TlsStream.wrap(
                    detach(stream), context, server_side=False, server_hostname=server_name
                )
                out = wrapped
                await wrapped.do_handshake()
                peer = wrapped.ssl.getpeercert()
            else:
                ssl_stream = trio.SSLStream(stream, context, server_hostname=server_name)
                out = ssl_stream
                await ssl_stream.do_handshake()
                peer = ssl_stream.getpeercert()
    except (ssl.SSLError, OSError, trio.BrokenResourceError, trio.TooSlowError) as exc:
        with trio.CancelScope(shield=True):
            await out.aclose()
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if isinstance(exc, trio.TooSlowError):
            raise UpstreamTlsError(where, "TLS_error:handshake timeout") from None
        raise UpstreamTlsError(where, _reason(cause or exc)) from None
    if (
        tls.subject_alt_names
        and not tls.insecure_skip_verify
        and not _sans(dict(peer or {})) & set(tls.subject_alt_names)
    ):
        with trio.CancelScope(shield=True):
            await out.aclose()
        raise UpstreamTlsError(where, "TLS_error:the certificate has none of the subjectAltNames")
    return out
