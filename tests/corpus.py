"""The compatibility corpus, found relative to the checkout (<checkout>/../shared/corpus): Istio's
own examples (`istio/…`) and the source article's (`seed/…`). A missing file fails the test with
the path it looked at, never skips it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


def corpus_path(*parts: str) -> Path:
    """`CORPUS/<parts…>`; fails the test when it is not there."""
    path = CORPUS.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"compatibility corpus missing: {path} (expected beside the checkout, in "
                    "../shared/corpus)")  # fmt: skip
    return path


def corpus_docs(*relative: str) -> list[dict[str, Any]]:
    """The YAML documents of the corpus files `relative` ("seed/01-canary.yaml", …), in order."""
    out: list[dict[str, Any]] = []
    for rel in relative:
        with corpus_path(*rel.split("/")).open() as f:
            out.extend(d for d in yaml.safe_load_all(f) if d)
    return out
