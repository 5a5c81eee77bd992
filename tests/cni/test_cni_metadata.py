"""Pod metadata from CNI_ARGS (the sandbox's source)."""

from __future__ import annotations

import base64
import json

import pytest

from nodeagent.cni.errors import EnrollError
from nodeagent.cni.metadata import PodMetadata, RuntimeArgsMetadataSource
from nodeagent.cni.protocol import CniRequest, Command, PodRef


def request(**args: str) -> CniRequest:
    return CniRequest(Command.ADD, "c1", "/ns", "eth0", PodRef("ns", "p", "u"), args=args)


def b64(doc: object, *, pad: bool = False) -> str:
    raw = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode()
    return raw if pad else raw.rstrip("=")


async def test_missing_arg_gives_defaults() -> None:
    meta = await RuntimeArgsMetadataSource().lookup(request())
    assert meta == PodMetadata(labels={}, annotations={}, service_account="default")


@pytest.mark.parametrize("pad", [True, False])
async def test_decodes_labels_annotations_sa(pad: bool) -> None:
    doc = {"labels": {"app": "web"}, "annotations": {"a/b": "c"}, "serviceAccount": "web-sa"}
    meta = await RuntimeArgsMetadataSource().lookup(request(MESH_POD_META=b64(doc, pad=pad)))
    assert meta.labels == {"app": "web"}
    assert meta.annotations == {"a/b": "c"}
    assert meta.service_account == "web-sa"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("!!!", "not base64url"),
        (base64.urlsafe_b64encode(b"{nope").decode(), "not JSON"),
        (b64([1]), "expected a JSON object"),
        (b64({"labels": {"a": 1}}), "'labels'"),
        (b64({"annotations": "x"}), "'annotations'"),
        (b64({"serviceAccount": "a/b"}), "serviceAccount"),
        (b64({"serviceAccount": ""}), "serviceAccount"),
    ],
)
async def test_malformed_is_code_4_naming_the_arg(value: str, match: str) -> None:
    with pytest.raises(EnrollError, match=match) as info:
        await RuntimeArgsMetadataSource().lookup(request(MESH_POD_META=value))
    assert info.value.code == 4
    assert "MESH_POD_META" in info.value.msg
