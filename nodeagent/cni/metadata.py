"""Where the agent learns a pod's labels, annotations and service account.

`PodMetadataSource` is the seam: today's implementation, `RuntimeArgsMetadataSource`, reads
what the sandbox's runtime passes in CNI_ARGS (`MESH_POD_META`); a Kubernetes API source (a
later issue) will implement the same protocol by looking the pod up by namespace/name/uid.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from nodeagent.cni.errors import EnrollError, ErrorCode
from nodeagent.cni.protocol import CniRequest

META_ARG = "MESH_POD_META"
DEFAULT_SERVICE_ACCOUNT = "default"
# A Kubernetes object's labels + annotations are limited to 256 KiB; allow the encoding's growth.
_MAX_META_ARG = 512 * 1024
# b64decode silently drops characters outside the alphabet; CNI_ARGS must not be guessed at.
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


@dataclass(frozen=True, slots=True)
class PodMetadata:
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    service_account: str = DEFAULT_SERVICE_ACCOUNT


class PodMetadataSource(Protocol):
    async def lookup(self, req: CniRequest) -> PodMetadata: ...


def _bad(why: str) -> EnrollError:
    return EnrollError(ErrorCode.INVALID_ENV, f"invalid CNI_ARGS {META_ARG}: {why}")


def _str_map(doc: Mapping[str, object], key: str) -> dict[str, str]:
    value = doc.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _bad(f"{key!r} must be a JSON object of strings to strings")
    return dict(value)


def parse_pod_meta(raw: str) -> PodMetadata:
    """Decode `base64url(JSON {"labels", "annotations", "serviceAccount"})`, padding optional."""
    if len(raw) > _MAX_META_ARG:
        raise _bad(f"{len(raw)} characters, more than {_MAX_META_ARG}")
    if not _BASE64URL.fullmatch(raw):
        raise _bad("not base64url: only A-Z a-z 0-9 - _ and trailing '=' are allowed")
    try:
        data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"not base64url: {exc}") from None
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"not JSON after base64url decoding: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(f"expected a JSON object, got {type(doc).__name__}")
    sa = doc.get("serviceAccount", DEFAULT_SERVICE_ACCOUNT)
    if sa is None:
        sa = DEFAULT_SERVICE_ACCOUNT
    # Service accounts are DNS-1123 subdomains; '/' would forge a different SPIFFE path.
    if not isinstance(sa, str) or not sa or len(sa) > 253 or "/" in sa:
        raise _bad(f"'serviceAccount' must be a non-empty name without '/', got {sa!r}")
    return PodMetadata(
        labels=_str_map(doc, "labels"),
        annotations=_str_map(doc, "annotations"),
        service_account=sa,
    )


class RuntimeArgsMetadataSource:
    """The sandbox's source: metadata travels with the CNI call in CNI_ARGS."""

    async def lookup(self, req: CniRequest) -> PodMetadata:
        raw = req.args.get(META_ARG)
        if raw is None or raw == "":
            return PodMetadata()
        return parse_pod_meta(raw)
