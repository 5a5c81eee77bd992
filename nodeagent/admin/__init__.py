"""The node-local admin socket: HTTP/1.1 over a unix socket (mode 0600)."""
