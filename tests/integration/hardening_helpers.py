"""Pieces of the HTTP hardening sandbox tests: a backend that records every byte and every
request it receives, raw-socket clients (a smuggling corpus runner, a trickler), and that
backend behind the ingress gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mesh_helpers import apply, client_pods, eventually, http, http_gateway
from snapshot_docs import service

from nodeagent.sandbox import Pod, Sandbox

HTTP_TESTS = Path(__file__).resolve().parent.parent / "http"
CORPUS = HTTP_TESTS / "smuggling_corpus.json"


PROGRAMS = Path(__file__).resolve().parent / "programs"


def programs() -> dict[str, Path]:
    """The pods' programs (tests/integration/programs): `recorder` (a backend recording every
    byte and request), `smuggle` (the smuggling corpus runner), `trickle` (a slow client)."""
    return {name: PROGRAMS / f"{name}.py" for name in ("recorder", "smuggle", "trickle")}


def recorded(pod: Pod) -> tuple[list[str], str]:
    """The requests a recorder pod parsed (`METHOD PATH`) and every byte it received."""
    lines = Path(pod.log).read_text(errors="replace").splitlines()
    reqs = [line[4:] for line in lines if line.startswith("req ")]
    raw = "\n".join(line for line in lines if line.startswith("raw "))
    return reqs, raw


GW_HOST = "rec.example.com"
FQDN = "rec.default.svc.cluster.local"
TO_REC = [{"destination": {"host": FQDN, "port": {"number": 80}}}]


def recorder_behind_gateway(
    sb: Sandbox, files: Path, *, prefix: str, vip: str, routes: list[dict[str, Any]]
) -> dict[str, Pod]:
    """The recording backend `rec` on n2 behind Service `rec` (at `vip`) and the gateway
    (`Host: rec.example.com`), a meshed client on n1, and `routes` applied beside them; returns
    once both the mesh path and the gateway path answer."""
    scripts = programs()
    rec = sb.pod_add(
        "n2", "default", "rec", ["python3", str(scripts["recorder"]), "8080"],
        service_account="rec", labels={"app": "rec"},
    )  # fmt: skip
    client, _ = client_pods(sb)
    gateway = http_gateway(f"{prefix}-gateway")
    gateway_route = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "rec-gw", "namespace": "default"},
        "spec": {
            "hosts": [GW_HOST],
            "gateways": [f"{prefix}-gateway"],
            "http": [{"route": TO_REC}],
        },
    }
    apply(sb, files, "rec", [service("rec", cluster_ip=vip), gateway, gateway_route, *routes])

    def both_paths_answer() -> bool:
        mesh, _, _ = http(sb, client, f"http://{vip}/ready")
        edge, _, _ = http(sb, "outside", f"{sb.gateway_url()}/ready", f"Host: {GW_HOST}")
        return mesh == 200 and edge == 200

    eventually(both_paths_answer, "rec answers through the mesh and the gateway", timeout=40)
    return {"rec": rec, "client": client}
