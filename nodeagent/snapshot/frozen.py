"""Compact read-only mappings for the snapshot's resources and indexes.

- `FrozenDict`: a dict that refuses every change and hashes by content, so one instance can be
  shared by every resource with equal content (label sets, selectors, named ports) through a
  cache keyed by the instance itself: no `MappingProxyType` wrapper and no separate key tuple
  beside it (~140 bytes less per distinct label set). Lookups are the dict's own, at C speed.
- `PortMap`: a mapping from a few port numbers to values, held as two tuples (the key tuple is
  shared by every map with the same ports): ~50 bytes plus the values, against ~270 for a dict
  behind a proxy. For the per-service endpoint lists and the per-VIP targets.
- `share(value)`: one instance per distinct hashable value (FrozenDicts, ServicePorts, key
  tuples), through a bounded cache: when full it is simply emptied (sharing is lost only for
  values made before that, never correctness), so churn cannot grow it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NoReturn, TypeVar

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

SHARED_MAX = 1 << 16
_SHARED: dict[Any, Any] = {}


def share(value: T) -> T:
    """The shared instance equal to `value` (which becomes it if there is none yet)."""
    found = _SHARED.get(value)
    if found is None:
        if len(_SHARED) >= SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[value] = value
    return found


class FrozenDict(dict[K, V]):
    """A read-only, hashable dict (compares equal to a dict with the same items)."""

    __slots__ = ()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a snapshot mapping is read-only")

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (dict(self),))


class PortMap(Mapping[int, V]):
    """Port number → value for a handful of ports; read-only."""

    __slots__ = ("_keys", "_values")

    def __init__(self, keys: tuple[int, ...], values: tuple[V, ...]) -> None:
        self._keys = keys
        self._values = values

    def get(self, key: int, default: Any = None) -> Any:
        try:
            return self._values[self._keys.index(key)]
        except ValueError:
            return default

    def __getitem__(self, key: int) -> V:
        try:
            return self._values[self._keys.index(key)]
        except ValueError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PortMap) and self._keys == other._keys:
            return self._values == other._values
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"PortMap({dict(zip(self._keys, self._values, strict=True))!r})"
