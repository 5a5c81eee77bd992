"""Where the controller reads metrics: every agent's 15020 endpoint, or a Prometheus.

Agents announce their metrics address in the store (`/mesh/v1/nodes/<node>`, under the node's
lease, see `nodeagent.store.keys.node`); `AgentScraper` reads that list and GETs every agent's
`/stats/prometheus` concurrently. `PrometheusSource` asks a Prometheus for the same counter
series (an instant query), so the analysis is the same arithmetic over the same series either
way. A source that cannot be read is a `SourceError` naming it: a partial reading would
under-count, so the caller treats the whole reading as missing.
"""

from __future__ import annotations

import json
import math
import ssl
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import quote, urlsplit

import trio

from nodeagent.contract import METRICS_PATH
from nodeagent.httpclient import HttpClientError, HttpConnection
from nodeagent.rollout.metrics import WANTED
from nodeagent.store import keys
from nodeagent.store.base import KeyValue, Store
from nodeagent.store.codec import DecodeError, decode
from nodeagent.telemetry.exposition import ExpositionError, Family, Sample, parse

SCRAPE_TIMEOUT = 3.0
MAX_SCRAPE = 16 * 1024 * 1024

Reading = list[tuple[str, list[Sample]]]  # (instance, samples)


class SourceError(Exception):
    pass


async def http_get(url: str, *, within: float, limit: int = MAX_SCRAPE) -> tuple[int, bytes]:
    return await http_call("GET", url, within=within, limit=limit)


async def http_call(
    method: str, url: str, *, within: float, body: bytes = b"", limit: int = MAX_SCRAPE
) -> tuple[int, bytes]:
    """One request on its own connection; (status, body). Raises SourceError naming the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SourceError(f"{url}: not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = [("Content-Type", "application/json")] if body else []
    context = ssl.create_default_context() if parts.scheme == "https" else None
    with trio.move_on_after(within) as scope:
        try:
            conn = await HttpConnection.open(
                parts.hostname, port, host_header=parts.netloc, ssl_context=context, peer=url
            )
            try:
                await conn.send(method, target, headers, body)
                status = await conn.read_head()
                data = await conn.read_body(limit)
            finally:
                await conn.aclose()
        except HttpClientError as exc:
            raise SourceError(f"{method} {url}: {exc}") from None
        return status, data
    assert scope.cancelled_caught
    raise SourceError(f"{method} {url}: no answer within {within:g}s")


async def agent_addresses(store: Store) -> dict[str, str]:
    """node → "ip:port" of its metrics endpoint, as the agents announced them."""
    kvs, _ = await store.range(keys.NODES)
    return addresses_of(kvs)


def addresses_of(kvs: Iterable[KeyValue]) -> dict[str, str]:
    """node → "ip:port" of its metrics endpoint, from the agents' node records among `kvs`
    (the one reader of the record's `metrics` field: the controller and the console)."""
    out = {}
    for kv in kvs:
        if not kv.key.startswith(keys.NODES):
            continue
        try:
            record = decode(kv)
        except DecodeError:
            continue
        metrics = record.get("metrics") if isinstance(record, dict) else None
        if isinstance(metrics, str) and ":" in metrics:
            out[kv.key.removeprefix(keys.NODES)] = metrics
    return out


class AgentScraper:
    """Reads every announced agent's /stats/prometheus."""

    def __init__(self, store: Store, *, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.store = store
        self.timeout = timeout

    async def read(self) -> Reading:
        addresses = await agent_addresses(self.store)
        if not addresses:
            raise SourceError("no agent has announced a metrics address in the store")
        results: dict[str, list[Sample]] = {}
        problems: list[str] = []

        async def one(node: str, address: str) -> None:
            url = f"http://{address}{METRICS_PATH}"
            try:
                status, body = await http_get(url, within=self.timeout)
                if status != 200:
                    raise SourceError(f"GET {url}: HTTP {status}")
                families = parse(body.decode("utf-8", errors="replace"))
            except (SourceError, ExpositionError) as exc:
                problems.append(f"agent {node}: {exc}")
                return
            results[node] = [s for name in WANTED_FAMILIES for s in _family(families, name)]

        async with trio.open_nursery() as nursery:
            for node, address in sorted(addresses.items()):
                nursery.start_soon(one, node, address)
        if problems:
            raise SourceError("; ".join(sorted(problems)))
        return sorted(results.items())


WANTED_FAMILIES = ("istio_requests_total", "istio_request_duration_milliseconds")


def _family(families: Mapping[str, Family], name: str) -> Sequence[Sample]:
    fam = families.get(name)
    return fam.samples if fam is not None else ()


PROMETHEUS_QUERY = '{__name__=~"' + "|".join(WANTED) + '",reporter="source"}'


def prometheus_samples(body: bytes) -> Reading:
    """The instant-query answer of `PROMETHEUS_QUERY` as samples, grouped by instance."""
    try:
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise SourceError(f"query failed: {doc.get('error', 'no reason given')}")
        result = doc["data"]["result"]
        grouped: dict[str, list[Sample]] = {}
        for series in result:
            labels = {str(k): str(v) for k, v in series["metric"].items()}
            name = labels.pop("__name__")
            instance = labels.pop("instance", "") + "/" + labels.pop("job", "")
            value = float(series["value"][1])
            if math.isnan(value):
                continue
            grouped.setdefault(instance, []).append(Sample(name, labels, value))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise SourceError(f"unexpected query answer: {exc!r}") from None
    return sorted(grouped.items())


class PrometheusSource:
    def __init__(self, url: str, *, timeout: float = SCRAPE_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    async def read(self) -> Reading:
        url = f"{self.url}/api/v1/query?query={quote(PROMETHEUS_QUERY, safe='')}"
        status, body = await http_get(url, within=self.timeout)
        if status != 200:
            raise SourceError(f"GET {url}: HTTP {status}")
        return prometheus_samples(body)


Source = AgentScraper | PrometheusSource
