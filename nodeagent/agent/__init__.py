"""The node agent: one trio program that owns enrollment, the proxy, store sync and the admin socket."""
