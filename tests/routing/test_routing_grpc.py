"""gRPC's pure pieces: status mappings, grpc-timeout, retryOn by gRPC status, and
`abort.grpcStatus` from validation through compilation to the routing decision."""

from __future__ import annotations

from typing import Any

import pytest

from nodeagent.config.batch import Document, validate_document
from nodeagent.config.documents import RawDocument
from nodeagent.config.errors import Source
from nodeagent.routing.grpc import (
    GrpcStatus,
    grpc_to_http_status,
    http_to_grpc_status,
    is_grpc,
    parse_grpc_status,
    parse_grpc_timeout,
)
from nodeagent.snapshot.routes import DEFAULT_RETRIES, RetryPolicy
from nodeagent.snapshot.routes_compile import RouteError, _fault


def test_http_to_grpc_is_envoys_mapping_but_timeouts_are_deadline_exceeded() -> None:
    assert http_to_grpc_status(503) is GrpcStatus.UNAVAILABLE
    assert http_to_grpc_status(504) is GrpcStatus.UNAVAILABLE
    assert http_to_grpc_status(504, timed_out=True) is GrpcStatus.DEADLINE_EXCEEDED
    assert http_to_grpc_status(403) is GrpcStatus.PERMISSION_DENIED
    assert http_to_grpc_status(404) is GrpcStatus.UNIMPLEMENTED
    assert http_to_grpc_status(418) is GrpcStatus.UNKNOWN


def test_grpc_to_http_feeds_outlier_detection() -> None:
    assert grpc_to_http_status(GrpcStatus.UNAVAILABLE) == 503
    assert grpc_to_http_status(GrpcStatus.OK) == 200
    assert grpc_to_http_status(GrpcStatus.INTERNAL) == 500
    assert grpc_to_http_status(99) == 500


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("2S", 2.0), ("100m", 0.1), ("1H", 3600.0), ("5u", 5e-6), ("12345678n", 0.012345678)],
)
def test_grpc_timeout(value: str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "S", "2", "2s", "123456789S", "-1S", "1.5S"])
def test_malformed_grpc_timeout_is_ignored(value: str | None) -> None:
    assert parse_grpc_timeout(value) is None


def test_content_type_and_status_parsing() -> None:
    assert is_grpc("application/grpc")
    assert is_grpc("Application/GRPC+proto")
    assert not is_grpc("application/json")
    assert not is_grpc(None)
    assert parse_grpc_status(b"14") == 14
    assert parse_grpc_status(" 0") == 0
    assert parse_grpc_status("x") is None
    assert parse_grpc_status(None) is None


def test_retry_on_names_grpc_statuses() -> None:
    # Istio's default policy retries UNAVAILABLE and CANCELLED, not INTERNAL
    assert DEFAULT_RETRIES.retriable_grpc(GrpcStatus.UNAVAILABLE)
    assert DEFAULT_RETRIES.retriable_grpc(GrpcStatus.CANCELLED)
    assert not DEFAULT_RETRIES.retriable_grpc(GrpcStatus.INTERNAL)
    policy = RetryPolicy(2, None, frozenset({"internal", "resource-exhausted"}))
    assert policy.retriable_grpc(GrpcStatus.INTERNAL)
    assert policy.retriable_grpc(GrpcStatus.RESOURCE_EXHAUSTED)
    assert not policy.retriable_grpc(GrpcStatus.UNAVAILABLE)
    assert not policy.retriable_grpc(GrpcStatus.OK)


def _vs(abort: dict[str, Any]) -> Document | list[str]:
    doc = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "echo"},
        "spec": {
            "hosts": ["echo"],
            "http": [{"fault": {"abort": abort}, "route": [{"destination": {"host": "echo"}}]}],
        },
    }
    result = validate_document(RawDocument(Source("t.yaml", 0, 1), doc), "default")
    return result if isinstance(result, Document) else [str(e) for e in result]


def test_abort_grpc_status_is_validated_by_name() -> None:
    assert isinstance(_vs({"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}), Document)
    bad = _vs({"grpcStatus": "NOPE"})
    assert isinstance(bad, list)
    assert "spec.http[0].fault.abort.grpcStatus" in bad[0]
    both = _vs({"grpcStatus": "UNAVAILABLE", "httpStatus": 503})
    assert isinstance(both, list)
    assert "only one of httpStatus, grpcStatus" in both[0]
    neither = _vs({"percentage": {"value": 5}})
    assert isinstance(neither, list)
    assert "abort must set httpStatus or grpcStatus" in neither[0]
    http2 = _vs({"http2Error": "REFUSED_STREAM"})
    assert isinstance(http2, list)
    assert "http2Error is not supported" in " ".join(http2)


def test_abort_grpc_status_compiles_to_its_number() -> None:
    rule = _fault("f", {"abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 50}}})
    assert rule is not None
    assert rule.abort_grpc_status == 14
    assert rule.abort_status is None
    assert rule.abort_percent == 50.0
    with pytest.raises(RouteError):
        _fault("f", {"abort": {"grpcStatus": "NOPE"}})


def test_the_config_names_and_the_status_enum_agree() -> None:
    from nodeagent.config.validate.virtualservice import GRPC_STATUS_NAMES

    assert [s.name for s in GrpcStatus] == list(GRPC_STATUS_NAMES)
    assert [int(s) for s in GrpcStatus] == list(range(len(GRPC_STATUS_NAMES)))
