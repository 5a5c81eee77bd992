"""The destination agent sees HTTP: L7 AuthorizationPolicy, RequestAuthentication (JWT) and
reporter="destination" telemetry, on a 2-node sandbox with real clients (curl from pods and the
outside host) and a real JWKS server pod.

`web` and `api` run on n2 (an app that answers its request headers as JSON), their Services'
ports named `http` (parsed by n2's agent) and `tcp-raw` (L4: relayed untouched). Clients on n1:
`sleep` and `admin` (service accounts of the same names). `jwks` (n2, outside the mesh) serves
a JWKS file with `python3 -m http.server`; tokens are signed in the test with PyJWT. n1 runs the
ingress gateway, which runs the same authentication and authorization for its own workload.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from destination_helpers import ISSUER, Issuer, access_lines, ap, op, scrape
from mesh_helpers import apply, client_pods, eventually, http, sandbox_fixture
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox
from nodeagent.telemetry.exposition import samples

pytestmark = [pytest.mark.root, pytest.mark.slow]

sandbox = sandbox_fixture("dl7", gateway="n1")

WEB_VIP = "10.96.85.10"
API_VIP = "10.96.85.11"
SLEEP = "spiffe://cluster.local/ns/client/sa/sleep"
ADMIN = "spiffe://cluster.local/ns/client/sa/admin"
GATEWAY = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"

# `echo.py`: HTTP/1.1 keep-alive on 8080, answers {"method", "path", "headers"} as JSON with the
# status a `/status/NNN` path asks for (else 200), one "hit METHOD PATH" line per request;
# a raw TCP echo on 9000 (what a `tcp-*` port must deliver untouched).
ECHO = r"""
import json, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
lock = threading.Lock()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        with lock:
            sys.stdout.write(f"hit {self.command} {self.path}\n")
            sys.stdout.flush()
        status = 200
        if "/status/" in self.path:
            status = int(self.path.rsplit("/status/", 1)[1][:3])
        body = json.dumps({"method": self.command, "path": self.path,
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
def raw():
    s = socket.create_server(("0.0.0.0", 9000), reuse_port=True)
    while True:
        threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
threading.Thread(target=raw, daemon=True).start()
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

# A raw TCP client run in a pod: sends bytes that are not HTTP and prints what came back.
RAW_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"BOGUS * HTTP/9.9\r\nnot a header\r\n\r\n")
s.shutdown(socket.SHUT_WR)
got = b""
while chunk := s.recv(65536):
    got += chunk
sys.stdout.write(repr(got))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("destination_l7")


@pytest.fixture(scope="module")
def issuer(files: Path) -> Issuer:
    d = files / "jwks"
    d.mkdir()
    issuer = Issuer(d / "jwks.json")
    issuer.publish(k1=issuer.new_key("k1"))
    return issuer


@pytest.fixture(scope="module")
def pods(sandbox: Sandbox, files: Path, issuer: Issuer) -> dict[str, Pod]:
    (files / "echo.py").write_text(ECHO)
    (files / "raw.py").write_text(RAW_CLIENT)
    echo = ["python3", str(files / "echo.py")]
    sleep, _outsider = client_pods(sandbox)
    out = {
        "sleep": sleep,
        "admin": sandbox.pod_add(
            "n1", "client", "admin", ["sleep", "3600"], service_account="admin"
        ),
        "web": sandbox.pod_add(
            "n2", "shop", "web", echo, service_account="web", labels={"app": "web"}
        ),
        "api": sandbox.pod_add(
            "n2", "shop", "api", echo, service_account="api", labels={"app": "api"}
        ),
        "jwks": sandbox.pod_add(
            "n2", "shop", "jwks",
            ["python3", "-m", "http.server", "8000", "--directory", str(issuer.file.parent)],
            labels={"istio.io/dataplane-mode": "none"},
        ),
    }  # fmt: skip
    ports = [
        {"name": "http", "port": 80, "targetPort": 8080},
        {"name": "tcp-raw", "port": 9000, "targetPort": 9000},
    ]
    apply(
        sandbox,
        files,
        "services",
        [
            service("web", namespace="shop", cluster_ip=WEB_VIP, ports=ports),
            service("api", namespace="shop", cluster_ip=API_VIP, ports=ports),
        ],
    )
    return out


@pytest.fixture(scope="module")
def policies(sandbox: Sandbox, files: Path, pods: dict[str, Pod]) -> None:
    web = {"app": "web"}
    api = {"app": "api"}
    jwks_uri = f"http://{pods['jwks'].ip}:8000/jwks.json"
    docs = [
        ap("public", "shop", "ALLOW", [op(methods=["GET"], paths=["/public/*"])], web),
        ap(
            "admin",
            "shop",
            "ALLOW",
            [
                {
                    "from": [{"source": {"principals": ["cluster.local/ns/client/sa/admin"]}}],
                    **op(methods=["POST"], paths=["/admin"]),
                }
            ],
            web,
        ),
        ap("raw-port", "shop", "ALLOW", [op(ports=["9000"])], web),
        ap("api-open", "shop", "ALLOW", [op(paths=["/open/*"])], api),
        ap(
            "api-secure",
            "shop",
            "ALLOW",
            [{"from": [{"source": {"requestPrincipals": ["*"]}}], **op(paths=["/secure/*"])}],
            api,
        ),
        ap(
            "api-group",
            "shop",
            "ALLOW",
            [
                {
                    **op(paths=["/group/*"]),
                    "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}],
                }
            ],
            api,
        ),
        ap(
            "gw-internal",
            "istio-system",
            "DENY",
            [op(paths=["/internal/*"])],
            {"istio": "ingressgateway"},
        ),
        # JWT at the edge: /public/jwt/* needs a verified token at the gateway.
        ap(
            "gw-jwt-required",
            "istio-system",
            "DENY",
            [
                {
                    "from": [{"source": {"notRequestPrincipals": ["*"]}}],
                    **op(paths=["/public/jwt/*"]),
                }
            ],
            {"istio": "ingressgateway"},
        ),
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "gw-jwt", "namespace": "istio-system"},
            "spec": {
                "selector": {"matchLabels": {"istio": "ingressgateway"}},
                "jwtRules": [
                    {
                        "issuer": ISSUER,
                        "jwksUri": jwks_uri,
                        "audiences": ["api"],
                        "outputClaimToHeaders": [{"header": "x-gw-sub", "claim": "sub"}],
                    }
                ],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "api-jwt", "namespace": "shop"},
            "spec": {
                "selector": {"matchLabels": api},
                "jwtRules": [
                    {
                        "issuer": ISSUER,
                        "jwksUri": jwks_uri,
                        "audiences": ["api"],
                        "outputClaimToHeaders": [{"header": "x-jwt-sub", "claim": "sub"}],
                    }
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "shop-gw", "namespace": "shop"},
            "spec": {
                "selector": {"istio": "ingressgateway"},
                "servers": [
                    {"port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}
                ],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "web-gw", "namespace": "shop"},
            "spec": {
                "hosts": ["*"],
                "gateways": ["shop-gw"],
                "http": [{"route": [{"destination": {"host": "web", "port": {"number": 80}}}]}],
            },
        },
    ]
    apply(sandbox, files, "policies", docs)
    url = f"http://{WEB_VIP}/public/ready"
    eventually(lambda: http(sandbox, pods["sleep"], url)[0] == 200, "web answers /public")
    eventually(
        lambda: http(sandbox, pods["sleep"], f"http://{WEB_VIP}/private")[0] == 403,
        "n2 enforces the web policies",
    )


def requests_by_code(text: str, **match: str) -> Counter[str]:
    out: Counter[str] = Counter()
    for s in samples(text, "istio_requests_total"):
        if all(s.labels.get(k) == v for k, v in match.items()):
            out[s.labels["response_code"]] += int(s.value)
    return out


def hits(pod: Pod) -> list[str]:
    return [
        line.removeprefix("hit ")
        for line in Path(pod.log).read_text().splitlines()
        if line.startswith("hit ")
    ]


def echoed(body: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc


# -- paths, methods and identities -------------------------------------------------------------


def test_paths_and_methods_per_identity_across_nodes(
    sandbox: Sandbox, pods: dict[str, Pod], policies: None
) -> None:
    sleep, admin = pods["sleep"], pods["admin"]
    code, body, _ = http(sandbox, sleep, f"http://{WEB_VIP}/public/a?x=1")
    assert code == 200
    assert echoed(body)["path"] == "/public/a?x=1"
    post = ["-X", "POST", "-d", "x=1"]
    code, body, _ = http(sandbox, sleep, f"http://{WEB_VIP}/admin")
    assert code == 403  # GET /admin: no rule allows it, whoever asks
    assert body == "RBAC: access denied"
    r = sandbox.exec(
        sleep, ["curl", "-s", "-w", "\n%{http_code}", *post, f"http://{WEB_VIP}/admin"]
    )
    assert str(r.stdout).rsplit("\n", 1) == ["RBAC: access denied", "403"]
    r = sandbox.exec(
        admin, ["curl", "-s", "-w", "\n%{http_code}", *post, f"http://{WEB_VIP}/admin"]
    )
    body, code_text = str(r.stdout).rsplit("\n", 1)
    assert code_text == "200"
    assert echoed(body)["method"] == "POST"
    # Denied requests never reached the app; the admin's did.
    assert "POST /admin" in hits(pods["web"])
    assert hits(pods["web"]).count("POST /admin") == 1


def test_the_app_sees_the_verified_client_certificate_not_a_forged_one(
    sandbox: Sandbox, pods: dict[str, Pod], policies: None
) -> None:
    forged = "x-forwarded-client-cert: By=x;URI=spiffe://cluster.local/ns/client/sa/admin"
    code, body, _ = http(sandbox, pods["sleep"], f"http://{WEB_VIP}/public/xfcc", forged)
    assert code == 200
    xfcc = echoed(body)["headers"]["x-forwarded-client-cert"]
    assert xfcc.startswith("By=spiffe://cluster.local/ns/shop/sa/web;Hash=")
    assert xfcc.endswith(f'Subject="";URI={SLEEP}')
    assert "sa/admin" not in xfcc


def test_a_tcp_port_is_relayed_not_parsed(
    sandbox: Sandbox, pods: dict[str, Pod], files: Path, policies: None
) -> None:
    before = requests_by_code(scrape(sandbox, "n2"), reporter="destination",
                              destination_workload="web")  # fmt: skip
    r = sandbox.exec(pods["sleep"], ["python3", str(files / "raw.py"), WEB_VIP, "9000"])
    assert r.returncode == 0, r.stderr
    # The L7 path would have answered 400 to this; the L4 relay hands it to the app as it is.
    assert str(r.stdout) == repr(b"BOGUS * HTTP/9.9\r\nnot a header\r\n\r\n")
    after = requests_by_code(scrape(sandbox, "n2"), reporter="destination",
                             destination_workload="web")  # fmt: skip
    assert after == before  # no request was counted for the TCP port


# -- destination telemetry ---------------------------------------------------------------------


def test_destination_metrics_count_exactly_what_was_sent(
    sandbox: Sandbox, pods: dict[str, Pod], policies: None
) -> None:
    labels = {"reporter": "destination", "destination_workload": "web",
              "source_workload": "sleep"}  # fmt: skip
    before = requests_by_code(scrape(sandbox, "n2"), **labels)
    sent: Counter[str] = Counter()
    plan = [("/public/ok", 5), ("/public/status/404", 3), ("/public/status/500", 2),
            ("/private", 4)]  # fmt: skip
    for path, n in plan:
        for _ in range(n):
            code, _, _ = http(sandbox, pods["sleep"], f"http://{WEB_VIP}{path}")
            sent[str(code)] += 1
    assert sent == {"200": 5, "404": 3, "500": 2, "403": 4}

    def delta() -> Counter[str] | None:
        now = requests_by_code(scrape(sandbox, "n2"), **labels)
        got = Counter({k: now[k] - before[k] for k in now if now[k] - before[k]})
        return got if got == sent else None

    deadline = time.monotonic() + 10
    got = delta()
    while got is None and time.monotonic() < deadline:
        time.sleep(0.5)
        got = delta()
    assert got == sent, requests_by_code(scrape(sandbox, "n2"), **labels)
    text = scrape(sandbox, "n2")
    (denied,) = [
        s for s in samples(text, "istio_requests_total")
        if s.labels.get("reporter") == "destination" and s.labels["response_code"] == "403"
        and s.labels["source_workload"] == "sleep" and s.labels["destination_workload"] == "web"
    ]  # fmt: skip
    assert denied.labels["response_flags"] == "UAEX"
    assert denied.labels["source_principal"] == SLEEP
    assert denied.labels["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert denied.labels["destination_service_name"] == "web"
    assert denied.labels["connection_security_policy"] == "mutual_tls"
    assert denied.labels["request_protocol"] == "http"
    for name in ("istio_request_duration_milliseconds_count", "istio_request_bytes_count",
                 "istio_response_bytes_count"):  # fmt: skip
        total = sum(s.value for s in samples(text, name)
                    if s.labels.get("reporter") == "destination")  # fmt: skip
        assert total >= sum(sent.values()), name

    def private_lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(sandbox, "n2") if x["path"] == "/private"]

    eventually(lambda: len(private_lines()) >= 5, "n2's access-log lines")  # 4 + the fixture's
    lines = private_lines()
    line = lines[-1]
    assert line["reporter"] == "destination"
    assert (line["response_code"], line["response_flags"]) == (403, "UAEX")
    assert line["response_code_details"] == "rbac_access_denied_matched_policy[none]"
    assert line["source_principal"] == SLEEP
    assert line["downstream_address"].rpartition(":")[0] == pods["sleep"].ip
    assert line["upstream_host"] == f"{pods['web'].ip}:8080"


# -- the ingress gateway -----------------------------------------------------------------------


def test_through_the_gateway(sandbox: Sandbox, pods: dict[str, Pod], policies: None) -> None:
    url = sandbox.gateway_url()
    eventually(lambda: http(sandbox, "outside", f"{url}/public/gw")[0] == 200, "gateway route")
    code, body, _ = http(sandbox, "outside", f"{url}/public/gw")
    assert code == 200
    # The destination saw the gateway's verified identity.
    assert echoed(body)["headers"]["x-forwarded-client-cert"].endswith(f"URI={GATEWAY}")
    r = sandbox.exec(
        "outside", ["curl", "-s", "-w", "\n%{http_code}", "-X", "POST", f"{url}/admin"]
    )
    assert str(r.stdout).rsplit("\n", 1) == ["RBAC: access denied", "403"]  # n2 refused it
    # The gateway's own policy (a DENY selecting its workload) refuses at the edge.
    code, body, _ = http(sandbox, "outside", f"{url}/internal/x")
    assert (code, body) == (403, "RBAC: access denied")
    assert not any(h.endswith("/internal/x") for h in hits(pods["web"]))

    def edge_lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(sandbox, "n1") if x["path"] == "/internal/x"]

    eventually(lambda: bool(edge_lines()), "the gateway's access-log line")  # queued, then written
    edge = edge_lines()
    assert edge[-1]["response_flags"] == "UAEX"

    def dest_lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(sandbox, "n2")
                if x["path"] == "/admin" and x["source_principal"] == GATEWAY]  # fmt: skip

    eventually(lambda: bool(dest_lines()), "n2's access-log line of the gateway's request")
    dest = dest_lines()
    assert dest[-1]["response_code"] == 403


