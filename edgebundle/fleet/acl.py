"""One Redis ACL user per device, fenced to the keys that device needs and nothing more.

Every device talks to the central Redis, so one stolen device must not be able to read
or break the others, or stop the server. :func:`provision` gives device ``D`` of fleet
``F`` the user ``dev:D`` with a random password and an allow-list (``-@all``, then only
what the device's own code runs):

- its own keys ``eb:dev:{dev:D}:*`` (info, heartbeat, desired, actual): read and write;
- the fleet's revisions, rollout and pause flag: read only (``%R~``); nothing at all on
  the fleet's device set: membership is the admin's (provisioning adds the device,
  revoking removes it), so a device cannot enrol ids in its fleet;
- the sync keys of every thread, ``eb:{*`` (threads are shared between devices), with
  the commands the sync core sends itself and the commands its Redis functions call
  (read from :mod:`edgebundle.sync.lua`, so a function that starts using a command is
  covered);
- the project's Lua only as Redis Functions: ``FCALL``/``FCALL_RO``, never EVAL,
  EVALSHA, SCRIPT or FUNCTION, so a device runs only the library an admin loaded (no
  busy loop that blocks every client, no allocation loop past ``maxmemory``);
- pub/sub: SUBSCRIBE on its own nudge channel only;
- connecting: PING, ``INFO cluster`` (the cluster probe of
  :func:`edgebundle.sync.client.connect`), SELECT, and what a cluster client asks.

Nothing else: no KEYS, SCAN, FLUSH*, CONFIG, DEBUG, ACL, MONITOR, SHUTDOWN, CLIENT
KILL, PUBLISH (key patterns do not limit KEYS/SCAN/FLUSH*, so they are never granted).

Two kinds of access (``access``), because Redis checks the commands a function runs
against the *caller's* user, keys included:

- ``direct``: the device connects to Redis itself and calls the functions, so its user
  also holds what they run on a thread's keys (HSET, DEL, XADD …), and a stolen device
  credential can read, change or delete any thread with plain commands (it still cannot
  reach other devices' keys, the fleet's state or membership, or the server);
- ``proxied``: the device connects through the sync proxy
  (:mod:`edgebundle.fleet.proxy`), which runs the sync functions under its own user.
  The device's user has no FCALL and reads thread keys only (``%R~``), plus BLPOP on
  the run wake-up lists; a stolen credential changes a thread only through the sync
  functions, the way any device may. Connecting to Redis directly with it gains
  nothing more.

:func:`provision` also loads the library (``FUNCTION LOAD``, on every primary of a
cluster), which devices may not do themselves. Re-provisioning a device rotates its
password (``ACL SETUSER … reset``, one atomic step); connections already open keep
working until they reconnect. Revoking a device deletes its user, which also closes its
connections, and removes it from the fleet. ACL users live in the server's
memory: when it has an ``aclfile`` they are saved there (``ACL SAVE``), otherwise the
result says they were not persisted. On Redis Cluster every node gets the same users.

Passwords come from :mod:`secrets` and are only ever returned to the caller, which
writes them to a file readable by its owner only (:func:`write_credentials`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import RedisError as _RedisPyError

from edgebundle import files, keys
from edgebundle import keys as sync_keys
from edgebundle.config import validate_redis_url
from edgebundle.errors import RedisAccessError, UsageError
from edgebundle.sync import lua
from edgebundle.sync.client import Client, connect

USER_PREFIX = "dev:"
SYNC_KEY_PATTERN = f"{sync_keys.PREFIX}:{{*"  # eb:{<thread>}:… (every thread's keys)
PASSWORD_BYTES = 32

# Connecting and staying connected (redis-py sends SELECT for a /db in the URL; a
# cluster client asks CLUSTER SLOTS and COMMAND, and ASKING/READONLY while resharding).
CONNECTION_COMMANDS = ("ping", "echo", "info|cluster", "select", "quit", "reset",
                       "client|setname", "client|getname", "client|id",
                       "cluster|slots", "cluster|shards", "command", "asking", "readonly",
                       "acl|whoami")
# The agent: its own documents, its heartbeat (SET … EX), its info hash.
DEVICE_COMMANDS = ("get", "set", "del", "exists", "expire", "pexpire", "ttl", "pttl",
                   "hset", "hget", "hgetall", "hmget", "hdel", "hexists",
                   "multi", "exec", "discard")
# What the agent reads of the fleet (revisions hash, rollout, paused flag).
FLEET_READ_COMMANDS = ("get", "exists", "hget", "hgetall", "hmget", "hexists", "hkeys", "hlen")
# The sync core outside its functions (watch, a thread's size before a turn, run
# events, waiting for a turn), and the functions themselves (FCALL; FCALL_RO for the
# library's version).
SYNC_DIRECT_COMMANDS = ("hmget", "hlen", "llen", "hexists", "xrange", "xread", "blpop")
RUN_WAKEUP_PATTERN = f"{SYNC_KEY_PATTERN}}}:run:*:go"  # BLPOPed by a queued run's acquire
ACCESS_MODES = ("direct", "proxied")
FUNCTION_COMMANDS = ("fcall", "fcall_ro")
PUBSUB_COMMANDS = ("subscribe", "unsubscribe")


def sync_function_commands() -> tuple[str, ...]:
    """Every command the sync functions call, read from their source (the fleet
    controller's functions are not a device's: their PUBLISH is never granted)."""
    return tuple(sorted({name.lower() for name in
                         re.findall(r"redis\.call\('(\w+)'", lua.SYNC_SOURCE)}))


def user_name(device_id: str) -> str:
    return USER_PREFIX + sync_keys.check_id("device", device_id)


def device_rules(fleet: str, device_id: str, access: str = "direct") -> list[str]:
    """The ACL SETUSER rules of a device's user (everything but its password)."""
    if access not in ACCESS_MODES:
        raise UsageError(f"unknown access {access!r}: use {' or '.join(ACCESS_MODES)}")
    commands = {*CONNECTION_COMMANDS, *DEVICE_COMMANDS, *FLEET_READ_COMMANDS,
                *SYNC_DIRECT_COMMANDS, *PUBSUB_COMMANDS}
    if access == "direct":
        commands |= {*FUNCTION_COMMANDS, *sync_function_commands()}
        thread_keys = [f"~{SYNC_KEY_PATTERN}"]
    else:  # the proxy runs the functions; the device reads, and takes its wake-ups
        thread_keys = [f"%R~{SYNC_KEY_PATTERN}", f"~{RUN_WAKEUP_PATTERN}"]
    return [
        "-@all", *(f"+{command}" for command in sorted(commands)),
        f"~{keys.device_prefix(device_id)}*",
        *thread_keys,
        f"%R~{keys.revisions(fleet)}",
        f"%R~{keys.rollout(fleet)}",
        f"%R~{keys.paused(fleet)}",
        "resetchannels", f"&{keys.nudge(device_id)}",
    ]


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    user: str
    password: str
    redis_url: str  # ready to use: redis://dev%3A<id>:<password>@host:port/db

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ProvisionResult:
    fleet: str
    credentials: list[DeviceCredentials]
    revoked: list[str]  # device ids whose user existed and was deleted
    persisted: bool  # saved to the server's aclfile (False: in memory until a restart)
    library: str = lua.LIBRARY  # the Redis functions library loaded for the devices
    access: str = "direct"  # direct to Redis, or proxied (through the sync proxy)


