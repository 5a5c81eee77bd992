"""Errors of the configuration API: every one names the file, the document and the field path."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem at one field path of one document (path "" means the document itself).

    `message` is appended after ": ", unless it starts with "is " (e.g. "is not supported"), which
    reads as a sentence about the field: "spec.http[0].corsPolicy is not supported".
    """

    path: str
    message: str

    def __str__(self) -> str:
        if not self.path:
            return self.message
        if self.message.startswith("is "):
            return f"{self.path} {self.message}"
        return f"{self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a document came from: file name ("-" for stdin), 0-based index, 1-based line."""

    file: str
    index: int = 0
    line: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class ConfigError:
    """A field error placed in its document: `file:line: Kind ns/name: path: message`."""

    source: Source
    ref: str  # "VirtualService default/my-app", or "document 3" when the kind/name is unknown
    error: FieldError

    def __str__(self) -> str:
        return f"{self.source}: {self.ref}: {self.error}"


class ConfigInvalid(Exception):
    """A batch was rejected; `errors` lists every problem found (nothing was written)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


class LoadError(Exception):
    """A file could not be read or parsed (the message names the file and, for YAML, the line)."""
