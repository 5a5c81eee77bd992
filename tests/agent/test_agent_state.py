"""The persisted enrollment records: round trip, atomic write, clear errors on corruption."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.agent.enroll import pod_addresses, workload_document
from nodeagent.agent.state import AgentState, PodRecord, StateError
from nodeagent.cni.protocol import EnrollError


def _record(uid: str = "u1") -> PodRecord:
    return PodRecord(
        uid=uid,
        namespace="default",
        name="web",
        container_id="c1",
        netns="/run/netns/x",
        netns_id=(4, 4026532000),
        addresses=("10.201.1.5",),
        service_account="web-sa",
        labels={"app": "web"},
        annotations={},
    )


def test_round_trip(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "s.msgpack", {"u1": _record()}, lease=42)
    state.save()
    again = AgentState.load(tmp_path / "s.msgpack")
    assert again.pods == state.pods
    assert again.lease == 42
    assert not (tmp_path / "s.tmp").exists()


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert AgentState.load(tmp_path / "none").pods == {}


def test_corrupt_file_names_the_path(tmp_path: Path) -> None:
    p = tmp_path / "s.msgpack"
    p.write_bytes(b"\xc1garbage")
    with pytest.raises(StateError, match=str(p)):
        AgentState.load(p)


def test_pod_addresses_from_prev_result() -> None:
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.201.1.5/24", "gateway": "10.201.1.1"}]}
    assert pod_addresses(prev) == ("10.201.1.5",)
    with pytest.raises(EnrollError, match="no IP"):
        pod_addresses({"ips": []})
    with pytest.raises(EnrollError, match="prevResult"):
        pod_addresses(None)
    with pytest.raises(EnrollError, match="not-an-ip"):
        pod_addresses({"ips": [{"address": "not-an-ip"}]})


def test_workload_document_shape() -> None:
    doc = workload_document("n1", _record())
    assert doc["kind"] == "Workload"
    assert doc["metadata"]["uid"] == "u1"
    assert doc["spec"] == {"node": "n1", "addresses": ["10.201.1.5"], "serviceAccount": "web-sa"}


def test_failed_save_leaves_the_previous_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "s.msgpack"
    path.mkdir()  # the rename onto it fails, after the temporary file was written
    (path / "keep").write_text("x")
    state = AgentState(path, {"u1": _record()})
    with pytest.raises(IsADirectoryError):
        state.save()
    assert not (tmp_path / "s.tmp").exists()
    assert (path / "keep").read_text() == "x"
