"""The shared proxy: every pod's captured connections land here.

`pod.PodProxy` serves one pod's listeners (15001 outbound in `outbound_path`, 15006 inbound
plaintext and 15008 mTLS tunnel in `inbound_path`, both composed over one `pod_core.PodCore`;
`connector.MeshConnector` opens the L7 proxy's upstreams); `outbound.outbound_decision` and
`inbound.*_decision` are the pure routing and admission decisions, `self_call` the refusal of
targets that are the agent's own listeners; `relay` copies bytes. See docs/dataplane.md.
"""