def device_url(base_url: str, user: str, password: str) -> str:
    """``base_url`` (scheme, host, port, db) with the device's user and password in it."""
    validate_redis_url(base_url)
    parts = urlsplit(base_url)
    if parts.scheme == "unix":
        raise UsageError("device credentials need a network Redis URL (redis:// or rediss://), "
                         "not a unix socket: pass --device-url redis://host:port/db")
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}{port}"
    return parts._replace(netloc=netloc).geturl()


async def _acl(redis: Client, *args: str) -> Any:
    """One ACL command, on every node of a cluster (ACL users are per node)."""
    if isinstance(redis, RedisCluster):
        return await redis.execute_command("ACL", *args, target_nodes=redis.get_nodes())
    # raw rules: redis-py's acl_setuser cannot express selectors or %R~ patterns
    return await redis.execute_command("ACL", *args)  # type: ignore[no-untyped-call]


def _refused(exc: Exception, secret: str | None = None) -> RedisAccessError:
    """The error to show for ``exc``, never with ``secret`` in it (redis-py's messages
    may quote the whole command)."""
    text = str(exc)
    if secret:
        text = text.replace(secret, "***")
    if isinstance(exc, NoPermissionError):
        return RedisAccessError(f"the Redis user may not manage ACL users or load functions "
                          f"({text}): pass --redis-url with an admin user's credentials")
    if isinstance(exc, ResponseError):
        return RedisAccessError(f"Redis refused to change ACL users: {text}")
    return RedisAccessError(f"cannot provision devices on Redis: {text}")


async def _save(redis: Client) -> bool:
    """ACL SAVE; False when the server keeps its users in memory only (no aclfile)."""
    try:
        await _acl(redis, "SAVE")
    except ResponseError as exc:
        if "ACL file" in str(exc) or "aclfile" in str(exc):
            return False
        raise _refused(exc) from None
    return True


def _counts(reply: Any) -> list[int]:
    """ACL DELUSER's count, per node on a cluster."""
    return [int(n) for n in (reply.values() if isinstance(reply, dict) else [reply])]


