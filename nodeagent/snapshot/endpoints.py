"""ServiceEndpoints: one service's endpoints per service port, each list built on first use.

The builder decides *which* workloads back a service (selector, namespace, health); the
`Endpoint` records (address, target port, labels: one per workload per service port, ~80 bytes
each with its slot in the tuple) are only made when something asks for that port's list, and
then kept with the entry. A snapshot entry that no lookup touches therefore costs its workload
tuple (8 bytes per workload) instead of its endpoint records, so an agent pays the records for
the services its pods reach, not for the whole mesh. An entry is replaced, never changed, when
its service or the workloads behind it change; building a list is a pure function of the
entry, so every snapshot sharing the entry sees the same tuple.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from nodeagent.snapshot.frozen import share
from nodeagent.snapshot.model import EMPTY, Endpoint, ServicePort, Workload


class ServiceEndpoints(Mapping[int, tuple[Endpoint, ...]]):
    """Service port number → its endpoints: the selected workloads' (in order), then `extra`
    (endpoints not backed by a workload, e.g. a ServiceEntry's static ones) for that port."""

    __slots__ = ("_built", "_extra", "_numbers", "_ports", "_workloads")

    def __init__(
        self,
        ports: tuple[ServicePort, ...],
        workloads: tuple[Workload, ...],
        extra: Mapping[int, tuple[Endpoint, ...]] = EMPTY,
    ) -> None:
        numbers = share(tuple(p.port for p in ports))
        if len(set(numbers)) != len(numbers):  # one list per number: the last port declared
            last = {p.port: p for p in ports}
            ports, numbers = tuple(last.values()), share(tuple(last))
        self._ports = ports
        self._numbers = numbers
        self._workloads = workloads
        self._extra = extra
        self._built: list[tuple[Endpoint, ...] | None] | None = None

    @property
    def workloads(self) -> tuple[Workload, ...]:
        return self._workloads

    def total(self) -> int:
        """How many endpoints all the lists hold (without building them)."""
        return len(self._workloads) * len(self._ports) + sum(
            len(self._extra.get(n, ())) for n in self._numbers
        )

    def get(self, key: int, default: Any = None) -> Any:
        try:
            at = self._numbers.index(key)
        except ValueError:
            return default
        built = self._built
        if built is None:
            built = self._built = [None] * len(self._numbers)
        found = built[at]
        if found is None:
            found = built[at] = self._build(self._ports[at])
        return found

    def _build(self, port: ServicePort) -> tuple[Endpoint, ...]:
        target = port.target_port
        if isinstance(target, int):
            eps = [Endpoint(wl.addresses[0], target, wl, wl.labels) for wl in self._workloads]
        else:
            # Without the workload's named container port, the service port number.
            eps = [
                Endpoint(wl.addresses[0], wl.ports.get(target, port.port), wl, wl.labels)
                for wl in self._workloads
            ]
        eps.extend(self._extra.get(port.port, ()))
        return tuple(eps)

    def __getitem__(self, key: int) -> tuple[Endpoint, ...]:
        found = self.get(key)
        if found is None:
            raise KeyError(key)
        return found  # type: ignore[no-any-return]

    def __contains__(self, key: object) -> bool:
        return key in self._numbers

    def __iter__(self) -> Iterator[int]:
        return iter(self._numbers)

    def __len__(self) -> int:
        return len(self._numbers)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ServiceEndpoints):
            return (
                self._ports == other._ports
                and self._workloads == other._workloads
                and dict(self._extra) == dict(other._extra)
            )
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"ServiceEndpoints(ports={self._numbers}, workloads={len(self._workloads)}, "
            f"extra={sum(len(v) for v in self._extra.values())})"
        )
