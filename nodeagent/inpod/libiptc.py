"""python-iptables (`iptc`), imported without its run-time library search.

On import, python-iptables looks for libxtables, libip4tc, libip6tc, its own C helper
(`libxtwrapper`) and the xtables extension directory by running `ldconfig -p` once per name it
tries, `ldconfig -N -v` once, and, for names ldconfig does not know (its helper, which lives in
site-packages), gcc and ld: 19 processes and ~40 ms of every agent start on a Debian machine
with gcc (and of every restart's outage: nothing serves the pods until the new agent has loaded
it). It reads three
documented environment variables first, and with them it loads each library by path:

- `PYTHON_IPTABLES_XTABLES_VERSION`: libxtables' soname version (12 on Debian bookworm);
- `XTABLES_LIBDIR`: the extension directory (libxtables reads it too, with the same meaning);
- `IPTABLES_LIBDIR`: directories searched before the loader's names (here libxtables' own and
  the helper's).

`locate` finds them with a few `stat`s; `configure` sets the ones not already set (an operator's
values win) before `iptc` is imported. When a piece is not found, nothing is set and python-iptables
searches as before. What is still searched: libc (by each of its three modules), libip4tc and
libip6tc (their sonames carry a version the names python-iptables tries do not): five
`ldconfig -p`, ~15 ms.

Import `iptc` from here (`from nodeagent.inpod.libiptc import iptc`), never directly.
"""

from __future__ import annotations

import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

_SONAME = re.compile(r"libxtables\.so\.(\d+)$")


def library_dirs() -> list[Path]:
    """The dynamic loader's default directories, multiarch first (Debian), then the classic."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []
    return [Path(d) for d in (*dirs, "/usr/lib64", "/lib64", "/usr/lib", "/lib")]


def locate(lib_dirs: Iterable[Path], module_dirs: Iterable[str], ext_suffix: str) -> dict[str, str]:
    """python-iptables' three variables, or {} when libxtables, its extension directory or the
    helper `libxtwrapper<ext_suffix>` (in one of `module_dirs`, i.e. sys.path) is missing."""
    for d in lib_dirs:
        try:
            versions = [int(m.group(1)) for p in d.iterdir() if (m := _SONAME.match(p.name))]
        except OSError:  # absent, or not a directory
            continue
        if versions and (d / "xtables").is_dir():
            break
    else:
        return {}
    wrapper = f"libxtwrapper{ext_suffix}"
    helper = next((m for m in module_dirs if m and (Path(m) / wrapper).is_file()), None)
    if helper is None:
        return {}
    return {
        "PYTHON_IPTABLES_XTABLES_VERSION": str(max(versions)),
        "XTABLES_LIBDIR": str(d / "xtables"),
        "IPTABLES_LIBDIR": f"{d}:{helper}",
    }


def configure(environ: MutableMapping[str, str], found: Mapping[str, str]) -> None:
    """Sets what `locate` found, unless the environment already chose (all three or none)."""
    if not any(k in environ for k in found):
        environ.update(found)


configure(os.environ, locate(library_dirs(), sys.path, sysconfig.get_config_var("EXT_SUFFIX")))

import iptc  # noqa: E402  (after configure: python-iptables searches at import)

__all__ = ["iptc"]