async def provision(redis: Client, fleet: str, device_ids: Iterable[str], *, base_url: str,
                    revoke_ids: Iterable[str] = (), access: str = "direct") -> ProvisionResult:
    """Create (or rotate) one ACL user per device and add it to the fleet's device set;
    delete the users of ``revoke_ids`` and take them out of the set. Loads the Redis
    functions library first (devices may only call it).

    ``redis`` is an admin connection; ``base_url`` is the Redis address the devices use
    (their credentials are put in it): with ``access="proxied"``, the sync proxy's.
    Idempotent: running it again gives the same users, rules and members with new
    passwords.
    """
    sync_keys.check_id("fleet", fleet)
    device_rules(fleet, "probe", access)  # an unknown access fails before any change
    wanted = [sync_keys.check_id("device", d) for d in dict.fromkeys(device_ids)]
    unwanted = [sync_keys.check_id("device", d) for d in dict.fromkeys(revoke_ids)]
    both = sorted(set(wanted) & set(unwanted))
    if both:
        raise UsageError(f"device {both[0]} is both provisioned and revoked: pick one")
    credentials: list[DeviceCredentials] = []
    revoked: list[str] = []
    if wanted:
        try:  # devices may only call it; a Redis older than 7.0 is refused here, clearly
            await lua.load_library(redis)
        except _RedisPyError as exc:
            raise _refused(exc) from None
    for device_id in wanted:
        user = user_name(device_id)
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        url = device_url(base_url, user, password)
        try:
            # reset first: the rules and password below are all the user has, in one step
            await _acl(redis, "SETUSER", user, "reset", "on", f">{password}",
                       *device_rules(fleet, device_id, access))
        except _RedisPyError as exc:
            raise _refused(exc, password) from None
        credentials.append(DeviceCredentials(device_id, user, password, url))
    try:
        members = keys.fleet_devices(fleet)
        if wanted:  # membership is the admin's: devices cannot write this set
            await redis.sadd(members, *wanted)
        for device_id in unwanted:
            if any(_counts(await _acl(redis, "DELUSER", user_name(device_id)))):
                revoked.append(device_id)
        if unwanted:
            await redis.srem(members, *unwanted)
        persisted = await _save(redis)
    except _RedisPyError as exc:
        raise _refused(exc) from None
    return ProvisionResult(fleet, credentials, revoked, persisted, access=access)


def read_device_ids(path: Path) -> list[str]:
    """Device ids from a file: one per line; blank lines and ``#`` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the device list ({exc.strerror})") from None
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        device_id = line.split("#", 1)[0].strip()
        if device_id:
            try:
                ids.append(sync_keys.check_id("device", device_id))
            except UsageError as exc:
                raise UsageError(f"{path}:{number}: {exc}") from None
    return ids


def write_credentials(path: Path, result: ProvisionResult) -> dict[str, Any]:
    """Merge ``result`` into the credentials file at ``path`` (mode 0600); its content.

    The file is ``{"fleet", "updated_at", "devices": {id: {user, password, redis_url}}}``;
    devices provisioned earlier stay, rotated ones are replaced, revoked ones removed.
    Written to a new 0600 file and renamed over the old one, so it is never readable
    by others, not even for a moment, and never half written.
    """
    document: dict[str, Any] = {"fleet": result.fleet, "devices": {}}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        old = None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read the credentials file ({exc}): "
                         "move it away or pass another --out") from None
    if old is not None:
        if not isinstance(old, dict) or not isinstance(old.get("devices"), dict):
            raise UsageError(f"{path}: not an edgebundle credentials file: "
                             "move it away or pass another --out")
        if old.get("fleet") != result.fleet:
            raise UsageError(f"{path}: holds the credentials of fleet {old.get('fleet')!r}, "
                             f"not {result.fleet!r}: pass another --out")
        document["devices"] = dict(old["devices"])
    for device_id in result.revoked:
        document["devices"].pop(device_id, None)
    for creds in result.credentials:
        document["devices"][creds.device_id] = {
            "user": creds.user, "password": creds.password, "redis_url": creds.redis_url}
    document["devices"] = dict(sorted(document["devices"].items()))
    document["updated_at"] = time.time()
    files.write_text(path, json.dumps(document, indent=2) + "\n", mode=0o600)
    return document


def default_credentials_path(home: Path, fleet: str) -> Path:
    return home / "fleet" / f"{sync_keys.check_id('fleet', fleet)}.credentials.json"


async def provision_fleet(admin_url: str, fleet: str, device_ids: Sequence[str], *,
                          out: Path, base_url: str | None = None,
                          revoke_ids: Sequence[str] = (), access: str = "direct",
                          ) -> tuple[ProvisionResult, dict[str, Any]]:
    """Connect as admin, provision/revoke, write the credentials file: the result and file."""
    if not device_ids and not revoke_ids:
        raise UsageError("no devices: pass --device ID (repeatable), --devices-from FILE "
                         "or --revoke ID")
    redis = await connect(admin_url)
    try:
        result = await provision(redis, fleet, device_ids, base_url=base_url or admin_url,
                                 revoke_ids=revoke_ids, access=access)
    finally:
        await redis.aclose()
    if not result.credentials and not out.exists():
        return result, {"fleet": fleet, "devices": {}}  # a revoke needs no new file
    return result, write_credentials(out, result)

