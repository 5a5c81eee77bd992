"""The gateway tests reuse the HTTP tests' backends and snapshot helpers (tests/http), and the
HTTP/2 tests' backends (tests/http2)."""

from __future__ import annotations

import sys
from pathlib import Path

_HTTP_TESTS = str(Path(__file__).resolve().parents[1] / "http")
if _HTTP_TESTS not in sys.path:
    sys.path.insert(0, _HTTP_TESTS)

_HTTP2_TESTS = str(Path(__file__).resolve().parents[1] / "http2")
if _HTTP2_TESTS not in sys.path:
    sys.path.append(_HTTP2_TESTS)
