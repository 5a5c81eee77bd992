"""The runtime wheel (what daemonset/Containerfile installs) carries the agent only: no sandbox,
demo or bench module, and every module in it imports without them. The dev install (editable)
still has the tooling under the same names."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOOLING = ("nodeagent.bench", "nodeagent.demo", "nodeagent.sandbox")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime wheel, built from what the Containerfile copies (not from the working tree,
    whose build/ and egg-info leftovers would leak stale files into it)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", src)
    shutil.copy(ROOT / "README.md", src)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "nodeagent", src / "nodeagent", ignore=ignore)
    out = base / "out"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (whl,) = out.glob("nodeagent-*.whl")
    return whl


@pytest.fixture
def site(wheel: Path, tmp_path: Path) -> Path:
    """The wheel unpacked: what `pip install` puts in site-packages."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path / "site")
    return tmp_path / "site"


def _python_modules(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as z:
        return [n.removesuffix(".py").replace("/", ".") for n in z.namelist() if n.endswith(".py")]


def _closure(site: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    purelib = sysconfig.get_paths()["purelib"]
    return subprocess.run(
        [sys.executable, "-S", str(HERE / "import_closure.py"), str(site), purelib, *argv],
        capture_output=True, text=True, timeout=120, check=False, cwd=site,
    )  # fmt: skip


def test_the_runtime_wheel_has_the_agent_and_no_tooling(wheel: Path) -> None:
    modules = _python_modules(wheel)
    assert {"nodeagent.cli", "nodeagent.agent.main", "nodeagent.proxy.pod"} <= set(modules)
    with zipfile.ZipFile(wheel) as z:
        # Any file, not only modules: data files must not bring the tooling back either.
        tooling = [n for n in z.namelist() if n.replace("/", ".").startswith(TOOLING)]
    assert tooling == []


def test_the_runtime_wheel_carries_the_console_page(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    page = {
        f"nodeagent/console/static/{n}" for n in ("index.html", "app.js", "graph.js", "style.css")
    }
    assert page <= names
    # package data is the console's page only: no other data file came back
    data = {n for n in names if n.startswith("nodeagent/") and not n.endswith(".py")}
    assert data == page


def test_every_runtime_module_and_the_run_path_import_without_the_tooling(
    wheel: Path, site: Path
) -> None:
    done = _closure(site)
    assert done.returncode == 0, done.stderr
    assert "nodeagent run" in done.stdout  # the run path's --help was really reached
    count, *loaded = done.stdout.splitlines()[-1].split()
    assert int(count) == len(_python_modules(wheel)) - 1  # all but nodeagent/__init__
    assert loaded == []


def test_nodeagent_sandbox_without_the_tooling_is_a_clear_error(site: Path) -> None:
    done = _closure(site, "sandbox", "status")
    assert done.returncode == 2
    assert "development tooling" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_dev_install_has_the_tooling_from_any_directory(tmp_path: Path) -> None:
    code = f"import importlib; print(*(importlib.import_module(m).__file__ for m in {TOOLING}))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = [Path(f) for f in done.stdout.split()]
    assert len(files) == len(TOOLING)
    assert all(f.is_relative_to(ROOT / "nodeagent") for f in files)


def test_the_image_builds_its_wheel_from_what_this_test_builds_from() -> None:
    """The wheel above stands for the image's: the Containerfile's build stage copies the same
    files (besides the pins) and builds that one wheel; scripts/image copies the same ones."""
    build_stage = (ROOT / "daemonset" / "Containerfile").read_text().split("\nFROM ")[1]
    copied = [w for line in build_stage.splitlines() if line.startswith("COPY ") for w in
              line.split()[1:-1] if not w.startswith("daemonset/image/")]  # fmt: skip
    assert sorted(copied) == ["README.md", "nodeagent", "pyproject.toml"]
    assert "--no-deps --no-build-isolation --wheel-dir /wheels" in build_stage
    script = (ROOT / "scripts" / "image").read_text()
    assert 'cp "$here/pyproject.toml" "$here/README.md" "$work/src/"' in script
    assert "tar --exclude=__pycache__ -cf - nodeagent" in script
