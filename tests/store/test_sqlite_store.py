"""The sqlite backend beyond the contract: processes sharing one file, file mode, schema."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio

from nodeagent.store import CompactedError, Store, StoreError, open_store, sqlite
from nodeagent.store.sqlite import prefix_end
from nodeagent.store.wal_watch import WalWatch

WRITER = textwrap.dedent(
    """
    import sys, time, trio
    from nodeagent.store import open_store

    async def main(url, count):
        store = await open_store(url)
        try:
            for i in range(count):
                await store.put(f"/x/{sys.argv[3]}/{i}", repr(time.time()).encode())
        finally:
            await store.aclose()

    trio.run(main, sys.argv[1], int(sys.argv[2]))
    """
)


async def first_batch(store: Store, start: int) -> None:
    async with store.watch("/", start_revision=start) as events:
        async for _ in events:
            return


def spawn_writer(url: str, count: int, tag: str) -> subprocess.Popen[bytes]:
    return spawn(WRITER, url, str(count), tag)


def spawn(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_proc(proc: subprocess.Popen[bytes]) -> None:
    try:
        rc = await trio.to_thread.run_sync(proc.wait, 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert rc == 0, err


@pytest.fixture(params=["inotify", "polling"])
def wake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How idle watches learn of other processes' commits. "inotify": only through the WAL
    file's inotify watch (the periodic look is pushed out of reach); "polling": as on a system
    without inotify, by `PRAGMA data_version` every POLL_INTERVAL."""
    if request.param == "inotify":
        monkeypatch.setattr(sqlite, "SAFETY_INTERVAL", 3600.0)
    else:
        monkeypatch.setattr(WalWatch, "open", classmethod(lambda cls, path: None))
    return str(request.param)


async def test_watcher_sees_other_process_writes_quickly(tmp_path: Path, wake: str) -> None:
    url = f"sqlite://{tmp_path}/mesh.db"
    store = await open_store(url)
    try:
        _, rev = await store.range("/")
        latencies: list[float] = []
        proc = spawn_writer(url, 20, "a")
        try:
            with trio.fail_after(30):
                async with store.watch("/x/", start_revision=rev + 1) as events:
                    async for batch in events:
                        now = time.time()
                        latencies.extend(now - float(e.kv.value) for e in batch)
                        if len(latencies) >= 20:
                            break
        finally:
            await wait_proc(proc)
    finally:
        await store.aclose()
    worst = max(latencies)
    print(
        f"\nsqlite cross-process watch latency: max {worst * 1000:.1f} ms, "
        f"mean {sum(latencies) / len(latencies) * 1000:.1f} ms over {len(latencies)} writes"
    )
    assert worst < 1.0


async def test_concurrent_processes_get_distinct_revisions(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/mesh.db"
    store = await open_store(url)
    try:
        _, start = await store.range("/")
        procs = [spawn_writer(url, 50, tag) for tag in ("p", "q", "r")]
        for proc in procs:
            await wait_proc(proc)
        kvs, rev = await store.range("/x/")
        assert len(kvs) == 150
        assert rev == start + 150  # one revision per write, none lost or shared
        async with store.watch("/x/", start_revision=start + 1) as events:
            seen = []
            async for batch in events:
                seen.extend(batch)
                if len(seen) >= 150:
                    break
        assert [e.kv.mod_revision for e in seen] == list(range(start + 1, start + 151))
    finally:
        await store.aclose()


async def test_file_is_private_and_parents_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "mesh.db"
    store = await open_store(f"sqlite://{path}")
    try:
        await store.put("/k", b"v")
    finally:
        await store.aclose()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    reopened = await open_store(f"sqlite://{path}")
    try:
        kv = await reopened.get("/k")
        assert kv is not None
        assert kv.value == b"v"
    finally:
        await reopened.aclose()


async def test_automatic_compaction_keeps_the_window(tmp_path: Path) -> None:
    store = await open_store(f"sqlite://{tmp_path}/m.db?retention=16")
    try:
        first = await store.put("/k", b"0")
        for i in range(40):
            await store.put("/k", str(i).encode())
        _, rev = await store.range("/")
        async with store.watch("/", start_revision=rev - 15) as events:
            async for batch in events:
                assert batch[0].kv.mod_revision == rev - 15
                break
        with pytest.raises(CompactedError):
            await first_batch(store, first)
    finally:
        await store.aclose()


async def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="open"):
        await open_store(f"sqlite://{tmp_path}/file/mesh.db")


async def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=r"junk\.db"):
        await open_store(f"sqlite://{bad}")


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("/a/", "/a0"), ("", None), ("a\U0010ffff", "b"), ("\U0010ffff", None), ("\ud7ff", "\ue000")],
)
def test_prefix_end(prefix: str, end: str | None) -> None:
    assert prefix_end(prefix) == end


LEASE_HOLDER = textwrap.dedent(
    """
    import sys, trio
    from nodeagent.store import open_store

    async def main(url):
        store = await open_store(url)
        lease = await store.grant_lease(0.5)
        await store.put("/nodes/dead", b"", lease=lease)
        await store.aclose()  # and exit without revoking: the process "dies"

    trio.run(main, sys.argv[1])
    """
)


async def test_dead_process_lease_is_reaped_by_a_reader(tmp_path: Path, wake: str) -> None:
    url = f"sqlite://{tmp_path}/mesh.db"
    store = await open_store(url)
    try:
        _, rev = await store.range("/")
        proc = spawn(LEASE_HOLDER, url)
        await wait_proc(proc)
        seen = []
        with trio.fail_after(10):
            async with store.watch("/nodes/", start_revision=rev + 1) as events:
                async for batch in events:
                    seen.extend((e.type, e.kv.key) for e in batch)
                    if len(seen) >= 2:
                        break
        assert seen == [("put", "/nodes/dead"), ("delete", "/nodes/dead")]
    finally:
        await store.aclose()
