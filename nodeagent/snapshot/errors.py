"""Errors of the snapshot package: a store document that does not convert, a bad disk cache."""

from __future__ import annotations


class SnapshotError(Exception):
    """Base of the snapshot package's errors."""


class ConvertError(SnapshotError):
    """A store document does not convert to a snapshot resource; only that document is skipped."""

    def __init__(self, key: str, path: str, reason: str) -> None:
        where = f"{key} {path}" if path else key
        super().__init__(f"{where}: {reason}")
        self.key = key
        self.path = path
        self.reason = reason


class CacheError(SnapshotError):
    """The on-disk snapshot cache is unreadable; the agent starts without it."""
