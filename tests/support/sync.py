"""Helpers for the sync tests: a SyncService on a real Redis, fresh thread ids, events.

The servers are shared by the whole session (standalone and a 3-node cluster), so
every test works on its own random thread ids.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from edgebundle.sync.client import connect
from edgebundle.sync.service import RunEvent, RunLease, RunTicket, SyncService


def new_thread_id() -> str:
    return f"test-{uuid.uuid4().hex[:16]}"


@asynccontextmanager
async def sync_service(url: str, **options: Any) -> AsyncIterator[SyncService]:
    """A SyncService on its own connection to ``url``, closed afterwards."""
    redis = await connect(url)
    try:
        yield SyncService(redis, **options)
    finally:
        await redis.aclose()


def put(mid: int, message_id: str, content: str, role: str = "user",
        **fields: Any) -> dict[str, Any]:
    return {"mid": mid, "op": "put",
            "message": {"id": message_id, "role": role, "content": content, **fields}}


def delete(mid: int, message_id: str) -> dict[str, Any]:
    return {"mid": mid, "op": "delete", "message": {"id": message_id}}


async def collect(service: SyncService, thread_id: str, run_id: str,
                  after: str | None = None) -> list[RunEvent]:
    return [event async for event in service.events(thread_id, run_id, after)]


async def turn(service: SyncService, thread_id: str, device_id: str, content: str,
               reply: str, **options: Any) -> tuple[RunTicket, RunLease]:
    """A whole chat turn: start, acquire, stream ``reply`` word by word, finish."""
    state = await service.sync(thread_id, None, 0)
    ticket = await service.start_run(thread_id, device_id, epoch=state.epoch,
                                     since=state.version, content=content, **options)
    lease = await service.acquire(ticket)
    async with lease:
        for i, word in enumerate(reply.split(" ")):
            await lease.delta(word if i == 0 else " " + word)
        await lease.finish("eos", {"input_tokens": 5, "output_tokens": len(reply.split())})
    return ticket, lease
