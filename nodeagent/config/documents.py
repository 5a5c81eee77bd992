"""Read multi-document YAML from files, directories and stdin, keeping where each document came
from (file, index, first line) so that every later error can point at it.

YAML is read as Kubernetes reads it (sigs.k8s.io/yaml, i.e. go-yaml, then strict decoding), so
that what `kubectl apply` accepts we accept and what it refuses we refuse with a line number:

- a ':' ends a plain scalar only when a blank follows it, in flow context too: `[001:db8::]`
  is a list of one string (PyYAML would end the scalar at the last ':' before ']' and read a
  mapping); `[a: b]` is still a mapping;
- no YAML 1.1 base-60 numbers: `1:20` is the string "1:20", not 80;
- a mapping with a duplicate key is an error naming the key and both lines (Kubernetes' strict
  decoding: `mapping key "name" already defined`).

Bounded, so that no input makes the loader crash or run for long: a file over MAX_FILE bytes
and a document over MAX_DOCUMENT bytes are refused before parsing; nesting deeper than MAX_DEPTH
levels, an integer past Python's int-string limit, a NUL or other non-printable character, and
YAML aliases (an alias bomb expands exponentially when walked or encoded) are LoadErrors naming
the line. Empty documents (a stray `---`) are skipped, as kubectl does.
"""

from __future__ import annotations

import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nodeagent.config.errors import LoadError, Source

MAX_FILE = 4 << 20
# Kubernetes stores an object in one etcd request, and etcd refuses requests over 1.5 MiB
# (--max-request-bytes' default): no larger object can exist in a cluster. Our store's own
# value limit (1 MiB of msgpack, store.codec.MAX_VALUE) is checked after validation.
MAX_DOCUMENT = 1536 * 1024
# Istio's deepest documents nest about a dozen levels; the composer and the validators recurse,
# so a bound far below Python's recursion limit keeps deep input an error, never a crash.
MAX_DEPTH = 100
SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One parsed YAML document before validation."""

    source: Source
    data: Any


_BREAK = "\0 \t\r\n\x85\u2028\u2029"
# A line that starts or ends a document (YAML 1.2, 9.1.2); the scanner ends any scalar there.
_DOCUMENT_MARKER = re.compile(r"^(?:---|\.\.\.)(?=[ \t\r\n]|$)", re.MULTILINE)
_SEXAGESIMAL = {
    # PyYAML's YAML 1.1 int and float patterns without their base-60 forms (go-yaml has none).
    "tag:yaml.org,2002:int": re.compile(
        r"""^(?:[-+]?0b[0-1_]+
        |[-+]?0[0-7_]+
        |[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""",
        re.X,
    ),
    "tag:yaml.org,2002:float": re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with go-yaml's plain scalars and numbers, strict mappings, bounded depth and
    no aliases (see the module docstring)."""

    yaml_implicit_resolvers = {
        first: [(tag, _SEXAGESIMAL.get(tag, regexp)) for tag, regexp in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def scan_plain(self) -> Any:
        """PyYAML's scan_plain with go-yaml's (and YAML 1.2's) rule for ':': it ends the scalar
        only when a blank follows, in flow context as in block context."""
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
                    if self.peek(length + 1) in _BREAK:
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
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: SafeConstructor names it below
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f'mapping key "{key}" already defined at line {first.start_mark.line + 1}',
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: Any) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            # Python refuses to convert integers of more than 4300 digits (CVE-2020-10735);
            # no field of any kind holds more than 64 bits anyway.
            digits = sum(c.isdigit() for c in node.value)
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {digits} digits is out of range", node.start_mark
            ) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _line_col(text: str, offset: int) -> str:
    return f"{_line(text, offset)}:{offset - text.rfind(chr(10), 0, offset)}"


def _scalar_at(node: Any, *keys: str) -> str | None:
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((v for k, v in node.value if k.value == key), None)
    return node.value if isinstance(node, yaml.ScalarNode) else None


def _describe(root: Any, index: int) -> str:
    """`Kind ns/name` of a composed document, as far as it says, else `document N`."""
    kind, name = _scalar_at(root, "kind"), _scalar_at(root, "metadata", "name")
    if kind is None or name is None:
        return f"document {index}"
    namespace = _scalar_at(root, "metadata", "namespace")
    return f"{kind} {namespace + '/' if namespace else ''}{name}"


def _field_at(root: Any, offset: int) -> str:
    """The field path (`spec.ports[0].number: `) of the node starting at `offset`, or ""."""
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        node, path = stack.pop()
        if node.start_mark.index == offset and path:
            return f"{path}: "
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                if key.start_mark.index == offset:
                    return f"{sub}: "
                stack.append((value, sub))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    return ""


def _check_document_sizes(text: str, file: str) -> None:
    """Refuse a document over MAX_DOCUMENT before parsing it (parsing is the slow part)."""
    starts = [0, *(m.start() for m in _DOCUMENT_MARKER.finditer(text)), len(text)]
    for index, (a, b) in enumerate(itertools.pairwise(starts)):
        if b - a > MAX_DOCUMENT // 4 and len(text[a:b].encode()) > MAX_DOCUMENT:
            size = len(text[a:b].encode())
            raise LoadError(
                f"{file}:{_line(text, a)}: document {index} is {size} bytes, "
                f"over the {MAX_DOCUMENT} byte limit of a Kubernetes object (etcd's 1.5 MiB)"
            )


def load_text(text: str, file: str) -> list[RawDocument]:
    """Parse every document of `text`; a YAML error is a LoadError naming file, line and column."""
    if len(text) > MAX_FILE:
        raise LoadError(f"{file}: {len(text)} bytes is over the {MAX_FILE} byte limit")
    _check_document_sizes(text, file)
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        # Raised before any parsing for a NUL or other non-printable character.
        where = _line_col(text, exc.position)
        raise LoadError(
            f"{file}:{where}: YAML error: character {exc.character:#06x} is not allowed "
            "(special characters such as NUL are not YAML)"
        ) from None
    docs: list[RawDocument] = []
    index = 0
    node = None
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
        if isinstance(exc, yaml.constructor.ConstructorError) and node is not None and mark:
            # The document is composed: name it and the field, as validation errors do.
            raise LoadError(
                f"{where}: {_describe(node, index)}: {_field_at(node, mark.index)}{problem}"
            ) from None
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
