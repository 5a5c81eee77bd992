"""The bridge tests reuse the HTTP/1.1 tests' backend and client (tests/http)."""

from __future__ import annotations

import sys
from pathlib import Path

_HTTP_TESTS = str(Path(__file__).resolve().parents[1] / "http")
if _HTTP_TESTS not in sys.path:
    sys.path.insert(0, _HTTP_TESTS)
