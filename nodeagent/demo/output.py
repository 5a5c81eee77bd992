"""What the demo prints, and the pure counting behind it: headings, evidence lines, split bars,
tables, the binomial interval a split is judged by, and `istio_requests_total` summed by
destination version. No I/O except writing to stdout."""

from __future__ import annotations

import math
import re
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence

from nodeagent.telemetry.exposition import ExpositionError, samples

_VERSION = re.compile(r"version=(\S+)")
BAR_WIDTH = 40


def _bold(text: str) -> str:
    return f"\033[1m{text}\033[0m" if sys.stdout.isatty() else text


def heading(number: int, total: int, title: str) -> None:
    print(f"\n{_bold(f'== {number}/{total} {title}')}", flush=True)


def explain(text: str) -> None:
    print(textwrap.fill(text, width=98, initial_indent="", subsequent_indent=""), flush=True)


def evidence(*lines: str) -> None:
    for line in lines:
        for part in line.splitlines() or [""]:
            print(f"  {part}", flush=True)


def progress(text: str) -> None:
    print(f"  … {text}", flush=True)


def command(argv: Sequence[str]) -> None:
    print("  $ " + " ".join(argv), flush=True)


def version_of(body: str) -> str | None:
    """The version a backend names in its answer (`version=v1.0.0 path=/ …`)."""
    m = _VERSION.search(body)
    return m.group(1) if m else None


def bar(count: int, total: int, width: int = BAR_WIDTH) -> str:
    """A bar of `width` cells, filled in proportion to count/total (at least one cell when >0)."""
    if total <= 0 or count <= 0:
        return "·" * width
    filled = max(1, min(width, round(width * count / total)))
    return "█" * filled + "·" * (width - filled)


def split_lines(counts: Mapping[str, int], order: Sequence[str]) -> list[str]:
    """One line per version: count, percentage and bar; versions in `order` first, others after."""
    total = sum(counts.values())
    names = [*order, *sorted(k for k in counts if k not in order)]
    out = []
    for name in names:
        n = counts.get(name, 0)
        pct = 100 * n / total if total else 0.0
        out.append(f"{name:<10}{n:>6}  {pct:5.1f}%  {bar(n, total)}")
    return out


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A plain left-aligned text table (numbers right-aligned)."""
    body = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    numeric = [bool(body) and all(_is_number(row[i]) for row in body) for i in range(len(headers))]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    return [fmt(list(headers)), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def binomial_interval(n: int, p: float, z: float = 3.29) -> tuple[float, float]:
    """The normal approximation of the binomial count's two-sided interval (z=3.29: 99.9%)."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


def requests_by_version(
    scrapes: Mapping[str, str],
) -> tuple[dict[tuple[str, str, str], float], list[str]]:
    """`istio_requests_total` summed by (destination_version, reporter, response_code) over
    every node's scrape, and the problems met (an unparsable scrape names its node)."""
    sums: dict[tuple[str, str, str], float] = {}
    problems: list[str] = []
    for node, text in scrapes.items():
        try:
            found = samples(text, "istio_requests_total")
        except ExpositionError as e:
            problems.append(f"{node}: the scrape does not parse: {e}")
            continue
        for s in found:
            key = (
                s.labels.get("destination_version", "unknown"),
                s.labels.get("reporter", "unknown"),
                s.labels.get("response_code", "unknown"),
            )
            sums[key] = sums.get(key, 0.0) + s.value
    return sums, problems


def metric_names(text: str) -> list[str]:
    """The distinct sample names of a scrape (what is there when the expected one is not)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return sorted(names)


def mtls_peers(scrapes: Mapping[str, str]) -> list[tuple[str, str, str, str, str, int]]:
    """(node, reporter, source_principal, destination_principal, connection_security_policy,
    connections) from `istio_tcp_connections_opened_total`, for connections whose two ends
    are known; unparsable scrapes are left out (the metrics step reports them)."""
    rows: dict[tuple[str, str, str, str, str], float] = {}
    for node, text in scrapes.items():
        try:
            found = samples(text, "istio_tcp_connections_opened_total")
        except ExpositionError:
            continue
        for s in found:
            src = s.labels.get("source_principal", "unknown")
            dst = s.labels.get("destination_principal", "unknown")
            if "unknown" in (src, dst):
                continue
            key = (
                node,
                s.labels.get("reporter", "unknown"),
                src.removeprefix("spiffe://"),
                dst.removeprefix("spiffe://"),
                s.labels.get("connection_security_policy", "unknown"),
            )
            rows[key] = rows.get(key, 0.0) + s.value
    return [(*k, int(v)) for k, v in sorted(rows.items())]
