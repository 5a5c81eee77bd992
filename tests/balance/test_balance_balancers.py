"""Each balancer's distribution; peak-EWMA against a slow replica (simulated, fake clock)."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest
from helpers_balance import FakeClock, endpoints, picker
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.balance import NoHealthyUpstream, Outcome, PickContext, Picker
from nodeagent.balance.hashing import hash64
from nodeagent.snapshot.model import Endpoint


def _counts(p: Picker, n: int, ctx: PickContext | None = None) -> Counter[str]:
    c: Counter[str] = Counter()
    for _ in range(n):
        c[(p.pick(ctx) if ctx else p.pick()).address] += 1
    return c


@given(n=st.integers(1, 12), rounds=st.integers(1, 5), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_round_robin_is_exactly_even(n: int, rounds: int, seed: int) -> None:
    p = picker({"loadBalancer": {"simple": "ROUND_ROBIN"}}, endpoints(n), FakeClock(), seed)
    counts = _counts(p, n * rounds)
    assert len(counts) == n
    assert set(counts.values()) == {rounds}


def test_round_robin_cycles_in_a_fixed_order() -> None:
    p = picker({"loadBalancer": {"simple": "ROUND_ROBIN"}}, endpoints(3), FakeClock())
    first = [p.pick().address for _ in range(3)]
    assert sorted(first) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert [p.pick().address for _ in range(6)] == first * 2


def test_random_is_roughly_uniform() -> None:
    p = picker({"loadBalancer": {"simple": "RANDOM"}}, endpoints(4), FakeClock())
    counts = _counts(p, 8000)
    assert len(counts) == 4
    assert all(1700 < v < 2300 for v in counts.values()), counts


def test_least_request_avoids_the_busy_endpoint() -> None:
    p = picker({"loadBalancer": {"simple": "LEAST_REQUEST"}}, endpoints(3), FakeClock())
    busy = p.states[0]
    for _ in range(50):
        busy.start()
    counts = _counts(p, 3000)
    # P2C draws two distinct endpoints: the busy one always loses the comparison.
    assert counts[busy.address] == 0
    assert counts["10.0.0.2"] > 1200
    assert counts["10.0.0.3"] > 1200


def test_least_request_balances_in_flight() -> None:
    p = picker({"loadBalancer": {"simple": "LEAST_REQUEST"}}, endpoints(4), FakeClock())
    handles = []
    for _ in range(400):
        h = p.pick()
        h.start()
        handles.append(h)
    in_flight = sorted(s.in_flight for s in p.states)
    # P2C keeps the spread small even though nothing finishes.
    assert in_flight[-1] - in_flight[0] <= 4, in_flight
    for h in handles:
        h.finish(0.01)
    assert all(s.in_flight == 0 for s in p.states)


def test_single_endpoint_and_empty_cluster() -> None:
    clock = FakeClock()
    assert picker(None, endpoints(1), clock).pick().address == "10.0.0.1"
    empty = picker(None, [], clock)
    with pytest.raises(NoHealthyUpstream, match="no endpoints"):
        empty.pick()


def test_passthrough_uses_the_original_destination() -> None:
    clock = FakeClock()
    p = picker({"loadBalancer": {"simple": "PASSTHROUGH"}}, endpoints(3), clock)
    h = p.pick(PickContext(original_dst=("10.0.0.2", 8080)))
    assert h is p.state("10.0.0.2", 8080)
    other = p.pick(PickContext(original_dst=("192.0.2.7", 443)))
    assert (other.address, other.port) == ("192.0.2.7", 443)
    assert p.state("192.0.2.7", 443) is None
    other.start()
    other.finish(0.01)  # untracked: no effect, no error
    empty = picker({"loadBalancer": {"simple": "PASSTHROUGH"}}, [], clock)
    assert empty.pick(PickContext(original_dst=("192.0.2.7", 443))).port == 443


# -- peak EWMA -------------------------------------------------------------------------------


def _simulate(
    policy: dict[str, object] | None,
    latencies: list[float],
    *,
    requests: int = 20_000,
    rate: float = 200.0,
    seed: int = 7,
) -> tuple[Counter[str], float, Picker]:
    """Open-loop arrivals at `rate`/s; each endpoint answers after its latency (jittered).

    Returns picks per endpoint, the p99 latency and the picker. Time is a fake clock moved by
    the event loop: completions and arrivals in time order.
    """
    clock = FakeClock(0.0)
    eps = endpoints(len(latencies))
    p = picker(policy, eps, clock, seed=seed)
    base = {e.address: lat for e, lat in zip(eps, latencies, strict=True)}
    rng = random.Random(seed)
    done: list[tuple[float, int, float, object]] = []
    seen: list[float] = []
    counts: Counter[str] = Counter()
    t = 0.0
    for i in range(requests):
        t += rng.expovariate(rate)
        while done and done[0][0] <= t:
            end, _, lat, h = heapq.heappop(done)
            clock.t = end
            h.finish(lat)  # type: ignore[attr-defined]
        clock.t = t
        h = p.pick()
        h.start()
        counts[h.address] += 1
        lat = base[h.address] * rng.uniform(0.8, 1.2)
        seen.append(lat)
        heapq.heappush(done, (t + lat, i, lat, h))
    seen.sort()
    return counts, seen[int(len(seen) * 0.99)], p


def test_peak_ewma_starves_a_ten_times_slower_replica() -> None:
    fast = [0.010, 0.010, 0.010]
    _, p99_fast, _ = _simulate(None, fast)
    counts, p99, _ = _simulate(None, [0.010, 0.010, 0.100])
    share = counts["10.0.0.3"] / sum(counts.values())
    assert share < 0.10, counts
    assert p99 <= 2 * p99_fast, (p99, p99_fast)
    # Round robin, for contrast: a third of the traffic and a p99 of the slow replica.
    rr_counts, rr_p99, _ = _simulate({"loadBalancer": {"simple": "ROUND_ROBIN"}}, [0.01, 0.01, 0.1])
    assert rr_counts["10.0.0.3"] / sum(rr_counts.values()) > 0.30
    assert rr_p99 > 2 * p99_fast


def test_peak_ewma_reacts_within_a_few_requests_and_recovers() -> None:
    clock = FakeClock(0.0)
    p = picker(None, endpoints(3), clock, seed=3)
    slow = p.state("10.0.0.3", 8080)
    assert slow is not None
    latency = {"10.0.0.1": 0.01, "10.0.0.2": 0.01, "10.0.0.3": 0.1}

    def serial(n: int) -> Counter[str]:
        # One request at a time, 50 ms apart (the latency is accounted, not waited for).
        c: Counter[str] = Counter()
        for _ in range(n):
            h = p.pick()
            h.start()
            clock.advance(latency[h.address])
            h.finish(latency[h.address])
            c[h.address] += 1
            clock.advance(0.05)
        return c

    first = serial(20)
    assert first["10.0.0.3"] <= 3, first  # one slow answer is enough to steer away
    assert serial(200)["10.0.0.3"] <= 10
    # The slow replica heals: after the estimate decays it is probed and regains its share.
    latency["10.0.0.3"] = 0.01
    clock.advance(60.0)
    later = serial(600)
    assert later["10.0.0.3"] > 120, later


def test_peak_ewma_takes_turns_between_replicas_of_the_same_speed() -> None:
    # Serial calls to three equal replicas whose answers jitter by +-30 % and now and then
    # spike to 15x: without the same-speed band and the confirmed peak the shares followed
    # each replica's last slow answer.
    clock = FakeClock(0.0)
    p = picker(None, endpoints(3), clock, seed=11)
    rng = random.Random(11)
    c: Counter[str] = Counter()
    for _ in range(600):
        h = p.pick()
        h.start()
        latency = 0.002 * rng.uniform(0.7, 1.3)
        if rng.random() < 0.03:
            latency = 0.030  # a scheduling spike on a busy node, on any replica
        clock.advance(latency)
        h.finish(latency)
        c[h.address] += 1
    assert all(180 <= n <= 220 for n in c.values()), c


def test_peak_ewma_band_does_not_hide_a_slower_replica() -> None:
    # 2 ms against 8 ms is outside the band (2 x 2 ms + 2 ms): the slow one loses its draws.
    clock = FakeClock(0.0)
    p = picker(None, endpoints(3), clock, seed=5)
    latency = {"10.0.0.1": 0.002, "10.0.0.2": 0.002, "10.0.0.3": 0.008}
    c: Counter[str] = Counter()
    for _ in range(600):
        h = p.pick()
        h.start()
        clock.advance(latency[h.address])
        h.finish(latency[h.address])
        c[h.address] += 1
    assert c["10.0.0.3"] < 30, c


def test_least_request_ties_go_to_the_endpoint_picked_longest_ago() -> None:
    clock = FakeClock(0.0)
    p = picker({"loadBalancer": {"simple": "LEAST_REQUEST"}}, endpoints(4), clock, seed=2)
    assert set(_counts(p, 400).values()) <= set(range(90, 111))


def test_failures_count_as_slow() -> None:
    clock = FakeClock(0.0)
    p = picker(None, endpoints(2), clock)
    bad = p.states[0]
    bad.start()
    bad.finish(0.001, Outcome.CONNECT_FAILURE)
    good = p.states[1]
    good.start()
    good.finish(0.01)
    assert bad.rtt > good.rtt
    assert Counter(p.pick().address for _ in range(100))[bad.address] == 0


# -- consistent hash ---------------------------------------------------------------------------

HASHES = [
    {"consistentHash": {"httpHeaderName": "x-user"}},
    {"consistentHash": {"httpHeaderName": "x-user", "maglev": {"tableSize": 65537}}},
]


@pytest.mark.parametrize("lb", HASHES, ids=["ring", "maglev"])
def test_same_key_same_endpoint(lb: dict[str, object]) -> None:
    p = picker({"loadBalancer": lb}, endpoints(5), FakeClock())
    for user in ("alice", "bob", "carol"):
        ctx = PickContext(headers={"x-user": user})
        assert len({p.pick(ctx).address for _ in range(1000)}) == 1
    spread = {p.pick(PickContext(headers={"x-user": f"u{i}"})).address for i in range(200)}
    assert len(spread) == 5


@pytest.mark.parametrize("lb", HASHES, ids=["ring", "maglev"])
def test_adding_a_replica_moves_about_one_nth_of_keys(lb: dict[str, object]) -> None:
    clock = FakeClock()
    keys = [f"user-{i}" for i in range(5000)]
    before = picker({"loadBalancer": lb}, endpoints(5), clock)
    after = picker({"loadBalancer": lb}, endpoints(6), clock)
    moved = elsewhere = 0
    for k in keys:
        ctx = PickContext(headers={"x-user": k})
        a, b = before.pick(ctx).address, after.pick(ctx).address
        if a != b:
            moved += 1
            elsewhere += b != "10.0.0.6"
    share = moved / len(keys)
    assert 0.10 < share < 0.26, share  # ideal 1/6 ≈ 0.167
    # The ring moves keys only to the new replica; Maglev trades a little disruption between
    # the old ones for its even spread (the paper's "minimal disruption").
    assert elsewhere / len(keys) < (0.03 if "maglev" in lb["consistentHash"] else 1e-9)  # type: ignore[operator]
    # Another picker (another agent) maps keys the same way: the choice does not depend on the
    # random source, and the hash is a fixed function (not Python's per-process salted hash).
    ctx = PickContext(headers={"x-user": "user-1"})
    again = picker({"loadBalancer": lb}, endpoints(5), clock, seed=99)
    assert again.pick(ctx).address == before.pick(ctx).address
    assert hash64("user-1") == 9863422088627006618


@pytest.mark.parametrize("lb", HASHES, ids=["ring", "maglev"])
def test_hash_skips_ejected_endpoints_and_keeps_the_others(lb: dict[str, object]) -> None:
    policy = {
        "loadBalancer": lb,
        "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100},
    }
    p = picker(policy, endpoints(5), FakeClock())
    ctxs = [PickContext(headers={"x-user": f"k{i}"}) for i in range(500)]
    home = [p.pick(c) for c in ctxs]
    victim = home[0]
    victim.start()
    victim.finish(0.01, Outcome.ERROR_5XX)
    assert victim.ejected
    for c, h in zip(ctxs, home, strict=True):
        now = p.pick(c)
        assert now is not victim
        if h is not victim:
            assert now is h


def test_hash_sources() -> None:
    clock = FakeClock()
    eps = endpoints(8)
    for lb, ctx_a, ctx_b in [
        (
            {"consistentHash": {"httpCookie": {"name": "s"}}},
            PickContext(headers={"cookie": "a=1; s=xyz"}),
            PickContext(cookies={"s": "xyz"}),
        ),
        (
            {"consistentHash": {"httpQueryParameterName": "id"}},
            PickContext(path="/p?x=1&id=42"),
            PickContext(query={"id": "42"}),
        ),
        (
            {"consistentHash": {"useSourceIp": True}},
            PickContext(source_ip="10.1.2.3"),
            PickContext(source_ip="10.1.2.3", headers={"x": "y"}),
        ),
    ]:
        p = picker({"loadBalancer": lb}, eps, clock)
        assert len({p.pick(ctx_a).address for _ in range(100)}) == 1
        assert p.pick(ctx_a) is p.pick(ctx_b)
        # No key: a random pick, over several endpoints.
        assert len({p.pick().address for _ in range(200)}) > 3


def test_endpoint_state_survives_an_update() -> None:
    clock = FakeClock()
    p = picker(None, endpoints(3), clock)
    s = p.state("10.0.0.2", 8080)
    assert s is not None
    s.start()
    s.finish(0.5)
    s.start()
    q = Picker(
        "test", p.policy, [*endpoints(3)[1:], Endpoint("10.0.0.9", 8080)], now=clock, previous=p
    )
    kept = q.state("10.0.0.2", 8080)
    assert kept is s
    assert kept.in_flight == 1
    assert kept.rtt == pytest.approx(0.5)
    assert q.state("10.0.0.1", 8080) is None
    gone = p.state("10.0.0.1", 8080)
    assert gone is not None
    assert gone.picker is None
    kept.finish(0.1)
    assert kept.in_flight == 0


@pytest.mark.parametrize(
    "lb",
    [{"simple": "ROUND_ROBIN"}, {"simple": "RANDOM"}, {}, HASHES[0]],
)
def test_retry_avoids_the_previous_endpoint(lb: dict[str, object]) -> None:
    p = picker({"loadBalancer": lb}, endpoints(2), FakeClock())
    ctx = PickContext(headers={"x-user": "alice"})
    for _ in range(50):
        first = p.pick(ctx)
        assert p.pick(ctx, avoid=first) is not first
    single = picker({"loadBalancer": lb}, endpoints(1), FakeClock())
    only = single.pick(ctx)
    assert single.pick(ctx, avoid=only) is only  # nowhere else to go
