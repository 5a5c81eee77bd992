"""Hostile and careless input to the YAML loader, through `meshctl validate`/`apply` (exit code,
one error line naming the document and field, no traceback), and Kubernetes' reading of plain
scalars with ':' (go-yaml: a ':' not followed by a blank is part of the scalar)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from nodeagent.config.batch import Document, validate_document
from nodeagent.config.documents import MAX_DEPTH, MAX_DOCUMENT, load_text
from nodeagent.config.errors import LoadError
from nodeagent.meshctl.main import main

CORPUS = Path(__file__).resolve().parents[2] / ".." / "shared" / "corpus" / "istio"

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: ext
  namespace: default
spec:
  hosts: [example.com]
  ports:
  - number: {port}
    name: http
    protocol: HTTP
  resolution: DNS
"""


@pytest.fixture(autouse=True)
def _store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_STORE", f"sqlite:///{tmp_path}/mesh.db")
    monkeypatch.delenv("MESH_VIP_RANGE", raising=False)


def _run(command: str, path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([command, "-f", str(path)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def _one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_a_5000_digit_integer_names_document_and_field(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "se.yaml"
    f.write_text(SERVICE_ENTRY.format(port="9" * 5000))
    code, out, err = _run(command, f, capsys)
    assert code == 1
    assert out == ""
    line = _one_error(err)
    assert f"{f}:9:" in line
    assert "ServiceEntry default/ext: spec.ports[0].number: integer of 5000 digits" in line


@pytest.mark.parametrize("command", ["validate", "apply"])
@pytest.mark.parametrize(
    "nested",
    [
        "[" * 3000 + "]" * 3000,  # flow
        "\n    " + "- " * 3000 + "x",  # block sequences, compact notation
    ],
    ids=["flow", "block"],
)
def test_yaml_nested_thousands_deep_is_an_error(
    command: str, nested: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text(SERVICE_ENTRY.format(port=80) + "  x: " + nested + "\n")
    code, _, err = _run(command, f, capsys)
    assert code == 1
    line = _one_error(err)
    assert f"{f}:" in line
    assert f"nested deeper than {MAX_DEPTH} levels" in line


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_a_nul_byte_is_an_error_naming_line_and_column(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "nul.yaml"
    f.write_text(SERVICE_ENTRY.format(port=80).replace("name: ext", "name: e\0xt"))
    code, _, err = _run(command, f, capsys)
    assert code == 1
    line = _one_error(err)
    assert f"{f}:4:10: YAML error: character 0x0000 is not allowed" in line


@pytest.mark.parametrize("command", ["validate", "apply"])
def test_a_duplicate_key_is_rejected_naming_key_and_lines(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text(SERVICE_ENTRY.format(port=80).replace("  name: ext\n", "  name: ext\n  name: x\n"))
    code, out, err = _run(command, f, capsys)
    assert code == 1
    assert out == ""
    line = _one_error(err)
    assert f"{f}:5:3: ServiceEntry default/ext: metadata.name: " in line
    assert 'mapping key "name" already defined at line 4' in line


def test_a_duplicate_key_in_a_flow_mapping_too() -> None:
    expected = r'f:1:11: document 0: a\.b: mapping key "b" already defined at line 1'
    with pytest.raises(LoadError, match=expected):
        load_text("a: {b: 1, b: 2}\n", "f")


def test_a_directory_of_oversized_documents_is_refused_quickly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    route = "  - route:\n    - destination:\n        host: reviews\n"
    head = SERVICE_ENTRY.replace("ServiceEntry", "VirtualService").split("spec:")[0]
    body = head + "spec:\n  hosts: [reviews]\n  http:\n"
    body += route * ((4_000_000 - len(body)) // len(route))
    for i in range(13):
        (tmp_path / f"vs{i:02}.yaml").write_text(body)
    started = time.monotonic()
    code, _, err = _run("validate", tmp_path, capsys)
    elapsed = time.monotonic() - started
    assert code == 1
    line = _one_error(err)
    assert f"document 0 is {len(body)} bytes, over the {MAX_DOCUMENT} byte limit" in line
    assert elapsed < 10, f"took {elapsed:.1f}s"


def test_documents_under_the_limit_in_one_file_are_fine() -> None:
    doc = "a: " + "x" * (MAX_DOCUMENT - 100) + "\n"
    docs = load_text(doc + "---\n" + doc, "f")
    assert len(docs) == 2
    with pytest.raises(LoadError, match=r"^f:2: document 1 is \d+ bytes"):
        load_text(doc + "---\n" + doc + "x" * 200, "f")


# -- plain scalars with ':' as Kubernetes (go-yaml) reads them ----------------------------------


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("a: [1.2.3.4, 001:db8::]", {"a": ["1.2.3.4", "001:db8::"]}),
        ("a: [a:b]", {"a": ["a:b"]}),
        ("a: [a: b]", {"a": [{"a": "b"}]}),
        ("a: [a:]", {"a": ["a:"]}),
        ("a: [x:, y]", {"a": ["x:", "y"]}),
        ("a: {k:}", {"a": {"k:": None}}),
        ("a: {k: v:w}", {"a": {"k": "v:w"}}),
        ("a: {k:v}", {"a": {"k:v": None}}),
        ("a: [2001:db8::1, fe80::1%eth0]", {"a": ["2001:db8::1", "fe80::1%eth0"]}),
        ("a: b:c", {"a": "b:c"}),
        ('a: ["x":y]', {"a": [{"x": "y"}]}),
        # no YAML 1.1 base 60: go-yaml reads these as strings
        ("a: [1:20, 190:20:30.15]", {"a": ["1:20", "190:20:30.15"]}),
        ("a: 1_000", {"a": 1000}),
        ("a: 0x1F", {"a": 31}),
        ("a: 1.5", {"a": 1.5}),
    ],
)
def test_plain_scalars_read_as_kubernetes_reads_them(text: str, data: object) -> None:
    assert load_text(text + "\n", "f")[0].data == data


def test_istio_corpus_service_entry_full_keeps_its_ipv6_address() -> None:
    path = CORPUS / "validation" / "serviceentry-valid.yaml"
    if not path.exists():
        pytest.fail(f"compatibility corpus missing: {path}")
    docs = load_text(path.read_text(), str(path))
    full = next(d for d in docs if d.data["metadata"]["name"] == "full")
    assert full.data["spec"]["addresses"] == ["1.2.3.4", "001:db8::"]
    result = validate_document(full, "default")
    assert isinstance(result, Document), [str(e) for e in result]
    assert result.body["spec"]["addresses"] == ["1.2.3.4", "001:db8::"]


def test_a_long_flow_scalar_with_colons_loads_in_linear_time() -> None:
    """The quadratic part: the old loader rescanned every earlier chunk of a plain scalar at
    each ':' in flow context (20,000 chunks: 20 s; now 0.1 s)."""
    n = 20_000
    text = "a: [" + "w " * n + "x:y " * n + "]\n"
    started = time.process_time()
    docs = load_text(text, "f")
    elapsed = time.process_time() - started
    assert docs[0].data == {"a": [" ".join(["w"] * n + ["x:y"] * n)]}
    assert elapsed < 5, f"took {elapsed:.1f}s of CPU"
