"""Compatibility with real Istio configuration (../shared/corpus): the seed examples and the
Bookinfo sample apply; Istio's own valid cases are accepted and its invalid cases rejected for
the same reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import corpus_path

from nodeagent.config.apply import apply_documents
from nodeagent.config.batch import validate_batch, validate_document
from nodeagent.config.documents import RawDocument, load_path
from nodeagent.store import open_store

SUPPORTED = {
    "VirtualService",
    "DestinationRule",
    "Gateway",
    "ServiceEntry",
    "AuthorizationPolicy",
    "PeerAuthentication",
}
# Istio's `_err` text → what our message must contain (case-insensitive) when it words it
# differently; otherwise Istio's text itself must appear in ours.
OUR_WORDS = {
    "spec.trafficPolicy.loadBalancer.warmup.minimumPercent: Invalid value": [
        "spec.trafficPolicy.loadBalancer.warmup.minimumPercent: Invalid value",
        "between 0 and 100",
    ],
    "spec.portLevelMtls in body should have at least 1 properties": [
        "spec.portLevelMtls",
        "at least 1",
    ],
    "type conversion error from": ["spec.portLevelMtls[acd]", "type conversion error from"],
}


def _docs(path: Path) -> list[RawDocument]:
    return load_path(str(path))


def _cases(pattern: str) -> list[tuple[str, RawDocument]]:
    out = []
    for file in sorted(corpus_path("istio", "validation").glob(pattern)):
        for raw in _docs(file):
            out.append((f"{file.name}#{raw.source.index}", raw))
    return out


def test_the_corpus_is_there() -> None:
    assert len(_cases("*-valid.yaml")) >= 10
    assert len(_cases("*-invalid.yaml")) >= 20


@pytest.mark.parametrize("seed", ["01-canary.yaml", "02-fault-delay.yaml", "03-ab-user-agent.yaml"])
async def test_seed_examples_apply(seed: str) -> None:
    docs, errors = validate_batch(_docs(corpus_path("seed", seed)))
    assert errors == []
    store = await open_store("memory://")
    try:
        result = await apply_documents(store, docs)
        assert [o.action for o in result.outcomes] == ["created"] * len(docs)
    finally:
        await store.aclose()


def _bookinfo() -> list[Path]:
    return sorted(corpus_path("istio", "bookinfo-networking").glob("*.yaml"))


@pytest.mark.parametrize("name", [p.name for p in _bookinfo()])
async def test_every_bookinfo_document_applies(name: str) -> None:
    # As in the Bookinfo tutorial: the subsets (destination-rule-all) first, then the file.
    # Routes are checked against those subsets (the store holds them).
    base, errors = validate_batch(
        _docs(corpus_path("istio", "bookinfo-networking", "destination-rule-all.yaml"))
    )
    assert errors == []
    docs, errors = validate_batch(_docs(corpus_path("istio", "bookinfo-networking", name)))
    assert errors == [], [str(e) for e in errors]
    store = await open_store("memory://")
    try:
        await apply_documents(store, base)
        result = await apply_documents(store, docs)
        assert len(result.outcomes) == len(docs)
    finally:
        await store.aclose()


@pytest.mark.parametrize(
    ("case", "raw"), _cases("*-valid.yaml"), ids=lambda v: v if isinstance(v, str) else ""
)
def test_istio_valid_cases_are_accepted(case: str, raw: RawDocument) -> None:
    result = validate_document(raw, "default")
    if raw.data["kind"] in SUPPORTED:
        assert not isinstance(result, list), [str(e) for e in result]
    else:
        assert raw.data["kind"] == "WorkloadEntry"
        assert isinstance(result, list)
        assert "kind WorkloadEntry is not supported" in str(result[0])


@pytest.mark.parametrize(
    ("case", "raw"), _cases("*-invalid.yaml"), ids=lambda v: v if isinstance(v, str) else ""
)
def test_istio_invalid_cases_are_rejected_for_the_same_reason(case: str, raw: RawDocument) -> None:
    data = dict(raw.data)
    istio_error = data.pop("_err")
    result = validate_document(RawDocument(raw.source, data), "default")
    assert isinstance(result, list), f"{case} was accepted; Istio says: {istio_error}"
    text = "\n".join(str(e) for e in result).lower()
    if data["kind"] == "WorkloadEntry":
        assert "kind workloadentry is not supported" in text
        return
    for words in OUR_WORDS.get(istio_error, [istio_error]):
        assert words.lower() in text, f"{case}: Istio says {istio_error!r}, we say {text!r}"
    # every message names the file, the document and a field path
    for error in result:
        assert str(error).startswith(
            f"{raw.source.file}:{raw.source.line}: {data['kind']} default/"
        )
