"""The hello's config: a msgpack map with an explicit schema (no pickle), refused by field name."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from nodeagent.http import Limits
from nodeagent.workers.config import ConfigError, WorkerConfig, config_from_wire, config_to_wire
from nodeagent.workers.protocol import FrameDecoder, encode


def _config() -> WorkerConfig:
    return WorkerConfig(
        node="n1",
        trust_domain="example.org",
        outbound_policy="REGISTRY_ONLY",
        destination_l7="when-needed",
        http_limits=Limits(max_headers=50, idle_timeout=7.5),
        zipkin_url="http://zipkin:9411/api/v2/spans",
        sample_rate=0.5,
        log_level="debug",
        log_format="console",
        report_interval=0.1,
    )


def test_round_trip_through_a_frame() -> None:
    cfg = _config()
    decoder = FrameDecoder()
    decoder.receive_data(encode({"t": "hello", "slot": 0, "config": config_to_wire(cfg)}))
    msg = decoder.next_message()
    assert msg is not None
    assert config_from_wire(msg.body["config"]) == cfg


def test_wire_map_holds_plain_values_only() -> None:
    raw = msgpack.packb(config_to_wire(_config()), use_bin_type=True)
    # Strict decoding (no ext types, no objects) gives the same map back.
    assert msgpack.unpackb(raw, raw=False) == config_to_wire(_config())


def _wire(**changes: Any) -> dict[str, Any]:
    wire = config_to_wire(_config())
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x80\x04pickle", "config is a bytes, not a map"),
        (_wire(extra=1), "unknown field(s) extra"),
        ({k: v for k, v in _wire().items() if k != "node"}, "missing field(s) node"),
        (_wire(node=3), "config.node is 3, not str"),
        (_wire(node=""), "config.node is empty"),
        (_wire(sample_rate=True), "config.sample_rate is True"),
        (_wire(sample_rate=2.0), "config.sample_rate is 2.0, not within 0..1"),
        (_wire(report_interval=0), "config.report_interval is 0.0, not > 0"),
        (_wire(outbound_policy="ALLOW_SOME"), "config.outbound_policy is 'ALLOW_SOME'"),
        (
            _wire(destination_l7="never"),
            "config.destination_l7 is 'never', not one of always, when-needed",
        ),
        (_wire(log_format="xml"), "config.log_format is 'xml', not one of json, console"),
        (_wire(zipkin_url=5), "config.zipkin_url is 5, not str or null"),
        (_wire(http_limits=[]), "config.http_limits is [], not a map"),
        (
            _wire(http_limits={**config_to_wire(_config())["http_limits"], "max_headers": 1.5}),
            "config.http_limits.max_headers is 1.5, not int",
        ),
        (
            _wire(http_limits={**config_to_wire(_config())["http_limits"], "idle_timeout": -1}),
            "config.http_limits.idle_timeout is -1, not a number >= 0",
        ),
    ],
)
def test_bad_config_is_refused_by_name(body: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_wire(body)
    assert message in str(info.value)


def test_int_on_the_wire_for_a_float_field_is_a_float() -> None:
    limits = {**config_to_wire(_config())["http_limits"], "idle_timeout": 3}
    cfg = config_from_wire(_wire(http_limits=limits, sample_rate=1))
    assert cfg.http_limits.idle_timeout == 3.0
    assert isinstance(cfg.http_limits.idle_timeout, float)
    assert isinstance(cfg.sample_rate, float)
