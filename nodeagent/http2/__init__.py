"""The HTTP/2 (h2c) and gRPC proxy: `conn.py` (h2 driven over a trio stream), `pool.py` (pooled
upstream connections), `messages.py` (pure heads and local answers), `proxy.py` (`H2Proxy`: route
and forward each stream through `nodeagent.http`'s attempt loop), `sniff.py` (h2 preface vs
HTTP/1.x vs anything else) — docs/l7.md, "HTTP/2 and gRPC".
"""
