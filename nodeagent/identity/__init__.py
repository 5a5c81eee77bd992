"""Workload identities on a node: the contract the data plane uses (`api`) and the manager that
obtains, renews and serves SPIFFE certificates for it (`manager`). See docs/identity.md."""
