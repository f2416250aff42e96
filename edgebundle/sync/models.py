"""The sync objects of docs/api.md, as they travel in JSON (and are stored in Redis).

Only JSON goes to and comes from Redis; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_STATUSES = ("in_progress", "completed", "incomplete")
RUN_STATUSES = ("queued", "in_progress", "completed", "incomplete", "failed", "cancelled")
RUN_REASONS = ("eos", "length", "context_full", "cancelled", "interrupted", "error", None)
MULTITASK_POLICIES = ("enqueue", "reject", "interrupt")


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True)
class ThreadMessage:
    """A message of a thread; deleted ones are tombstones (content empty)."""

    id: str
    role: str
    content: str
    status: str = "completed"
    version: int = 0
    position: float = 0.0
    created_at: float = 0.0
    deleted: bool = False
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ThreadMessage:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class Run:
    """One inference on a thread."""

    id: str
    thread_id: str
    status: str = "queued"
    device_id: str | None = None
    message_id: str | None = None  # the assistant message this run writes
    input_message_id: str | None = None
    fence: int | None = None
    reason: str | None = None
    usage: dict[str, int] | None = None
    created_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        return cls(**_known(cls, data))


@dataclass(frozen=True)
class SyncState:
    """The sync object: what changed since the caller's (epoch, version), or everything."""

    id: str
    epoch: str
    version: int
    full: bool
    messages: tuple[ThreadMessage, ...] = ()
    active_run: Run | None = None
    queued_runs: tuple[Run, ...] = field(default_factory=tuple)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "epoch": self.epoch,
            "version": self.version,
            "full": self.full,
            "messages": [m.to_json() for m in self.messages],
            "active_run": self.active_run.to_json() if self.active_run else None,
            "queued_runs": [r.to_json() for r in self.queued_runs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SyncState:
        return cls(
            id=data["id"],
            epoch=data["epoch"],
            version=int(data["version"]),
            full=bool(data["full"]),
            messages=tuple(ThreadMessage.from_json(m) for m in data.get("messages", [])),
            active_run=Run.from_json(data["active_run"]) if data.get("active_run") else None,
            queued_runs=tuple(Run.from_json(r) for r in data.get("queued_runs", [])),
        )


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