# -- JWT end to end ----------------------------------------------------------------------------


def api(sb: Sandbox, pod: Pod, path: str, token: str | None = None) -> tuple[int, str]:
    headers = [f"authorization: Bearer {token}"] if token else []
    code, body, _ = http(sb, pod, f"http://{API_VIP}{path}", *headers)
    return code, body


def test_jwt_valid_token_and_claims_header(
    sandbox: Sandbox, pods: dict[str, Pod], issuer: Issuer, policies: None
) -> None:
    sleep = pods["sleep"]
    token = issuer.token("k1", sub="alice")
    eventually(lambda: api(sandbox, sleep, "/secure/me", token)[0] == 200, "api accepts the JWT")
    code, body = api(sandbox, sleep, "/secure/me", token)
    assert code == 200
    seen = echoed(body)["headers"]
    assert seen["x-jwt-sub"] == "alice"
    assert "authorization" not in seen  # forwardOriginalToken defaults to false

    def me_lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(sandbox, "n2") if x["path"] == "/secure/me"]

    eventually(lambda: bool(me_lines()), "n2's access-log line")
    lines = me_lines()
    assert lines[-1]["request_principal"] == f"{ISSUER}/alice"
    assert lines[-1]["source_principal"] == SLEEP
    # A forged claims header from the client is not what the app sees.
    code, body, _ = http(sandbox, sleep, f"http://{API_VIP}/open/x", "x-jwt-sub: mallory")
    assert code == 200
    assert "x-jwt-sub" not in echoed(body)["headers"]


