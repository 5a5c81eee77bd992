"""The node agent: one trio program owning enrollment, proxy, store sync and admin socket."""
