"""python-iptables loaded by path (nodeagent.inpod.libiptc): the pure search on fake trees, and
the real import in a fresh interpreter, watched through Python's audit hook."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nodeagent.inpod.libiptc import configure, locate

EXT = ".cpython-311-x86_64-linux-gnu.so"


def tree(root: Path, *files: str) -> Path:
    for f in files:
        p = root / f
        p.parent.mkdir(parents=True, exist_ok=True)
        if f.endswith("/"):
            p.mkdir(exist_ok=True)
        else:
            p.touch()
    return root


def test_locate_finds_the_newest_libxtables_with_its_extensions_and_the_helper(
    tmp_path: Path,
) -> None:
    lib = tree(tmp_path / "lib", "libxtables.so.10", "libxtables.so.12", "libxtables.so.12.7.0",
               "libxtables.so", "xtables/")  # fmt: skip
    site = tree(tmp_path / "site", f"libxtwrapper{EXT}")
    found = locate([tmp_path / "absent", tmp_path / "site", lib], ["", str(site)], EXT)
    assert found == {
        "PYTHON_IPTABLES_XTABLES_VERSION": "12",
        "XTABLES_LIBDIR": f"{lib}/xtables",
        "IPTABLES_LIBDIR": f"{lib}:{site}",
    }


def test_locate_gives_nothing_when_a_piece_is_missing(tmp_path: Path) -> None:
    no_ext = tree(tmp_path / "a", "libxtables.so.12")  # no xtables/ directory
    lib = tree(tmp_path / "b", "libxtables.so.12", "xtables/")
    site = tree(tmp_path / "site", f"libxtwrapper{EXT}")
    assert locate([no_ext], [str(site)], EXT) == {}
    assert locate([lib], [str(tmp_path)], EXT) == {}  # no helper on the path
    assert locate([lib], [str(site)], ".other.so") == {}  # another interpreter's helper
    assert locate([lib], [str(site)], EXT)["IPTABLES_LIBDIR"] == f"{lib}:{site}"


def test_configure_leaves_an_operators_choice_alone() -> None:
    found = {
        "XTABLES_LIBDIR": "/x",
        "IPTABLES_LIBDIR": "/l",
        "PYTHON_IPTABLES_XTABLES_VERSION": "9",
    }
    env = {"XTABLES_LIBDIR": "/mine"}
    configure(env, found)
    assert env == {"XTABLES_LIBDIR": "/mine"}
    env = {"PATH": "/bin"}
    configure(env, found)
    assert env == {"PATH": "/bin", **found}


WATCH = """
import json, sys
spawned = []
sys.addaudithook(lambda event, args: event == "subprocess.Popen" and spawned.append(
    [str(a) for a in args[1]]))
import os
import nodeagent.inpod.iptables as m
print(json.dumps({"spawned": spawned, "version": m.iptc.xtables.xtables_version,
                  "env": {k: os.environ.get(k) for k in ("XTABLES_LIBDIR", "IPTABLES_LIBDIR",
                          "PYTHON_IPTABLES_XTABLES_VERSION")}}))
"""


def test_the_agent_loads_python_iptables_without_gcc_ld_or_a_library_scan() -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    r = subprocess.run([sys.executable, "-c", WATCH], capture_output=True, text=True, env=env,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["env"]["PYTHON_IPTABLES_XTABLES_VERSION"] == str(out["version"])
    assert Path(out["env"]["XTABLES_LIBDIR"], "libxt_comment.so").is_file()
    # What python-iptables still searches for: libc (once in each of its three modules), libip4tc
    # and libip6tc, `ldconfig -p` each. Without the variables it also ran `ldconfig -p` for each
    # name it tried, `ldconfig -N -v`, and gcc and ld for its own helper (19 processes here).
    names = [Path(argv[0]).name for argv in out["spawned"]]
    assert names == ["ldconfig"] * len(names), out["spawned"]
    assert len(names) <= 5, out["spawned"]
    assert ["-N", "-v"] not in [argv[1:] for argv in out["spawned"]]
