"""A strict parser of the Prometheus text format 0.0.4, for `nodeagent admin stats` and tests.

It accepts what Prometheus accepts from a well-behaved exporter and rejects the rest with the line
number and the reason: samples before their TYPE, duplicate families or series, bad escapes,
histograms without a `+Inf` bucket, buckets that are not cumulative, `_count` that disagrees with
`+Inf`. Sans-IO and bounded (the caller passes the text it read).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

MAX_TEXT = 16 * 1024 * 1024

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(
    rf"(?P<name>{_NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)(?: (?P<ts>-?\d+))?\Z"
)
_LABEL = re.compile(r'\s*(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"\s*(?:,|\Z)')
_KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}


class ExpositionError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(slots=True)
class Family:
    name: str
    kind: str = "untyped"
    help: str | None = None
    samples: list[Sample] = field(default_factory=list)


def _unescape(text: str, line_no: int, allow_quote: bool) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            if i + 1 >= len(text):
                raise ExpositionError(f"line {line_no}: dangling backslash")
            nxt = text[i + 1]
            if nxt == "n":
                out.append("\n")
            elif nxt == "\\" or (nxt == '"' and allow_quote):
                out.append(nxt)
            else:
                raise ExpositionError(f"line {line_no}: invalid escape \\{nxt}")
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _value(text: str, line_no: int) -> float:
    special = {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
    if text in special:
        return special[text]
    try:
        return float(text)
    except ValueError:
        raise ExpositionError(f"line {line_no}: value {text!r} is not a number") from None


def _labels(text: str, line_no: int) -> dict[str, str]:
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ExpositionError(f"line {line_no}: malformed labels {{{text}}}")
        name = m.group("name")
        if name in labels:
            raise ExpositionError(f"line {line_no}: label {name} repeated")
        labels[name] = _unescape(m.group("value"), line_no, allow_quote=True)
        pos = m.end()
    return labels


def _family_of(name: str, families: dict[str, Family]) -> Family | None:
    if name in families:
        return families[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in families and families[base].kind in ("histogram", "summary"):
            return families[base]
    return None


def parse(text: str) -> dict[str, Family]:
    """Families by name, in order; ExpositionError naming the line on anything malformed."""
    if len(text) > MAX_TEXT:
        raise ExpositionError(f"exposition of {len(text)} bytes exceeds {MAX_TEXT}")
    if text and not text.endswith("\n"):
        raise ExpositionError("exposition does not end with a newline")
    families: dict[str, Family] = {}
    series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    current: Family | None = None
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                if not re.fullmatch(_NAME, name):
                    raise ExpositionError(f"line {line_no}: bad metric name {name!r}")
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = Family(name)
                elif fam is not current:
                    raise ExpositionError(f"line {line_no}: family {name} appears twice")
                if fam.samples:
                    raise ExpositionError(f"line {line_no}: {parts[1]} after samples of {name}")
                rest = parts[3] if len(parts) > 3 else ""
                if parts[1] == "HELP":
                    if fam.help is not None:
                        raise ExpositionError(f"line {line_no}: second HELP for {name}")
                    fam.help = _unescape(rest, line_no, allow_quote=False)
                else:
                    if rest not in _KINDS:
                        raise ExpositionError(f"line {line_no}: unknown type {rest!r}")
                    fam.kind = rest
                current = fam
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ExpositionError(f"line {line_no}: not a sample: {line!r}")
        name = m.group("name")
        fam = _family_of(name, families)
        if fam is None:
            fam = families[name] = Family(name)
        elif fam is not current:
            raise ExpositionError(f"line {line_no}: sample {name} outside its family's block")
        current = fam
        labels = _labels(m.group("labels") or "", line_no)
        key = (name, tuple(sorted(labels.items())))
        if key in series:
            raise ExpositionError(f"line {line_no}: duplicate series {name}{labels}")
        series.add(key)
        if fam.kind == "histogram" and name == fam.name:
            raise ExpositionError(f"line {line_no}: histogram {name} sample without suffix")
        if name.endswith("_bucket") and fam.kind == "histogram" and "le" not in labels:
            raise ExpositionError(f"line {line_no}: bucket without le label")
        fam.samples.append(Sample(name, labels, _value(m.group("value"), line_no)))
    for fam in families.values():
        if fam.kind == "histogram":
            _check_histogram(fam)
    return families


def _check_histogram(fam: Family) -> None:
    groups: dict[tuple[tuple[str, str], ...], list[Sample]] = {}
    counts: dict[tuple[tuple[str, str], ...], float] = {}
    for s in fam.samples:
        rest = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if s.name == fam.name + "_bucket":
            groups.setdefault(rest, []).append(s)
        elif s.name == fam.name + "_count":
            counts[rest] = s.value
    for key, buckets in groups.items():
        bounds = [_value(b.labels["le"], 0) for b in buckets]
        if bounds != sorted(bounds) or not bounds or bounds[-1] != math.inf:
            raise ExpositionError(f"histogram {fam.name}{dict(key)}: buckets unsorted or no +Inf")
        values = [b.value for b in buckets]
        if values != sorted(values):
            raise ExpositionError(f"histogram {fam.name}{dict(key)}: buckets not cumulative")
        if counts.get(key) != values[-1]:
            raise ExpositionError(f"histogram {fam.name}{dict(key)}: _count != +Inf bucket")


def samples(text: str, name: str) -> list[Sample]:
    """Every sample called exactly `name` (for a histogram: `x_bucket`, `x_sum`, `x_count`)."""
    return [s for fam in parse(text).values() for s in fam.samples if s.name == name]