def test_jwt_invalid_tokens_are_refused(
    sandbox: Sandbox, pods: dict[str, Pod], issuer: Issuer, policies: None
) -> None:
    sleep = pods["sleep"]
    other = issuer.new_key("other")
    cases = {
        "expired": (issuer.token("k1", exp_in=-600), 401, "Jwt is expired"),
        "wrong issuer": (issuer.token("k1", iss="https://evil.test"), 401,
                         "Jwt issuer is not configured"),
        "bad signature": (issuer.token("k1", key=other), 401, "Jwt verification fails"),
        "unknown kid": (issuer.token("k9", key=other), 401,
                        "Jwks doesn't have key to match kid or alg from Jwt"),
        # Envoy answers a wrong audience 403, not 401 (jwt_authn's JwtAudienceNotAllowed).
        "wrong audience": (issuer.token("k1", aud="web"), 403, "Audiences in Jwt are not allowed"),
    }  # fmt: skip
    for what, (token, status, body) in cases.items():
        assert api(sandbox, sleep, "/open/x", token) == (status, body), what
    assert api(sandbox, sleep, "/secure/x") == (403, "RBAC: access denied")  # no token
    assert api(sandbox, sleep, "/open/x")[0] == 200  # no token, no requirement: passes
    assert not any(h.endswith("/secure/x") for h in hits(pods["api"]))


