"""A recording fake of the agent's CniHandler (pure logic; the real one is tested by the lead)."""

from __future__ import annotations

from typing import Any

import trio

from nodeagent.cni.protocol import CniRequest


class RecordingHandler:
    """Pure-logic fake of the agent's handler: records calls, fails on demand."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.errors: dict[str, BaseException] = {}
        self.enroll = True
        self.block: set[str] = set()

    async def _call(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if name in self.block:
            await trio.sleep_forever()
        if name in self.errors:
            raise self.errors[name]

    async def add(self, req: CniRequest) -> bool:
        await self._call("add", req)
        return self.enroll

    async def delete(self, req: CniRequest) -> None:
        await self._call("delete", req)

    async def check(self, req: CniRequest) -> None:
        await self._call("check", req)

    async def status(self) -> None:
        await self._call("status", None)

    async def gc(self, valid: list[dict[str, Any]]) -> None:
        await self._call("gc", valid)
