"""The fan-out bench: its chunked-stream counter, and one tiny run against a real etcd cluster
(no timing is checked)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeagent.bench.__main__ import main
from nodeagent.bench.fanout import MARKER, Dechunk


def _chunked(bodies: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(b), b) for b in bodies) + b"0\r\n\r\n"


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=8),
    st.lists(st.integers(1, 40), min_size=1, max_size=20),
)
def test_dechunk_counts_markers_however_the_stream_is_cut(
    per_chunk: list[int], cuts: list[int]
) -> None:
    bodies = [b'{"events":[' + b",".join([b'{"kv":{' + MARKER + b':"7"}}'] * n) + b"]}\n"
             for n in per_chunk]  # fmt: skip
    stream = _chunked(bodies)
    d = Dechunk()
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        d.receive_data(stream[pos : pos + n])
        pos, i = pos + n, i + 1
    assert d.count == sum(per_chunk)
    assert d.ended


def test_dechunk_rejects_a_runaway_size_line() -> None:
    with pytest.raises(ValueError, match="chunk size line"):
        Dechunk().receive_data(b"f" * 100)


def test_bench_fanout_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["-o", "json", "fanout", "--watchers", "3,6", "--changes", "2", "--burst", "20"]
    assert main([*argv, "--idle", "0.2"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert [r["watchers"] for r in result["rows"]] == [3, 6]
    figures = {f["metric"]: f["value"] for f in result["figures"]}
    assert figures["6 watchers: etcd RSS (MiB, all members)"] > 0
    assert any("extrapolated to 5000" in n for n in result["notes"])
