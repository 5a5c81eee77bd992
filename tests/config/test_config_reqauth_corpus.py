"""RequestAuthentication against Istio's own cases (../shared/corpus/istio/validation-reqauth):
the valid ones are accepted, the invalid ones rejected for the reason Istio gives (`_err`)."""

from __future__ import annotations

import re

import pytest
from corpus import corpus_path

from nodeagent.config.batch import validate_document
from nodeagent.config.documents import RawDocument, load_path

# Istio words CRD schema failures as "<path> in body <what>"; ours say the same thing in the
# words the other kinds use. The path must appear in ours, and our wording of <what>.
_SCHEMA = re.compile(r"(?P<path>\S+) in body (?P<what>.+)")
OUR_WORDING = {
    "should be at least 1 chars long": "must not be empty",
    "must be of type object": "must not be null",
    "should match": "should match",
}


def _cases(pattern: str) -> list[tuple[str, RawDocument]]:
    out = []
    for file in sorted(corpus_path("istio", "validation-reqauth").glob(pattern)):
        for raw in load_path(str(file)):
            out.append((f"{file.name}#{raw.source.index}", raw))
    return out


def _expected_words(istio_error: str) -> list[str]:
    m = _SCHEMA.fullmatch(istio_error)
    if m is None:
        return [istio_error]
    return [m["path"], OUR_WORDING[m["what"]]]


def test_the_corpus_is_there() -> None:
    assert len(_cases("reqauth-valid.yaml")) >= 1
    assert len(_cases("reqauth-invalid.yaml")) >= 15


@pytest.mark.parametrize(
    ("case", "raw"), _cases("reqauth-valid.yaml"), ids=lambda v: v if isinstance(v, str) else ""
)
def test_istio_valid_request_authentications_are_accepted(case: str, raw: RawDocument) -> None:
    result = validate_document(raw, "default")
    assert not isinstance(result, list), [str(e) for e in result]
    assert result.kind == "RequestAuthentication"


@pytest.mark.parametrize(
    ("case", "raw"), _cases("reqauth-invalid.yaml"), ids=lambda v: v if isinstance(v, str) else ""
)
def test_istio_invalid_request_authentications_are_rejected_for_the_same_reason(
    case: str, raw: RawDocument
) -> None:
    data = dict(raw.data)
    istio_error = data.pop("_err")
    result = validate_document(RawDocument(raw.source, data), "default")
    assert isinstance(result, list), f"{case} was accepted; Istio says: {istio_error}"
    text = "\n".join(str(e) for e in result).lower()
    for words in _expected_words(istio_error):
        assert words.lower() in text, f"{case}: Istio says {istio_error!r}, we say {text!r}"
    for error in result:
        assert str(error).startswith(
            f"{raw.source.file}:{raw.source.line}: RequestAuthentication default/"
        )
