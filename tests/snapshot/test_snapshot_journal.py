"""The disk cache as a journal (cache.py format, journal.py policy) against real files."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from nodeagent.snapshot import cache
from nodeagent.snapshot.errors import CacheError
from nodeagent.snapshot.journal import CacheJournal
from nodeagent.store import codec
from nodeagent.store.base import Event, KeyValue


def kv(key: str, rev: int, value: bytes = b"v") -> KeyValue:
    return KeyValue(key, value + str(rev).encode(), 1, rev, 1)


def put(key: str, rev: int) -> Event:
    return Event("put", kv(key, rev))


def delete(key: str, rev: int) -> Event:
    return Event("delete", KeyValue(key, b"", 0, rev, 0))


def on_disk(path: Path) -> tuple[dict[str, KeyValue], int]:
    found = cache.decode(path.read_bytes())
    return {k.key: k for k in found.kvs}, found.revision


def write_pending(journal: CacheJournal) -> str:
    work = journal.take()
    assert work is not None
    return journal.write(work)


def test_a_listing_is_written_whole_and_batches_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path)
    journal.rebase([kv("a", 1), kv("b", 2)], 2)
    assert write_pending(journal) == "rewritten"
    size = path.stat().st_size
    journal.record([put("c", 3), delete("a", 4)], 4)
    journal.record([put("b", 5)], 5)
    assert write_pending(journal) == "appended"
    assert path.stat().st_size > size
    docs, revision = on_disk(path)
    assert revision == 5
    assert docs == {"b": kv("b", 5), "c": kv("c", 3)}
    assert journal.take() is None  # nothing pending after a write


def test_appends_past_the_whole_write_compact_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path, compact_min=0)
    journal.rebase([kv("a", 1)], 1)
    write_pending(journal)
    done = []
    for rev in range(2, 40):
        journal.record([put("a", rev)], rev)
        done.append(write_pending(journal))
    assert "compacted" in done
    assert "appended" in done
    # compacted: one document, not 38 versions of it
    assert path.stat().st_size < 3 * len(cache.encode([kv("a", 39)], 39))
    assert on_disk(path) == ({"a": kv("a", 39)}, 39)


def test_a_torn_append_is_dropped_and_the_file_rewritten_before_the_next(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path)
    journal.rebase([kv("a", 1)], 1)
    write_pending(journal)
    whole = path.stat().st_size
    journal.record([put("b", 2)], 2)
    write_pending(journal)
    with path.open("r+b") as f:  # a crash mid-append: the commit never made it
        f.truncate(path.stat().st_size - 3)
    restarted = CacheJournal(path)
    found = restarted.load()
    assert found is not None
    assert (found.revision, found.end, {k.key for k in found.kvs}) == (1, whole, {"a"})
    assert found.dropped == "an incomplete record at the end"
    restarted.record([put("c", 3)], 3)
    assert write_pending(restarted) == "compacted"  # not appended after the torn bytes
    assert on_disk(path) == ({"a": kv("a", 1), "c": kv("c", 3)}, 3)


def test_a_zero_filled_tail_or_a_bad_checksum_ends_the_read_at_the_last_commit(
    tmp_path: Path,
) -> None:
    head = cache.encode([kv("a", 1)], 1)
    batch = cache.encode_changes([put("b", 2)], 2)
    assert cache.decode(head + bytes(64)).revision == 1  # zeros: not a commit
    corrupt = bytearray(head + batch)
    corrupt[len(head) + 2] ^= 0xFF  # a flipped bit inside the batch's change
    found = cache.decode(bytes(corrupt))
    assert (found.revision, [k.key for k in found.kvs]) == (1, ["a"])
    assert found.dropped is not None


def test_a_version_1_cache_is_read_and_rewritten_as_version_2(tmp_path: Path) -> None:
    path = tmp_path / "c"
    old = {
        "format": cache.FORMAT,
        "version": 1,
        "revision": 7,
        "entries": [["a", b"x", 1, 7, 1]],
    }
    path.write_bytes(codec.encode(old))
    journal = CacheJournal(path)
    found = journal.load()
    assert found is not None
    assert (found.version, found.revision, found.kvs) == (1, 7, [KeyValue("a", b"x", 1, 7, 1)])
    journal.record([put("b", 8)], 8)
    assert write_pending(journal) == "compacted"  # never appended to a version 1 file
    assert cache.decode(path.read_bytes()).version == cache.VERSION
    assert on_disk(path) == ({"a": KeyValue("a", b"x", 1, 7, 1), "b": kv("b", 8)}, 8)


def test_a_rebase_keeps_the_held_documents_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path)
    journal.rebase([kv("held", 1), kv("gone", 2)], 2)
    write_pending(journal)
    journal.record([put("held", 3)], 3)  # not on disk yet when the re-list comes
    journal.rebase([kv("new", 9)], 9, keep={"held"})
    assert write_pending(journal) == "rewritten"
    assert on_disk(path) == ({"new": kv("new", 9), "held": kv("held", 3)}, 9)


def test_a_failed_append_is_cut_back_and_retried_with_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path)
    journal.rebase([kv("a", 1)], 1)
    write_pending(journal)
    size = path.stat().st_size
    real = cache._write_all

    def disk_full(fd: int, data: bytes) -> None:  # half the bytes land, then ENOSPC
        real(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    journal.record([put("b", 2)], 2)
    work = journal.take()
    assert work is not None
    monkeypatch.setattr(cache, "_write_all", disk_full)
    with pytest.raises(OSError, match="No space left"):
        journal.write(work)
    monkeypatch.setattr(cache, "_write_all", real)
    assert path.stat().st_size == size  # cut back: no torn record left in the file
    assert journal.restore(work)
    journal.record([put("c", 3)], 3)
    assert write_pending(journal) == "appended"
    assert on_disk(path) == ({"a": kv("a", 1), "b": kv("b", 2), "c": kv("c", 3)}, 3)


def test_restore_gives_up_past_the_bound(tmp_path: Path) -> None:
    journal = CacheJournal(tmp_path / "c", max_pending=3)
    journal.record([put("a", 1), put("b", 2)], 2)
    work = journal.take()
    assert work is not None
    journal.record([put("c", 3), put("d", 4)], 4)
    assert not journal.restore(work)
    assert journal.orphaned
    assert not journal.pending()
    journal.record([put("e", 5)], 5)  # dropped until a listing
    assert not journal.pending()
    journal.rebase([kv("a", 6)], 6)
    assert not journal.orphaned
    assert journal.pending()


def test_a_vanished_file_orphans_the_journal_until_the_next_listing(tmp_path: Path) -> None:
    path = tmp_path / "c"
    journal = CacheJournal(path)
    journal.rebase([kv("a", 1)], 1)
    write_pending(journal)
    path.unlink()
    journal.record([put("b", 2)], 2)
    work = journal.take()
    assert work is not None
    with pytest.raises(CacheError, match="gone"):
        journal.write(work)
    journal.abandon()
    journal.record([put("c", 3)], 3)
    assert not journal.pending()
    journal.rebase([kv("a", 4)], 4)
    assert write_pending(journal) == "rewritten"
    assert on_disk(path) == ({"a": kv("a", 4)}, 4)


def test_append_refuses_a_file_that_is_not_the_one_last_written(tmp_path: Path) -> None:
    path = tmp_path / "c"
    cache.write(path, cache.encode([kv("a", 1)], 1))
    with pytest.raises(CacheError, match="expected"):
        cache.append(path, b"x", path.stat().st_size + 1)
