"""Kubernetes as a source: kube-sync (list+watch into the store, leader-elected).

`client` speaks the API server's HTTP/JSON (h11 over trio), `reflector` runs list+watch for one
resource type, `mirror` validates and writes objects to the store, `leader` holds a Lease, and
`cli` is `nodeagent kube-sync`. See docs/kubernetes.md.
"""
