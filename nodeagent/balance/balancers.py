"""The balancers: one interface, `pick(candidates, ctx, now) -> EndpointState`.

`candidates` is never empty and holds only endpoints that may be picked (healthy ones, or all of
them in panic mode); the `Picker` maintains it. Balancers keep only their own bookkeeping (a round
robin cursor, a hash table); everything about an endpoint lives in its `EndpointState`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from nodeagent.balance.hashing import HashTable, Maglev, Ring, hash64, key_function
from nodeagent.balance.policy import LoadBalancer
from nodeagent.balance.state import EndpointState, PickContext

DEFAULT_RTT_S = 0.030  # Linkerd's default RTT estimate for an endpoint not yet measured
DEFAULT_DECAY_S = 10.0  # Linkerd's EWMA decay period


class Balancer:
    kind = "?"

    def rebuild(self, states: Sequence[EndpointState]) -> None:
        """The cluster's endpoint set changed (not called for health changes)."""

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        raise NotImplementedError


class RoundRobin(Balancer):
    kind = "ROUND_ROBIN"

    def __init__(self, rng: random.Random) -> None:
        # A random start, so that agents restarted together do not all hit endpoint 0 first.
        self._next = rng.randrange(1 << 30)

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        i = self._next
        self._next = i + 1
        return candidates[i % len(candidates)]


class Random(Balancer):
    kind = "RANDOM"

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        return candidates[int(self._random() * len(candidates))]


class _PowerOfTwo(Balancer):
    """Two distinct random candidates; `_better` says which one wins."""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random

    def _better(self, a: EndpointState, b: EndpointState, now: float) -> EndpointState:
        raise NotImplementedError

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        r = self._random
        i = int(r() * n)
        j = int(r() * (n - 1))
        if j >= i:
            j += 1
        return self._better(candidates[i], candidates[j], now)


def _less_used(a: EndpointState, b: EndpointState) -> EndpointState:
    """Fewer requests in flight; on a tie, the one picked longer ago (so that equal endpoints
    take turns instead of sharing by coin flips)."""
    if a.in_flight != b.in_flight:
        return a if a.in_flight < b.in_flight else b
    return a if a.picked_at <= b.picked_at else b


class LeastRequest(_PowerOfTwo):
    kind = "LEAST_REQUEST"

    def _better(self, a: EndpointState, b: EndpointState, now: float) -> EndpointState:
        return _less_used(a, b)


# Two latency estimates this close are the same speed: on a shared, busy node a couple of
# milliseconds, or a factor of two, are scheduling noise, not a faster replica. Without the
# band, peak EWMA hands equal replicas shares that follow their last spikes (measured
# 131/180/289 of 600 gRPC calls); with it they take turns, and a replica slower by more (the
# tests' 20-25 ms against 2 ms) still loses every draw.
SAME_SPEED_RATIO = 2.0
MIN_GAIN = 0.125  # the least weight of a sample below the estimate (TCP's SRTT alpha)
SAME_SPEED_SLACK_S = 0.002


class PeakEwma(_PowerOfTwo):
    """Linkerd's (tower's) peak-EWMA: cost = rtt estimate x (in-flight + 1).

    The estimate jumps to any sample above it (peak-sensitive: one slow response is enough to
    steer away), otherwise moves toward the sample with a weight that grows with the time since
    the last update, and decays toward zero while nothing is measured, so a slow endpoint left
    alone is probed again after a while and regains traffic once it answers fast. Two endpoints
    whose estimates are within the same-speed band, or one not yet measured, are compared as
    least-request does.
    """

    kind = "PEAK_EWMA"

    def __init__(self, rng: random.Random, decay_s: float = DEFAULT_DECAY_S) -> None:
        super().__init__(rng)
        self._decay_s = decay_s

    def _rtt(self, s: EndpointState, now: float) -> float:
        elapsed = now - s.rtt_at
        if elapsed > 0:
            s.rtt *= math.exp(-elapsed / self._decay_s)
            s.rtt_at = now
        return s.rtt

    def _better(self, a: EndpointState, b: EndpointState, now: float) -> EndpointState:
        ra, rb = self._rtt(a, now), self._rtt(b, now)
        if not (a.rtt_measured and b.rtt_measured):
            return _less_used(a, b)  # a guess against a measure says nothing: try it
        if max(ra, rb) <= min(ra, rb) * SAME_SPEED_RATIO + SAME_SPEED_SLACK_S:
            return _less_used(a, b)
        return b if rb * (b.in_flight + 1) < ra * (a.in_flight + 1) else a


