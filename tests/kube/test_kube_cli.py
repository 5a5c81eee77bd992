"""`nodeagent kube-sync` as a real process: kubeconfig, TCP to the API double, a SQLite store,
leader election, and a clean SIGTERM that releases the Lease."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest
import trio
from apiserver import FakeApiServer
from kube_helpers import fixture, present, service, wait_key

from nodeagent.store import keys, open_store


@pytest.mark.slow
async def test_kube_sync_process_mirrors_and_releases_on_sigterm(tmp_path: Path) -> None:
    api = FakeApiServer()
    api.apply(service("reviews", "10.96.44.7"))
    api.apply(fixture("virtualservice"))
    db = tmp_path / "mesh.db"
    url = f"sqlite://{db}"
    store = await open_store(url)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(api.serve_tcp)
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(
                "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
                "contexts: [{name: t, context: {cluster: c, user: u}}]\n"
                f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
                "users: [{name: u, user: {token: secret-token}}]\n"
            )
            argv = [
                sys.executable, "-m", "nodeagent.cli", "kube-sync", "--store", url,
                "--kubeconfig", str(kubeconfig), "--identity", "replica-1",
                "--lease-namespace", "mesh-system", "--log-level", "warning",
            ]  # fmt: skip
            proc = await trio.lowlevel.open_process(argv)
            try:
                with trio.fail_after(30):
                    await wait_key(store, keys.config("Service", "bookinfo", "reviews"), present)
                    await wait_key(
                        store, keys.config("VirtualService", "bookinfo", "reviews"), present
                    )
                lease = api.objects[("coordination.k8s.io", "leases")][("mesh-system", "kube-sync")]
                assert lease["spec"]["holderIdentity"] == "replica-1"
                proc.send_signal(signal.SIGTERM)
                with trio.fail_after(15):
                    assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    with trio.move_on_after(5):
                        await proc.wait()
            lease = api.objects[("coordination.k8s.io", "leases")][("mesh-system", "kube-sync")]
            assert lease["spec"]["holderIdentity"] == ""  # released for a standby
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
