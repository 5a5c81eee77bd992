"""memory and sqlite agree on random operation sequences: results, state and full history."""

from __future__ import annotations

import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.store import Compare, Delete, Event, Put, Store, StoreError, open_store

KEYS = ["/a", "/a/x", "/a/y", "/b", "/b/z"]
key = st.sampled_from(KEYS)
value = st.binary(max_size=4)
put = st.builds(Put, key, value)
delete = st.builds(Delete, st.sampled_from([*KEYS, "/a/", "/"]), st.booleans())
op = st.one_of(
    st.tuples(st.just("put"), put),
    st.tuples(st.just("delete"), delete),
    st.tuples(
        st.just("txn"),
        st.tuples(
            st.lists(st.tuples(key, st.integers(0, 12)), max_size=2),
            st.lists(st.one_of(put, delete), max_size=3),
            st.lists(st.one_of(put, delete), max_size=3),
        ),
    ),
)


async def run(store: Store, ops: list[tuple[str, Any]]) -> tuple[list[object], list[Event]]:
    results: list[object] = []
    for kind, arg in ops:
        try:
            if kind == "put":
                results.append(await store.put(arg.key, arg.value))
            elif kind == "delete":
                results.append(await store.delete(arg.key, prefix=arg.prefix))
            else:
                compares, success, failure = arg
                cmp = [Compare(k, rev) for k, rev in compares]
                results.append(await store.txn(cmp, success, failure))
        except StoreError as exc:
            results.append(type(exc).__name__)
        results.append(await store.range("/"))
    _, rev = await store.range("/")
    history: list[Event] = []
    if rev > 1:
        async with store.watch("/", start_revision=1) as events:
            async for batch in events:
                history.extend(batch)
                if history[-1].kv.mod_revision >= rev:
                    break
    return results, history


@settings(max_examples=100, deadline=None)
@given(st.lists(op, max_size=15))
async def test_memory_and_sqlite_agree(ops: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(prefix="store-diff-") as d:
        memory = await open_store("memory://")
        sqlite = await open_store(f"sqlite://{d}/m.db")
        try:
            expected = await run(memory, ops)
            got = await run(sqlite, ops)
        finally:
            await memory.aclose()
            await sqlite.aclose()
    assert got == expected
