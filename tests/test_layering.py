"""The package layering of `nodeagent`: no package imports one above it, and none imports a peer.

Every import of every module counts (top level, inside functions, under `TYPE_CHECKING`): a
type-only back-edge is still a package that cannot be understood without the one above it. The
edges that would break the layering must be listed in `ALLOWED`, each with the reason (there are
none today), and the test fails if one of them disappears, so the list cannot rot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "nodeagent"

# Low to high. A package may import only packages of strictly lower layers. The top-level modules
# (`nodeagent/contract.py`, `nodeagent/log.py`, `nodeagent/cli.py`) are units of their own.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"contract"}),  # the outside contract's constants: imports nothing
    frozenset({"log"}),
    frozenset({"httpclient", "httpserver", "inpod"}),
    frozenset({"store"}),
    frozenset({"config", "cni"}),
    frozenset({"snapshot"}),  # compiles VirtualServices with config's regex and duration rules
    frozenset({"authn"}),  # verifies JWTs against snapshot's rules; authz reads its RequestAuth
    frozenset({"ca", "routing", "balance", "authz", "telemetry"}),
    frozenset({"identity", "dns", "kube", "rollout"}),  # rollout reads telemetry's exposition
    frozenset({"tunnel", "admin"}),
    frozenset({"sockio"}),  # socket I/O without scheduler round trips, over tunnel's TLS
    frozenset({"http", "sandbox"}),
    frozenset({"http2"}),  # the HTTP/2 + gRPC proxy, over http's attempt loop and records
    frozenset({"proxy"}),
    frozenset({"gateway", "workers"}),  # workers run proxy's PodProxy in other processes
    frozenset({"agent", "meshctl", "bench", "demo"}),
    frozenset({"console"}),  # asks meshctl's explain for the routes it shows
    frozenset({"cli"}),
)

ALLOWED: dict[tuple[str, str], str] = {}


def unit_of(path: Path) -> str:
    """The package (first directory under nodeagent/) or top-level module a file belongs to."""
    parts = path.relative_to(PACKAGE_ROOT).with_suffix("").parts
    return parts[0]


def imported_units(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "nodeagent":
                names = [f"nodeagent.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "nodeagent" and len(parts) > 1:
                yield parts[1]


def package_edges() -> dict[tuple[str, str], set[str]]:
    """(importer, imported) → the files holding such an import."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path.name == "__init__.py" and path.parent == PACKAGE_ROOT:
            continue
        source = unit_of(path)
        for target in imported_units(ast.parse(path.read_text(), str(path))):
            if target != source:
                edges.setdefault((source, target), set()).add(str(path.relative_to(PACKAGE_ROOT)))
    return edges


def layer_of() -> dict[str, int]:
    index: dict[str, int] = {}
    for level, units in enumerate(LAYERS):
        for unit in units:
            assert unit not in index, f"{unit} is listed in two layers"
            index[unit] = level
    return index


def test_every_package_has_a_layer() -> None:
    units = {unit_of(p) for p in PACKAGE_ROOT.rglob("*.py") if p != PACKAGE_ROOT / "__init__.py"}
    missing = sorted(units - set(layer_of()))
    assert not missing, f"packages without a layer in LAYERS: {missing}"
    stale = sorted(set(layer_of()) - units)
    assert not stale, f"LAYERS names packages that do not exist: {stale}"


def test_no_package_imports_its_own_layer_or_above() -> None:
    level = layer_of()
    bad = [
        f"{source} (layer {level[source]}) imports {target} (layer {level[target]}) in "
        + ", ".join(sorted(files))
        for (source, target), files in sorted(package_edges().items())
        if level[target] >= level[source] and (source, target) not in ALLOWED
    ]
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_allowed_exceptions_still_exist() -> None:
    edges = package_edges()
    gone = [edge for edge in sorted(ALLOWED) if edge not in edges]
    assert not gone, f"{gone} no longer occur: remove them from ALLOWED"


def test_no_package_cycle_outside_the_allowed_edges() -> None:
    graph: dict[str, set[str]] = {}
    for source, target in package_edges():
        if (source, target) not in ALLOWED:
            graph.setdefault(source, set()).add(target)
    visiting: list[str] = []
    done: set[str] = set()

    def visit(unit: str) -> None:
        if unit in done:
            return
        assert unit not in visiting, "package cycle: " + " → ".join([*visiting, unit])
        visiting.append(unit)
        for target in sorted(graph.get(unit, ())):
            visit(target)
        visiting.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)
