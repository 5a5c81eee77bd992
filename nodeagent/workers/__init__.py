"""The agent's data plane on every core: `nodeagent run --workers N`.

One control process (enrollment, the store sync, identity, the admin socket, 15020, DNS, the
gateway) and N worker processes that serve every enrolled pod's 15001/15006/15008 listeners.
Each worker gets its own SO_REUSEPORT set of listeners per pod (bound by the control inside the
pod's netns and passed with SCM_RIGHTS), so the kernel spreads new connections over them. The
control reads the store watch once and streams the snapshot's document changes and the identity
material to every worker over one socketpair per worker (`protocol.py`: length-prefixed msgpack,
sans-IO). Metrics are pulled from the workers and summed, a dead worker's last counters kept
(`metrics.py`). `supervisor.py` spawns and respawns the workers, `worker.py` is a worker's main,
`remote_pod.py` is what the enroller serves a pod with in this mode. docs/dataplane.md,
"Processes".
"""