def observe_rtt(
    s: EndpointState, sample: float, now: float, decay_s: float, *, failed: bool = False
) -> None:
    """Fold one latency sample into the endpoint's peak-EWMA estimate.

    The first sample replaces the default: the default is a guess, and with a 10 s decay it
    would otherwise dominate the estimate (and hide a slower replica in the same-speed band)
    for tens of seconds after an endpoint appears. A sample above the estimate is a peak only
    when the next one is above it too (then the estimate takes the smaller of the two), or when
    the request failed: one slow answer on a busy node is a scheduling spike, and the 10 s decay
    would make it steer traffic away from an equal replica for seconds; a slower replica is
    slow every time."""
    if not s.rtt_measured or (sample > s.rtt and failed):
        s.rtt_measured = True
        s.rtt = sample
        s.rtt_peak = 0.0
    elif sample > s.rtt:
        if s.rtt_peak > 0.0:
            s.rtt = min(sample, s.rtt_peak)
            s.rtt_peak = 0.0
        else:
            s.rtt_peak = sample
    else:
        s.rtt_peak = 0.0
        elapsed = now - s.rtt_at
        decay = math.exp(-elapsed / decay_s) if elapsed > 0 else 1.0
        # At least TCP's SRTT gain (1/8) per sample: with samples milliseconds apart the time
        # weight alone is ~0.0005, so an estimate raised by a stall of the whole node (every
        # sample of a burst late, a "peak") stayed up for the 10 s decay and kept a fast
        # replica in the slow one's band; now a score of fast samples brings it back.
        decay = min(decay, 1.0 - MIN_GAIN)
        s.rtt = s.rtt * decay + sample * (1.0 - decay)
    if now > s.rtt_at:
        s.rtt_at = now


class ConsistentHashBalancer(Balancer):
    """Ring hash or Maglev on a key from the context; no key: a random pick (as Envoy)."""

    def __init__(self, lb: LoadBalancer, rng: random.Random) -> None:
        assert lb.hash is not None
        self.kind = lb.kind
        self._policy = lb.hash
        self._key = key_function(lb.hash)
        self._random = rng.random
        self._table: HashTable = Ring((), 1)

    def rebuild(self, states: Sequence[EndpointState]) -> None:
        if self._policy.algorithm == "MAGLEV":
            self._table = Maglev(states, self._policy.table_size)
        else:
            self._table = Ring(states, self._policy.ring_size)

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        key = ctx.hash_key if ctx.hash_key is not None else self._key(ctx)
        if key is not None:
            found = self._table.lookup(hash64(key))
            if found is not None:
                return found
        return candidates[int(self._random() * len(candidates))]


class PassthroughBalancer(Balancer):
    """The client's original destination (Envoy's ORIGINAL_DST): that endpoint when it is one of
    the cluster's, else an untracked handle for it; without one, a random pick."""

    kind = "PASSTHROUGH"

    def __init__(self, rng: random.Random, make: Callable[[str, int], EndpointState]) -> None:
        self._random = rng.random
        self._make = make
        self._by_key: dict[tuple[str, int], EndpointState] = {}

    def rebuild(self, states: Sequence[EndpointState]) -> None:
        self._by_key = {(s.address, s.port): s for s in states}

    def pick(
        self, candidates: Sequence[EndpointState], ctx: PickContext, now: float
    ) -> EndpointState:
        dst = ctx.original_dst
        if dst is not None:
            found = self._by_key.get(dst)
            return found if found is not None else self._make(dst[0], dst[1])
        return candidates[int(self._random() * len(candidates))]


def make_balancer(
    lb: LoadBalancer,
    rng: random.Random,
    *,
    decay_s: float = DEFAULT_DECAY_S,
    make_state: Callable[[str, int], EndpointState],
) -> Balancer:
    if lb.kind == "ROUND_ROBIN":
        return RoundRobin(rng)
    if lb.kind == "RANDOM":
        return Random(rng)
    if lb.kind == "LEAST_REQUEST":
        return LeastRequest(rng)
    if lb.kind == "PASSTHROUGH":
        return PassthroughBalancer(rng, make_state)
    if lb.kind in ("RING_HASH", "MAGLEV"):
        return ConsistentHashBalancer(lb, rng)
    return PeakEwma(rng, decay_s)
