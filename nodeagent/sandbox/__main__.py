"""`python -m nodeagent.sandbox …` (what scripts/sandbox runs)."""

from __future__ import annotations

import sys

from nodeagent.sandbox.cli import main

if __name__ == "__main__":
    sys.exit(main())
