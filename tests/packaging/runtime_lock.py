"""The agent image's pinned Python packages: the closure of nodeagent's runtime dependencies at
the versions installed in this environment (the ones the tests run with). Run as a script it
prints daemonset/image/requirements.txt (`scripts/image --update-lock` writes it)."""

from __future__ import annotations

from importlib.metadata import distribution

from packaging.requirements import Requirement

HEADER = """\
# The agent's Python packages in the image, pinned (the closure of pyproject's runtime
# dependencies, at the versions the tests run with: tests/packaging checks it).
# Regenerate after changing dependencies: scripts/image --update-lock
"""


def _key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def runtime_closure(root: str = "nodeagent") -> dict[str, str]:
    """{distribution: installed version} of every runtime dependency of `root`, transitively."""
    seen: dict[str, str] = {}
    todo = [root]
    while todo:
        dist = distribution(todo.pop())
        key = _key(dist.metadata["Name"])
        if key in seen:
            continue
        seen[key] = dist.version
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    del seen[_key(root)]
    return seen


def render(closure: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(closure.items()))


def parse(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not a pin: {line!r}"
            pins[_key(name)] = version
    return pins


if __name__ == "__main__":
    print(render(runtime_closure()), end="")
