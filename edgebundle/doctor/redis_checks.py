"""The sync Redis, checked the way an operator would before trusting it with conversations.

``redis.reachable``: it answers PING with the configured credentials. One attempt,
one-second timeouts, no retries: a doctor must answer quickly, and a Redis that needs
retries to answer PING is worth a failing check. The password never appears in a
summary (config.redact_url).

Once it answers, and when asked (``central_redis``: ``edgebundle doctor`` asks; ``run``'s
preflight and a fleet agent's checks of a revision do not), as the configured user (on
a cluster: on every primary):

- ``redis.version``: 7.0 or newer, what Redis Functions need (edgebundle's Lua is one
  Functions library, :mod:`edgebundle.sync.lua`). From ``HELLO``, which any user may send.
- ``redis.topology``: standalone or a cluster (its primaries; a cluster not ``ok`` fails).
- ``redis.persistence``: ``appendonly``/``appendfsync`` (and RDB ``save``): no
  persistence at all loses every thread and the functions at a restart (fail); RDB
  only, or an AOF never fsynced, loses the last writes (warn).
- ``redis.maxmemory_policy``: anything but ``noeviction`` may evict a thread's keys
  (every one has a TTL, so ``volatile-*`` too) and drop it silently (fail).
- ``redis.functions``: the library of this version answers (``eb_<v>_version``). Missing
  is a warning where this user may load it (its first sync call does) and a failure
  where it may not (a device: an admin runs ``edgebundle fleet load-functions``).
- ``redis.permissions``: the user can do what the sync core and the agent need and
  nothing more. Probed only with commands that change nothing whatever the answer:
  reads, PEXPIRE/SREM/PUBLISH on keys, members and channels that do not exist, EVAL of
  ``return 1``, FUNCTION LOAD of a library with no function (refused either way),
  CONFIG GET, SCAN of one key. A device user (``fleet provision``) passes, and the
  detail says whether it may write threads itself (``--access direct``) or only
  through the sync proxy (``proxied``: such a user connecting to Redis directly
  fails, with the fix); a user that
  may also run EVAL, CONFIG, SCAN or write another device's keys is a warning (fine
  for a private Redis, not for a central one); one that lacks what is needed fails.
  Refused probes are what an ACL LOG records: a device's doctor adds a few entries.

A device user may not read CONFIG: persistence and eviction then skip, saying to run
doctor with an admin URL.

The connection and what it learns of the server are :mod:`~edgebundle.doctor.redis_server`'s;
the permissions probe is :mod:`~edgebundle.doctor.redis_permissions`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgebundle.config import Settings, redact_url
from edgebundle.doctor.context import Context
from edgebundle.doctor.redis_permissions import PERMISSIONS, permissions
from edgebundle.doctor.redis_server import (
    Server,
    client_for,
    command,
    connect,
    location,
    may,
    scrub,
)
from edgebundle.doctor.report import CheckResult, fail, ok, skip, warn

if TYPE_CHECKING:
    pass

REACHABLE = "redis.reachable"
VERSION = "redis.version"
TOPOLOGY = "redis.topology"
PERSISTENCE = "redis.persistence"
EVICTION = "redis.maxmemory_policy"
FUNCTIONS = "redis.functions"
# Facts about the Redis a device uses, not about the revision it runs (a fleet agent
# does not fail a revision on them).
IDS = (REACHABLE, VERSION, TOPOLOGY, PERSISTENCE, EVICTION, FUNCTIONS, PERMISSIONS)

MIN_VERSION = (7, 0)
_AUTH_WORDS = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")
_ADMIN_HINT = "run `edgebundle doctor --redis-url ADMIN_URL` (a user that may read CONFIG)"


def checks(ctx: Context) -> list[CheckResult]:
    url = ctx.settings.redis_url
    if url is None:
        return [skip(REACHABLE, "no Redis configured (--redis-url or EDGEBUNDLE_REDIS_URL)")]
    if not ctx.online:
        return [skip(REACHABLE, f"offline checks only; {redact_url(url)} not contacted")]
    reachable = ping(url)
    if reachable.status != "ok" or not ctx.central_redis:
        return [reachable]
    return [reachable, *central(url, ctx.settings)]


def ping(url: str) -> CheckResult:
    import redis

    where = location(url)
    has_password = urlsplit(url).password is not None
    client = client_for(url)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        return _auth_failed(url, where, has_password, str(exc))
    except redis.ResponseError as exc:
        if any(word.lower() in str(exc).lower() for word in _AUTH_WORDS):
            return _auth_failed(url, where, has_password, str(exc))
        return fail(
            REACHABLE,
            f"Redis at {where} answered PING with an error: {scrub(str(exc), url)}",
            "check the Redis user's ACL allows PING",
        )
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        return fail(
            REACHABLE,
            f"cannot reach redis at {where}: {scrub(str(exc), url) or type(exc).__name__}",
            "start Redis there, or fix --redis-url / EDGEBUNDLE_REDIS_URL (and any firewall)",
        )
    finally:
        client.close()
    return ok(REACHABLE, f"PONG from {redact_url(url)}")


def _auth_failed(url: str, where: str, has_password: bool, message: str) -> CheckResult:
    if not has_password:
        return fail(
            REACHABLE,
            f"Redis at {where} requires a password and none was given",
            "put it in the URL: redis://:PASSWORD@host:port (or user:PASSWORD@ for an ACL user)",
        )
    return fail(
        REACHABLE,
        f"Redis at {where} refused the password ({scrub(message, url)})",
        "fix the password in --redis-url / EDGEBUNDLE_REDIS_URL (redis://user:PASSWORD@host:port)",
    )


# -- the central Redis, as the configured user -----------------------------------------


def central(url: str, settings: Settings) -> list[CheckResult]:
    """Every check after ``redis.reachable`` passed (the Redis answered PING)."""
    import redis

    try:
        server = connect(url)
    except redis.RedisError as exc:
        return [fail(VERSION, f"Redis at {location(url)} would not say what it is: "
                              f"{scrub(str(exc), url)}", "check the Redis (HELLO must work)")]
    try:
        steps: list[tuple[str, Callable[[], CheckResult]]] = [
            (VERSION, lambda: _version(server)),
            (TOPOLOGY, lambda: _topology(server)),
            (PERSISTENCE, lambda: _persistence(server)),
            (EVICTION, lambda: _eviction(server)),
            (FUNCTIONS, lambda: _functions(server)),
            (PERMISSIONS, lambda: permissions(server, settings)),
        ]
        results = []
        for check_id, step in steps:
            try:
                results.append(step())
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                results.append(fail(check_id, f"lost Redis at {location(url)} while checking: "
                                              f"{scrub(str(exc), url) or type(exc).__name__}",
                                    "check the Redis and the network, then run doctor again"))
            except redis.RedisError as exc:  # an answer no check expects: say it, go on
                results.append(fail(check_id, f"Redis at {location(url)} refused the check: "
                                              f"{scrub(str(exc), url)}",
                                    "check the Redis and the user's ACL, then run doctor again"))
        return results
    finally:
        server.close()


def _version(server: Server) -> CheckResult:
    if server.version[:2] < MIN_VERSION:
        return fail(VERSION, f"{server.name} {server.version_text} is older than 7.0: "
                             "edgebundle runs its Lua as Redis Functions (FCALL), which "
                             "need Redis 7.0 or newer",
                    "upgrade the Redis to 7.0 or newer (or Valkey 7.2 or newer)")
    return ok(VERSION, f"{server.name} {server.version_text} (Functions: 7.0 or newer)")


def _topology(server: Server) -> CheckResult:
    import redis

    if not server.cluster:
        return ok(TOPOLOGY, f"standalone at {location(server.url)}")
    nodes = ", ".join(address for address, _ in server.primaries)
    try:
        info = command(server.client, "CLUSTER INFO")
    except redis.ResponseError:  # a device user may not ask: CLUSTER SLOTS was enough
        info = None
    state = _cluster_state(info)
    if state not in (None, "ok"):
        return fail(TOPOLOGY, f"Redis Cluster of {len(server.primaries)} primaries ({nodes}) "
                              f"is not ok (cluster_state:{state}): threads in its missing "
                              "slots cannot be reached",
                    "fix the cluster (redis-cli --cluster check HOST:PORT)")
    return ok(TOPOLOGY, f"Redis Cluster of {len(server.primaries)} primaries: {nodes}")


def _cluster_state(info: Any) -> str | None:
    """cluster_state from CLUSTER INFO (text, or a dict when redis-py parsed it)."""
    if isinstance(info, dict):
        return str(info.get("cluster_state"))
    for line in str(info or "").splitlines():
        if line.startswith("cluster_state:"):
            return line.split(":", 1)[1].strip()
    return None


def _config(server: Server, *names: str) -> list[tuple[str, dict[str, str]]] | None:
    """CONFIG GET on every primary; None when this user may not (a device user)."""
    import redis

    values = []
    for address, node in server.primaries:
        try:
            got: dict[str, str] = {}
            for name in names:
                got.update({str(key): str(value)
                            for key, value in node.config_get(name).items()})
        except redis.exceptions.NoPermissionError:
            return None
        values.append((address, got))
    return values


def _worst(results: Sequence[CheckResult]) -> CheckResult:
    order = {"fail": 0, "warn": 1, "skip": 2, "ok": 3}
    return min(results, key=lambda result: order[result.status])


def _persistence(server: Server) -> CheckResult:
    config = _config(server, "appendonly", "appendfsync", "save")
    if config is None:
        return skip(PERSISTENCE, f"user {server.user} may not read CONFIG (a device user: "
                                 f"as it should be); {_ADMIN_HINT}")
    results = [_node_persistence(address, values, server.cluster) for address, values in config]
    return _worst(results)


def _node_persistence(address: str, values: dict[str, str], cluster: bool) -> CheckResult:
    where = f" on {address}" if cluster else ""
    aof, fsync, save = values.get("appendonly"), values.get("appendfsync"), values.get("save")
    conf = "CONFIG SET appendonly yes; CONFIG SET appendfsync everysec (and in redis.conf)"
    if aof == "yes" and fsync in ("always", "everysec"):
        loss = "nothing it acknowledged" if fsync == "always" else "at most about a second"
        return ok(PERSISTENCE, f"append-only file on, appendfsync {fsync}{where}: a power "
                               f"cut loses {loss}")
    if aof == "yes":
        return warn(PERSISTENCE, f"append-only file on but appendfsync {fsync}{where}: the OS "
                                 "decides when it reaches the disk, a power cut can lose the "
                                 "last ~30 s of conversations", "CONFIG SET appendfsync everysec "
                                                                "(and in redis.conf)")
    if save:
        return warn(PERSISTENCE, f"snapshots only (save {save}){where}, no append-only file: a "
                                 "crash loses every change since the last snapshot", conf)
    return fail(PERSISTENCE, f"no persistence{where} (appendonly no, save \"\"): a restart "
                             "loses every thread and the edgebundle functions", conf)


def _eviction(server: Server) -> CheckResult:
    config = _config(server, "maxmemory-policy", "maxmemory")
    if config is None:
        return skip(EVICTION, f"user {server.user} may not read CONFIG (a device user: "
                              f"as it should be); {_ADMIN_HINT}")
    results = []
    for address, values in config:
        where = f" on {address}" if server.cluster else ""
        policy, limit = values.get("maxmemory-policy"), values.get("maxmemory", "0")
        cap = "no maxmemory" if limit == "0" else f"maxmemory {limit} bytes"
        if policy == "noeviction":
            results.append(ok(EVICTION, f"noeviction ({cap}){where}: a full Redis refuses "
                                        "writes instead of dropping threads"))
        else:
            results.append(fail(EVICTION, f"maxmemory-policy {policy} ({cap}){where}: Redis may "
                                          "evict a thread's keys (all of them have a TTL) and "
                                          "drop it silently",
                                "CONFIG SET maxmemory-policy noeviction (and in redis.conf)"))
    return _worst(results)


def _functions(server: Server) -> CheckResult:
    import redis

    from edgebundle.sync import lua

    missing = []
    for address, node in server.primaries:
        try:
            node.fcall_ro(lua.function_name("version"), 0)
        except redis.exceptions.NoPermissionError:
            return fail(FUNCTIONS, f"user {server.user} may not run FCALL_RO: it cannot run "
                                   "edgebundle's functions",
                        "provision the device again (edgebundle fleet provision FLEET "
                        "--device ID), or give the user +fcall +fcall_ro")
        except redis.ResponseError as exc:
            if "function not found" not in str(exc).lower():
                return fail(FUNCTIONS, f"{address} cannot run Redis functions: {exc}",
                            "upgrade the Redis to 7.0 or newer")
            missing.append(address)
    others = _other_libraries(server, lua.LIBRARY)
    also = (f"; also loaded: {', '.join(others)} (other edgebundle versions: FUNCTION DELETE "
            "them once no device runs them)") if others else ""
    if not missing:
        where = f" on all {len(server.primaries)} primaries" if server.cluster else ""
        return ok(FUNCTIONS, f"{lua.LIBRARY} (this version's library) is loaded{where}{also}")
    where = f" on {', '.join(missing)}" if server.cluster else ""
    if may(server, "FUNCTION", "LOAD", "x"):
        return warn(FUNCTIONS, f"{lua.LIBRARY} is not loaded{where}; user {server.user} may load "
                               f"it, so the first sync call does{also}",
                    "nothing to do, or load it now: edgebundle fleet load-functions")
    return fail(FUNCTIONS, f"{lua.LIBRARY} is not loaded{where} and user {server.user} may not "
                           f"load it: every sync call fails{also}",
                "an admin runs: edgebundle fleet load-functions --redis-url ADMIN_URL")


def _other_libraries(server: Server, mine: str) -> list[str]:
    """Other edgebundle libraries (FUNCTION LIST needs an admin: none seen otherwise)."""
    import redis

    try:
        listing = server.client.function_list(library="edgebundle_*")
    except redis.ResponseError:
        return []
    names = {str(dict(zip(lib[::2], lib[1::2], strict=True))["library_name"])
             for lib in listing}
    return sorted(names - {mine})


