"""Run as `python -S import_closure.py SITE PURELIB [ARGV…]`: with only the unpacked runtime wheel
(SITE) and the third-party libraries (PURELIB) importable — `-S` keeps the editable finder that
points back at the checkout out — import every module of the wheel, then call `nodeagent ARGV…`
(default `run --help`). Prints the number of modules imported and the tooling modules that got
loaded (there must be none), then exits with the CLI's status."""

from __future__ import annotations

import importlib
import pkgutil
import sys

TOOLING = ("nodeagent.bench", "nodeagent.demo", "nodeagent.sandbox")


def main() -> int:
    site, purelib, *argv = sys.argv[1:]
    sys.path[:0] = [site, purelib]
    import nodeagent
    from nodeagent.cli import main as cli

    names = [m.name for m in pkgutil.walk_packages(nodeagent.__path__, "nodeagent.")]
    for name in names:
        importlib.import_module(name)
    try:
        status = cli(argv or ["run", "--help"])
    except SystemExit as e:  # argparse's --help
        status = int(e.code or 0)
    loaded = sorted(m for m in sys.modules if m.startswith(TOOLING))
    print(len(names), *loaded, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
