"""Read multi-document YAML from files, directories and stdin, keeping where each document came
from (file, index, first line) so that every later error can point at it.

Bounded: a file over MAX_FILE bytes is refused, and YAML aliases are refused (an alias bomb
expands exponentially when walked or encoded). Empty documents (a stray `---`) are skipped, as
kubectl does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.config.errors import LoadError, Source

MAX_FILE = 4 << 20
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One parsed YAML document before validation."""

    source: Source
    data: Any


_BREAK = "\0 \t\r\n\x85\u2028\u2029"


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases, reading IPv6 addresses in flow lists as Kubernetes does.

    `[1.2.3.4, 2001:db8::]` is a list of two strings for Kubernetes' (Go) YAML parser; PyYAML
    ends the plain scalar at the last ':' before ']' and reads a mapping. Istio's own corpus
    relies on Go's reading, so a ':' right before a flow indicator stays in a plain scalar that
    already contains a ':'.
    """

    def scan_plain(self) -> Any:
        chunks: list[str] = []
        start_mark = self.get_mark()
        end_mark = start_mark
        indent = self.indent + 1
        spaces: list[str] = []
        while True:
            length = 0
            if self.peek() == "#":
                break
            while True:
                ch = self.peek(length)
                if ch == ":":
                    after = self.peek(length + 1)
                    if after in _BREAK:
                        break
                    ipv6_like = ":" in self.prefix(length) or any(":" in c for c in chunks)
                    if self.flow_level and after in ",[]{}" and not ipv6_like:
                        break
                elif ch in _BREAK or (self.flow_level and ch in ",?[]{}"):
                    break
                length += 1
            if length == 0:
                break
            self.allow_simple_key = False
            chunks.extend(spaces)
            chunks.append(self.prefix(length))
            self.forward(length)
            end_mark = self.get_mark()
            spaces = self.scan_plain_spaces(indent, start_mark) or []
            if not spaces or self.peek() == "#" or (not self.flow_level and self.column < indent):
                break
        return yaml.ScalarToken("".join(chunks), True, start_mark, end_mark)

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not supported", event.start_mark
            )
        return super().compose_node(parent, index)


def load_text(text: str, file: str) -> list[RawDocument]:
    """Parse every document of `text`; a YAML error is a LoadError naming file, line and column."""
    if len(text) > MAX_FILE:
        raise LoadError(f"{file}: {len(text)} bytes is over the {MAX_FILE} byte limit")
    loader = _Loader(text)
    docs: list[RawDocument] = []
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            data = loader.construct_document(node)
            if data is not None:
                docs.append(RawDocument(Source(file, index, node.start_mark.line + 1), data))
            index += 1
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
        problem = exc.problem or exc.context or "invalid YAML"
        raise LoadError(f"{where}: YAML error: {problem}") from None
    except yaml.YAMLError as exc:
        raise LoadError(f"{file}: YAML error: {exc}") from None
    finally:
        loader.dispose()
    return docs


def _read(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise LoadError(f"{path}: {size} bytes is over the {MAX_FILE} byte limit")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read: {exc.strerror or exc}") from None


def load_path(spec: str) -> list[RawDocument]:
    """Load `spec`: "-" is stdin, a directory is its *.yaml/*.yml/*.json files in name order
    (not recursive, like kubectl), anything else a file."""
    if spec == "-":
        text = sys.stdin.read(MAX_FILE + 1)
        return load_text(text, "-")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise LoadError(f"{path}: directory has no {'/'.join(SUFFIXES)} files")
        docs: list[RawDocument] = []
        for file in files:
            docs.extend(load_text(_read(file), str(file)))
        return docs
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    return load_text(_read(path), str(path))


def load_paths(specs: list[str]) -> list[RawDocument]:
    docs: list[RawDocument] = []
    for spec in specs:
        docs.extend(load_path(spec))
    return docs
