"""`scripts/demo`: the source article's story, told for real on a 2-node sandbox.

`steps` holds the story (each step says what it shows, runs the real thing and checks it),
`output` the pure formatting and counting helpers, `runner` the command line, the signal
handling and the teardown. `python -m nodeagent.demo [--name NAME]`.
"""

from nodeagent.demo.runner import main

__all__ = ["main"]
