"""Hostile input never crashes the loader or the validators: it is a clear error or accepted."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.config.batch import Document, validate_document
from nodeagent.config.documents import RawDocument, load_text
from nodeagent.config.errors import ConfigError, LoadError, Source
from nodeagent.config.kinds import KINDS

_KEYS = st.sampled_from(
    [
        "hosts",
        "http",
        "tcp",
        "route",
        "destination",
        "host",
        "subset",
        "weight",
        "match",
        "uri",
        "prefix",
        "regex",
        "headers",
        "timeout",
        "fault",
        "delay",
        "fixedDelay",
        "trafficPolicy",
        "loadBalancer",
        "simple",
        "consistentHash",
        "subsets",
        "name",
        "labels",
        "servers",
        "port",
        "number",
        "protocol",
        "tls",
        "mode",
        "rules",
        "from",
        "source",
        "to",
        "operation",
        "when",
        "key",
        "values",
        "selector",
        "matchLabels",
        "portLevelMtls",
        "mtls",
        "ports",
        "endpoints",
        "addresses",
        "resolution",
        "clusterIP",
        "node",
        "targetPort",
        "workloadSelector",
        "80",
        "x",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(["*", "1s", "v1", "10.0.0.1", "ISTIO_MUTUAL", "None"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    spec=st.dictionaries(_KEYS, _VALUES, max_size=5),
    meta=st.dictionaries(st.sampled_from(["name", "namespace", "uid", "labels"]), _VALUES),
)
def test_validators_never_raise(kind: str, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    api = KINDS[kind].api_versions[0]
    raw = RawDocument(
        Source("f", 0, 1), {"apiVersion": api, "kind": kind, "metadata": meta, "spec": spec}
    )
    result = validate_document(raw, "default")
    if isinstance(result, list):
        assert result
        assert all(isinstance(e, ConfigError) and str(e).startswith("f:1: ") for e in result)
    else:
        assert isinstance(result, Document)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab:-[]{}&*!|>'\"#\n ,?%@`0", max_size=60))
def test_loader_raises_only_load_errors(text: str) -> None:
    problem = ""
    try:
        load_text(text, "f.yaml")
    except LoadError as exc:
        problem = str(exc)
    assert problem == "" or problem.startswith("f.yaml")
