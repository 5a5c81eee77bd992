"""`python -m nodeagent.demo`: run the demo (needs root)."""

import sys

from nodeagent.demo.runner import main

sys.exit(main(sys.argv[1:]))
