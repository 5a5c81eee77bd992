"""The HTTP/2 (h2c) and gRPC proxy: `conn.py` (h2 driven over a trio stream), `pool.py` (pooled
upstream connections), `messages.py` (pure heads and local answers), `proxy.py` (`H2Proxy`: route
and forward each stream through `nodeagent.http`'s attempt loop), `sniff.py` (h2 preface vs
HTTP/1.x vs anything else); the HTTP/1.1 ↔ HTTP/2 bridges: `selection.py` (the upstream codec is
the destination port's), `translate.py` (pure head translation), `h1client.py` (an HTTP/1.1
client served by `H2Proxy`), `h1upstream.py` (HTTP/1.1 upstreams), `streams.py` (both sides'
shapes) — docs/l7.md, "HTTP/2 and gRPC" and "Protocol selection".
"""
