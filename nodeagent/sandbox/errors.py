"""Errors of the sandbox: each names what failed, where, and why."""

from __future__ import annotations

from typing import Any


class SandboxError(Exception):
    """A sandbox operation failed; the message is meant for the operator, without a traceback."""


class CniError(SandboxError):
    """A CNI plugin of the chain failed. `msg` is the plugin's own error message, verbatim."""

    def __init__(
        self,
        plugin: str,
        command: str,
        msg: str,
        code: int | None = None,
        details: str = "",
        raw: Any = None,
    ) -> None:
        text = f"CNI {command} failed in plugin {plugin!r}"
        if code is not None:
            text += f" (code {code})"
        text += f": {msg}"
        if details:
            text += f"; {details}"
        super().__init__(text)
        self.plugin = plugin
        self.command = command
        self.msg = msg
        self.code = code
        self.details = details
        self.raw = raw
