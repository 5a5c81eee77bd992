"""The Telemetry bundle: one task binds 15020 and runs the writers; health shows in a scrape."""

from __future__ import annotations

import io

import trio
import trio.testing

from nodeagent.telemetry import exposition
from nodeagent.telemetry.accesslog import AccessRecord
from nodeagent.telemetry.metrics import HealthSources, peer_labels
from nodeagent.telemetry.service import Telemetry, TelemetryConfig


async def test_bundle_serves_istio_and_health_metrics() -> None:
    config = TelemetryConfig("node-1", metrics_host="127.0.0.1", metrics_port=0)
    sink = io.StringIO()
    tel = Telemetry(
        config,
        ready=lambda: True,
        health=HealthSources(enrolled_pods=lambda: 4),
        access_log_sink=sink,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(tel.run)
        peer = peer_labels(
            reporter="source", source=None, destination=None, service=None, protocol="tcp"
        )
        labels = tel.metrics.connection_opened(peer)
        tel.metrics.connection_closed(labels, sent=5, received=6)
        tel.access_log.log(AccessRecord("connection", "default", 0.0, 1.0, bytes_sent=5))
        proc = await trio.run_process(
            ["curl", "-sf", f"http://127.0.0.1:{tel.server.port}/stats/prometheus"],
            capture_stdout=True,
        )
        text = proc.stdout.decode()
        fams = exposition.parse(text)
        assert fams["nodeagent_enrolled_pods"].samples[0].value == 4
        assert fams["istio_tcp_sent_bytes_total"].samples[0].value == 5
        assert fams["nodeagent_accesslog_dropped_total"].samples[0].value == 0
        assert tel.exporter is None
        with trio.fail_after(5):
            while tel.access_log.written < 1:
                await trio.testing.wait_all_tasks_blocked()
        assert '"event": "access.connection"' in sink.getvalue()
        nursery.cancel_scope.cancel()
