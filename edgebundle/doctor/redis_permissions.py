"""``redis.permissions``: the user can do what the sync core and the agent need, and no more.

Probed only with commands that change nothing whatever the answer (see the checks'
module docstring, :mod:`edgebundle.doctor.redis_checks`); refused probes are what an
ACL LOG records.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgebundle.config import Settings
from edgebundle.doctor.redis_server import Server, command
from edgebundle.doctor.report import CheckResult, fail, ok, warn

if TYPE_CHECKING:
    import redis

PERMISSIONS = "redis.permissions"


@dataclass(frozen=True)
class Probe:
    what: str  # for people: "FCALL_RO", "GET its desired state" …
    command: tuple[str | int, ...]


def permissions(server: Server, settings: Settings) -> CheckResult:
    from edgebundle import keys as fleet_keys
    from edgebundle import keys as sync_keys
    from edgebundle.sync import lua

    probe_id = f"doctor-{secrets.token_hex(6)}"  # names no real thread, device or member
    device = server.user.removeprefix("dev:") if server.user.startswith("dev:") else (
        settings.device_id)
    needed = [Probe("FCALL_RO (the library's functions)",
                    ("FCALL_RO", lua.function_name("version"), 0)),
              Probe("HMGET on a thread's keys (watch)", ("HMGET", sync_keys.meta(probe_id), "v")),
              Probe("XRANGE on a run's events", ("XRANGE", sync_keys.run_events(
                  probe_id, "r1"), "-", "+", "COUNT", 1))]
    thread_writes = Probe("writes on a thread's keys", ("PEXPIRE", sync_keys.meta(probe_id), 1))
    extra = [Probe("EVAL", ("EVAL", "return 1", 0)),
             Probe("FUNCTION LOAD", ("FUNCTION", "LOAD", "#!lua name=doctor_probe\n")),
             Probe("CONFIG", ("CONFIG", "GET", "maxmemory")),
             Probe("SCAN", ("SCAN", 0, "COUNT", 1)),
             Probe("PUBLISH", ("PUBLISH", f"{probe_id}-channel", "")),
             Probe("writes on another device's keys",
                   ("PEXPIRE", fleet_keys.desired(probe_id), 1))]
    if device:
        needed += [Probe("GET its desired state", ("GET", fleet_keys.desired(device))),
                   Probe("writes on its own keys",
                         ("PEXPIRE", f"{fleet_keys.device_prefix(device)}{probe_id}", 1))]
    if settings.fleet:
        needed += [Probe("HLEN the fleet's revisions", ("HLEN", fleet_keys.revisions(
                       settings.fleet)))]
        extra += [Probe("writes on the fleet's device set",
                        ("SREM", fleet_keys.fleet_devices(settings.fleet), probe_id))]
    refused = [probe.what for probe in needed if not _runs(server.client, probe)]
    allowed = [probe.what for probe in extra if _runs(server.client, probe)]
    direct = _runs(server.client, thread_writes)  # else proxied: the proxy runs the functions
    if refused == [needed[0].what] and not direct:
        return fail(PERMISSIONS, f"user {server.user} is provisioned for the sync proxy "
                                 "(--access proxied) but connects to Redis directly, where "
                                 "it may not run the sync functions",
                    "use the credentials' redis_url, which names the proxy (edgebundle fleet "
                    "proxy), or provision the device again with --access direct")
    if refused:
        return fail(PERMISSIONS, f"user {server.user} may not run what the sync core and the "
                                 f"agent need: {', '.join(refused)}",
                    "provision the device again with this version (edgebundle fleet provision "
                    "FLEET --device ID) and use the credentials it writes")
    if allowed:
        return warn(PERMISSIONS, f"user {server.user} can do what the sync core and the agent "
                                 f"need, and more: {', '.join(allowed)}; one stolen credential "
                                 "of a device could block or wipe this Redis",
                    "give every device its own user: edgebundle fleet provision FLEET "
                    "--device ID (fine as it is for a private Redis)")
    access = ("thread keys are read-only for it (the sync proxy runs the functions)"
              if not direct else
              "it may also write every thread's keys directly (provision with --access "
              "proxied behind edgebundle fleet proxy so that a stolen credential cannot)")
    return ok(PERMISSIONS, f"user {server.user} can do what the sync core and the agent need, "
                           f"and {', '.join(probe.what for probe in extra)} are refused; "
                           f"{access}")


def _runs(client: redis.Redis, probe: Probe) -> bool:
    """Whether the server let the user run ``probe`` (any answer but NOPERM counts)."""
    import redis

    try:
        command(client, *probe.command)
    except redis.exceptions.NoPermissionError:
        return False
    except redis.ResponseError as exc:
        # refused inside a function, or a FUNCTION LOAD refused for its (empty) content
        return "no permissions" not in str(exc).lower()
    return True