def test_jwt_claims_select_one_group(
    sandbox: Sandbox, pods: dict[str, Pod], issuer: Issuer, policies: None
) -> None:
    sleep = pods["sleep"]
    admins = issuer.token("k1", sub="ann", groups=["admins", "dev"])
    devs = issuer.token("k1", sub="dan", groups=["dev"])
    assert api(sandbox, sleep, "/group/x", admins)[0] == 200
    assert api(sandbox, sleep, "/group/x", devs) == (403, "RBAC: access denied")
    assert api(sandbox, sleep, "/group/x") == (403, "RBAC: access denied")


def test_jwt_at_the_gateway(
    sandbox: Sandbox, pods: dict[str, Pod], issuer: Issuer, policies: None
) -> None:
    url = f"{sandbox.gateway_url()}/public/jwt/a"
    token = issuer.token("k1", sub="edge-user")
    bearer = f"authorization: Bearer {token}"
    eventually(lambda: http(sandbox, "outside", url, bearer)[0] == 200, "the gateway takes it")
    code, body, _ = http(sandbox, "outside", url, bearer)
    assert code == 200
    seen = echoed(body)["headers"]
    assert seen["x-gw-sub"] == "edge-user"  # outputClaimToHeaders at the gateway
    assert "authorization" not in seen  # the token stops at the edge
    assert http(sandbox, "outside", url)[:2] == (403, "RBAC: access denied")  # no token
    expired = f"authorization: Bearer {issuer.token('k1', exp_in=-600)}"
    assert http(sandbox, "outside", url, expired)[:2] == (401, "Jwt is expired")
    assert not any("/public/jwt/" in h and h != "GET /public/jwt/a" for h in hits(pods["web"]))

    def edge_lines() -> list[dict[str, Any]]:
        return [x for x in access_lines(sandbox, "n1")
                if x["path"] == "/public/jwt/a" and x["response_code"] == 200]  # fmt: skip

    eventually(lambda: bool(edge_lines()), "the gateway's access-log line")
    assert edge_lines()[-1]["request_principal"] == f"{ISSUER}/edge-user"


def test_jwks_rotation_is_picked_up_without_a_restart(
    sandbox: Sandbox, pods: dict[str, Pod], issuer: Issuer, policies: None
) -> None:
    sleep = pods["sleep"]
    pids = {n.name: n.agent_pid for n in sandbox.nodes()}
    old = issuer.token("k1", sub="before")
    assert api(sandbox, sleep, "/secure/r", old)[0] == 200
    k2 = issuer.new_key("k2")
    issuer.publish(k2=k2)  # k1 retired, k2 in
    new = issuer.token("k2", sub="after")
    # An unknown kid makes the agent refetch the key set (rate-limited): soon accepted.
    eventually(lambda: api(sandbox, sleep, "/secure/r", new)[0] == 200, "k2 accepted", 30)
    code, body = api(sandbox, sleep, "/secure/r", new)
    assert code == 200
    assert echoed(body)["headers"]["x-jwt-sub"] == "after"
    assert {n.name: n.agent_pid for n in sandbox.nodes()} == pids  # nothing restarted
