"""Connections that would loop through the agent's own listeners are refused (issue 21, item 1):
the pure rules of every path, and the outbound decision that applies them. No sockets."""

from __future__ import annotations

import pytest
from proxy_docs import config, snapshot, workload

from nodeagent.balance import Registry
from nodeagent.contract import (
    DNS_CAPTURE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_CAPTURE_PORT,
    POD_LISTENER_PORTS,
    TUNNEL_PORT,
)
from nodeagent.proxy import self_call
from nodeagent.proxy.outbound import Passthrough, Refuse, ToWorkload, outbound_decision
from nodeagent.snapshot import Snapshot

ME, PEER = "10.0.1.9", "10.0.2.1"


def mesh() -> Snapshot:
    return snapshot(
        workload("me", ME, labels={"app": "client"}, sa="client"),
        workload("peer", PEER, labels={"app": "web"}, sa="web", node="node-2"),
        config(
            "Service",
            "web",
            {
                "clusterIP": "10.96.0.10",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "tcp-loop", "port": 7000, "targetPort": INBOUND_PLAINTEXT_PORT},
                ],
            },
        ),
    )


def decide(dst: str, port: int, *, source_ip: str = ME) -> object:
    return outbound_decision(
        mesh(), dst, port, registry=Registry(on_event=None), source_ip=source_ip
    )


def test_the_agent_listens_on_exactly_the_contract_ports() -> None:
    assert {
        OUTBOUND_CAPTURE_PORT,
        INBOUND_PLAINTEXT_PORT,
        TUNNEL_PORT,
        DNS_CAPTURE_PORT,
    } == POD_LISTENER_PORTS
    assert {15001, 15006, 15008, 15053} == POD_LISTENER_PORTS


@pytest.mark.parametrize("port", sorted(POD_LISTENER_PORTS))
def test_tunnel_header_naming_an_agent_port_is_refused(port: int) -> None:
    reason = self_call.tunnel_target(port)
    assert reason is not None
    assert str(port) in reason
    assert self_call.tunnel_target(8080) is None


@pytest.mark.parametrize("port", sorted(POD_LISTENER_PORTS))
def test_plaintext_inbound_to_an_agent_port_is_refused(port: int) -> None:
    assert self_call.inbound_target((ME, port)) is not None
    assert self_call.inbound_target((ME, 8080)) is None


def test_a_connection_that_was_not_redirected_is_refused() -> None:
    assert self_call.unredirected(("127.0.0.1", 15001), ("127.0.0.1", 15001)) is not None
    assert self_call.unredirected((ME, 15001), (ME, 15001)) is not None
    # REDIRECTed: the listener's address differs from where the app connected
    assert self_call.unredirected(("10.96.0.10", 80), ("127.0.0.1", 15001)) is None


@pytest.mark.parametrize(
    ("dst", "port"),
    [
        ("127.0.0.1", OUTBOUND_CAPTURE_PORT),  # http://127.0.0.1:15001/
        ("127.0.0.5", INBOUND_PLAINTEXT_PORT),  # any loopback address
        (ME, OUTBOUND_CAPTURE_PORT),  # its own pod IP on 15001
        (ME, TUNNEL_PORT),
        (PEER, INBOUND_PLAINTEXT_PORT),  # another pod's 15006
        (PEER, DNS_CAPTURE_PORT),
        ("10.96.0.10", 7000),  # a service port whose endpoints' target port is 15006
    ],
)
def test_outbound_to_an_agent_listener_is_refused_as_self_call(dst: str, port: int) -> None:
    d = decide(dst, port)
    assert isinstance(d, Refuse)
    assert d.flag == self_call.FLAG
    assert "agent's own listeners" in d.reason


def test_own_address_is_refused_before_the_snapshot_knows_the_pod() -> None:
    d = outbound_decision(
        snapshot(), "10.0.7.7", 15001, registry=Registry(on_event=None), source_ip="10.0.7.7"
    )
    assert isinstance(d, Refuse)
    assert d.flag == self_call.FLAG


def test_ordinary_destinations_on_other_ports_and_hosts_still_go() -> None:
    assert isinstance(decide(PEER, 8080), ToWorkload)
    assert isinstance(decide("10.96.0.10", 80), ToWorkload)
    # An address outside the mesh may serve these port numbers: no agent listens there.
    outside = decide("203.0.113.5", OUTBOUND_CAPTURE_PORT)
    assert isinstance(outside, Passthrough)
    assert (outside.address, outside.port) == ("203.0.113.5", OUTBOUND_CAPTURE_PORT)
