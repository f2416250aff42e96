"""What doctor returns: one result per stable check id, and the report around them.

The ids and the JSON shape are part of the external contract (docs/api.md): fleet
agents report them and rollouts gate on them, so ids are added, never renamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")

# Every report carries each of these, in this order (docs/api.md "Stable ids").
CHECK_IDS: tuple[str, ...] = (
    "wasmedge.binary",
    "wasmedge.version",
    "wasmedge.plugin_path",
    "wasmedge.plugin",
    "wasmedge.plugin_duplicates",
    "runtime.embedded",
    "model.file",
    "model.template",
    "model.stop_tokens",
    "app.wasm",
    "redis.reachable",
    "sync.replication",
    "host.cpu",
    "host.memory",
    "host.disk",
)


@dataclass(frozen=True)
class CheckResult:
    id: str
    status: Status
    summary: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "summary": self.summary, "fix": self.fix}


def ok(check_id: str, summary: str) -> CheckResult:
    return CheckResult(check_id, "ok", summary)


def warn(check_id: str, summary: str, fix: str | None = None) -> CheckResult:
    return CheckResult(check_id, "warn", summary, fix)


def fail(check_id: str, summary: str, fix: str | None = None) -> CheckResult:
    return CheckResult(check_id, "fail", summary, fix)


def skip(check_id: str, summary: str) -> CheckResult:
    return CheckResult(check_id, "skip", summary)


@dataclass(frozen=True)
class Report:
    runtime: str  # the runtime `run` would use: "wasmedge" or "embedded"
    checks: tuple[CheckResult, ...]
    reason: str = ""  # why run uses it (run's own words, e.g. "auto: no wasmedge found")
    refusal: str | None = None  # run would not start at all, and says this

    @property
    def ok(self) -> bool:
        return self.refusal is None and not any(c.status == "fail" for c in self.checks)

    def check(self, check_id: str) -> CheckResult:
        for result in self.checks:
            if result.id == check_id:
                return result
        raise KeyError(check_id)

    def count(self, status: Status) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "runtime": self.runtime,
            "runtime_reason": self.reason,
            "checks": [c.to_json() for c in self.checks],
        }


def assemble(
    runtime: str, results: Iterable[CheckResult], reason: str = "", refusal: str | None = None
) -> Report:
    """A report with the stable ids in contract order; an extra id follows the stable ids
    of its area (``redis.version`` after ``redis.reachable``), others come last."""
    by_id: dict[str, CheckResult] = {}
    for result in results:
        if result.id in by_id:
            raise ValueError(f"check {result.id} reported twice")
        by_id[result.id] = result
    missing = [i for i in CHECK_IDS if i not in by_id]
    if missing:
        raise ValueError(f"checks missing from the report: {', '.join(missing)}")
    ordered = [by_id.pop(i) for i in CHECK_IDS]
    for extra in by_id.values():
        area = [n for n, result in enumerate(ordered) if _area(result.id) == _area(extra.id)]
        ordered.insert(area[-1] + 1 if area else len(ordered), extra)
    return Report(runtime=runtime, checks=tuple(ordered), reason=reason, refusal=refusal)


def _area(check_id: str) -> str:
    return check_id.split(".", 1)[0]
