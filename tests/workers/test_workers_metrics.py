"""Summing the workers' metrics and counters: exact sums, histograms bucket by bucket, a dead
worker's counters kept (monotonic totals), incompatible families left out, never mixed."""

from __future__ import annotations

from nodeagent.telemetry.exposition import parse
from nodeagent.telemetry.merge import merge_states
from nodeagent.telemetry.metrics import MetricsRegistry
from nodeagent.workers.metrics import WorkerBook, WorkerReport


def _registry(requests: int, durations: list[float]) -> MetricsRegistry:
    r = MetricsRegistry()
    c = r.counter("reqs_total", "Requests.", ("code",))
    h = r.histogram("dur_ms", "Duration.", ("code",), (1, 10, 100))
    for _ in range(requests):
        c.inc(("200",))
    for d in durations:
        h.observe(("200",), d)
    return r


def _value(text: str, family: str, sample: str, **labels: str) -> float:
    fam = parse(text)[family]
    for s in fam.samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"{sample} {labels} not in {family}")


def test_control_renders_its_own_plus_every_peer() -> None:
    control = _registry(1, [0.5])
    w1, w2 = _registry(3, [5, 50]), _registry(4, [500])
    control.add_peers(lambda: [w1.state(), w2.state()])
    text = control.render()
    assert _value(text, "reqs_total", "reqs_total", code="200") == 8
    assert _value(text, "dur_ms", "dur_ms_count", code="200") == 4
    assert _value(text, "dur_ms", "dur_ms_sum", code="200") == 555.5
    assert _value(text, "dur_ms", "dur_ms_bucket", code="200", le="1") == 1
    assert _value(text, "dur_ms", "dur_ms_bucket", code="200", le="10") == 2
    assert _value(text, "dur_ms", "dur_ms_bucket", code="200", le="100") == 3
    assert _value(text, "dur_ms", "dur_ms_bucket", code="200", le="+Inf") == 4


def test_incompatible_family_is_left_out_not_mixed() -> None:
    a = _registry(2, [])
    b = MetricsRegistry()
    b.counter("reqs_total", "Requests.", ("other",)).inc(("x",), 5)
    merged = merge_states([a.state(), b.state()])
    assert merged.conflicts == ["reqs_total"]
    values = merged.families["reqs_total"]["values"]
    assert values == [[["200"], 2.0]]


def _report(opened: int, closed: int, requests: int) -> WorkerReport:
    return WorkerReport(
        metrics=_registry(requests, []).state(),
        pods={"uid1": {"inbound": {"opened": opened, "closed": closed}}},
    )


def _total(book: WorkerBook) -> float:
    merged = merge_states(book.metric_states()).families["reqs_total"]["values"]
    return sum(v for _, v in merged)


def test_dead_worker_counters_are_kept_and_its_successor_adds_from_zero() -> None:
    book = WorkerBook()
    book.report(0, _report(10, 8, 10))
    book.report(1, _report(5, 5, 5))
    assert _total(book) == 15
    book.retire(0)  # kill -9: its last report is kept
    assert _total(book) == 15
    stats = book.pod_statistics("uid1")["inbound"]
    # Its two open connections died with it: counted closed, nothing "open" forever.
    assert stats == {"opened": 15, "closed": 15}
    book.report(0, _report(1, 0, 1))  # the replacement starts from zero
    assert _total(book) == 16
    assert book.pod_statistics("uid1")["inbound"] == {"opened": 16, "closed": 15}
    book.report(0, _report(2, 2, 2))  # a later report replaces, never adds
    assert _total(book) == 17


def test_retire_twice_or_unknown_slot_changes_nothing() -> None:
    book = WorkerBook()
    book.report(0, _report(1, 1, 3))
    book.retire(0)
    book.retire(0)
    book.retire(7)
    assert _total(book) == 3


def test_breakers_merge_per_cluster_and_a_dead_workers_go() -> None:
    def breaker(cluster: str, active: int, overflow: int, node: int) -> dict[str, object]:
        return {
            "cluster": cluster,
            "active": {"connections": active},
            "overflow": {"pending": overflow},
            "node": {"connections": node},
        }

    book = WorkerBook()
    book.report(1, WorkerReport.from_message({"breakers": [breaker("a", 1, 2, 3)]}))
    book.report(
        0, WorkerReport.from_message({"breakers": [breaker("a", 2, 5, 3), breaker("b", 1, 0, 1)]})
    )
    rows = {r["cluster"]: r for r in book.breakers()}
    assert set(rows) == {"a", "b"}
    assert rows["a"]["node"] == {"connections": 3}
    assert [(w["slot"], w["active"], w["overflow"]) for w in rows["a"]["workers"]] == [
        (0, {"connections": 2}, {"pending": 5}),
        (1, {"connections": 1}, {"pending": 2}),
    ]
    book.retire(0)
    assert [r["cluster"] for r in book.breakers()] == ["a"]
    assert [w["slot"] for w in book.breakers()[0]["workers"]] == [1]
    assert WorkerReport.from_message({}).breakers == []
