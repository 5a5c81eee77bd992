"""Fixtures of the in-pod tests (defined in inpod_net.py, importable by that unique name)."""

from inpod_net import pair

__all__ = ["pair"]
