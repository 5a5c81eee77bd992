"""Compact membership groups behave like a dict of sets through any add/discard sequence."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nodeagent.snapshot import members
from nodeagent.snapshot.members import Members

OPS = st.lists(
    st.tuples(st.booleans(), st.sampled_from("ab"), st.integers(0, 3 * members.TUPLE_MAX)),
    max_size=300,
)


@given(OPS)
def test_groups_match_a_dict_of_sets(ops: list[tuple[bool, str, int]]) -> None:
    multi: dict[str, Members] = {}
    reference: dict[str, set[str]] = {}
    for adding, k, n in ops:
        key = f"k{n}"
        if adding:
            members.add(multi, k, key)
            reference.setdefault(k, set()).add(key)
        else:
            members.discard(multi, k, key)
            reference.get(k, set()).discard(key)
            if not reference.get(k, True):
                del reference[k]
        assert {g: set(members.each(m)) for g, m in multi.items()} == reference
        for g, m in multi.items():
            assert members.as_set(m) == reference[g]
            # the smallest shape that fits: a bare key for one, never an empty group
            assert isinstance(m, str) == (len(reference[g]) == 1)
            if isinstance(m, tuple):
                assert len(set(m)) == len(m) <= members.TUPLE_MAX
    assert set(members.each(None)) == set() == members.as_set(None)
