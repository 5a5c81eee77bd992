"""The shared proxy: every pod's captured connections land here.

`forward.PodProxy` serves one pod's listeners (15001 outbound, 15006 inbound plaintext, 15008
mTLS tunnel); `outbound.decide` and `inbound.*_decision` are the pure routing and admission
decisions; `relay` copies bytes. See docs/dataplane.md.
"""
