"""Membership maps: index key → the document keys filed under it, stored compactly.

The builder keeps one such map per index (ip → workloads, (ns, label, value) → workloads, …).
Most index keys have one member (an ip, a uid) and many have a handful (the pods of one
service account), so a group is held in the smallest shape that fits it: a bare key, a tuple of
up to `TUPLE_MAX` keys (56 + 8 n bytes), and only beyond that a set (~730 bytes at 5 members).
Adding and removing stay O(1) for sets and O(TUPLE_MAX) below that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

K = TypeVar("K")

Members = str | tuple[str, ...] | set[str]
TUPLE_MAX = 16


def add(multi: dict[K, Members], k: K, key: str) -> None:
    members = multi.get(k)
    if members is None:
        multi[k] = key
    elif isinstance(members, str):
        if members != key:
            multi[k] = (members, key)
    elif isinstance(members, tuple):
        if key not in members:
            multi[k] = (*members, key) if len(members) < TUPLE_MAX else {*members, key}
    else:
        members.add(key)


def discard(multi: dict[K, Members], k: K, key: str) -> None:
    members = multi.get(k)
    if members is None:
        return
    if isinstance(members, str):
        if members == key:
            del multi[k]
        return
    if isinstance(members, set):
        members.discard(key)
        if len(members) > TUPLE_MAX // 2:  # hysteresis: no flapping at the boundary
            return
    rest = tuple(m for m in members if m != key)
    if not rest:
        del multi[k]
    else:
        multi[k] = rest[0] if len(rest) == 1 else rest


def each(members: Members | None) -> Iterable[str]:
    """The keys of a group (none for None), for reading only."""
    if members is None:
        return ()
    return (members,) if isinstance(members, str) else members


def as_set(members: Members | None) -> set[str] | frozenset[str]:
    """A group as a set, for intersections; a stored set is returned as it is, never copied
    (callers must not change it), so a large group costs nothing to read."""
    if members is None:
        return frozenset()
    if isinstance(members, set):
        return members
    return frozenset((members,) if isinstance(members, str) else members)
