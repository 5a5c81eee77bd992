"""Errors of the in-pod package: each names what was attempted, where (which netns), and why."""

from __future__ import annotations


class InpodError(Exception):
    """Base of every error raised by nodeagent.inpod; `errno` is set when the kernel gave one."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class NetnsError(InpodError):
    """Opening, entering or creating a socket in a network namespace failed."""


class AnnotationError(InpodError, ValueError):
    """A pod annotation that drives redirection is malformed or unsupported."""

    def __init__(self, annotation: str, value: str, why: str) -> None:
        super().__init__(f"annotation {annotation}={value!r}: {why}")
        self.annotation = annotation
        self.value = value


class RedirectionError(InpodError):
    """Applying, reading or removing the iptables rules or the netlink routing failed."""


class ListenerError(InpodError):
    """Binding a capture listener inside a pod netns failed."""
