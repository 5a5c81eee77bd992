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
    """Two distinct random candidates; the one with the lower `_cost` wins."""

    def __init__(self, rng: random.Random) -> None:
        self._random = rng.random

    def _cost(self, s: EndpointState, now: float) -> float:
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
        a, b = candidates[i], candidates[j]
        return b if self._cost(b, now) < self._cost(a, now) else a


class LeastRequest(_PowerOfTwo):
    kind = "LEAST_REQUEST"

    def _cost(self, s: EndpointState, now: float) -> float:
        return s.in_flight


class PeakEwma(_PowerOfTwo):
    """Linkerd's (tower's) peak-EWMA: cost = rtt estimate x (in-flight + 1).

    The estimate jumps to any sample above it (peak-sensitive: one slow response is enough to
    steer away), otherwise moves toward the sample with a weight that grows with the time since
    the last update, and decays toward zero while nothing is measured, so a slow endpoint left
    alone is probed again after a while and regains traffic once it answers fast.
    """

    kind = "PEAK_EWMA"

    def __init__(self, rng: random.Random, decay_s: float = DEFAULT_DECAY_S) -> None:
        super().__init__(rng)
        self._decay_s = decay_s

    def _cost(self, s: EndpointState, now: float) -> float:
        elapsed = now - s.rtt_at
        if elapsed > 0:
            s.rtt *= math.exp(-elapsed / self._decay_s)
            s.rtt_at = now
        return s.rtt * (s.in_flight + 1)


def observe_rtt(s: EndpointState, sample: float, now: float, decay_s: float) -> None:
    """Fold one latency sample into the endpoint's peak-EWMA estimate."""
    if sample > s.rtt:
        s.rtt = sample
    else:
        elapsed = now - s.rtt_at
        decay = math.exp(-elapsed / decay_s) if elapsed > 0 else 1.0
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
